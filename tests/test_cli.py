"""Every command has one command line (`capture_jax.cli`): `--helpshort` prints its docstring and
its own flags and exits 0, a refused flag or a stray argument is one `error:` line and exit 1.
Each case is a real `python -m` process, as a user runs it; they start in parallel (most of a
command's start is importing JAX)."""

from __future__ import annotations

import ast
import concurrent.futures
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Each command module and the flags its --helpshort must list.
COMMANDS = {
    'capture_jax.train': ['config', 'workdir', 'stop_after_steps'],
    'capture_jax.export': [
        'config',
        'workdir',
        'split',
        'checkpoint',
        'out',
        '[no]instances',
        '[no]random_init',
        '[no]overwrite',
    ],
    'capture_jax.evaluate': [
        'config',
        'workdir',
        'split',
        'checkpoint',
        'out',
        'gallery_embeddings',
        'query_embeddings',
        'instance_embeddings',
    ],
    'capture_jax.aot': ['config', 'target', 'steps', 'json', '[no]find_max_batch'],
    'capture_jax.demo': ['config', 'workdir'],
    'capture_jax.ablation': ['config', 'workdir', 'data_workdir', 'variants'],
    'capture_jax.instances': ['config', 'workdir', 'split', 'methods', 'out', 'stop_after'],
    'capture_jax.data.product1m_tfds': [
        'data_dir',
        'out',
        'vocab',
        'config',
        'features',
        'storage_dtype',
        'max_regions',
        'feature_dim',
        '[no]with_cls_prob',
        '[no]skip_bad',
        '[no]overwrite',
        'num_workers',
        'examples_per_shard',
        'beam_pipeline_options',
    ],
    'capture_jax.data.synthetic': [
        'out',
        'preset',
        'seed',
        'annotations',
        'heldout_fraction',
        'feature_format',
        'feature_dim',
        'splits',
        '[no]overwrite',
    ],
    'capture_jax.data.tokenizer': [
        'data_dir',
        'out',
        'vocab_size',
        'min_frequency',
        'splits',
        '[no]overwrite',
    ],
    'capture_jax.retrieval.metrics': ['gt_dir', 'ranked', 'split', '[no]strict', 'output_json'],
    'capture_jax.retrieval.calibration': [
        'data_dir',
        'split',
        'r',
        'max_regions',
        'tfidf_max_features',
    ],
    'capture_jax.bench': [
        'what',
        'data_workdir',
        'configs',
        'batch_sizes',
        'dtype',
        'attention_impl',
        '[no]remat',
        'repeats',
        'warmup',
        '[no]no_record',
    ],
    'capture_jax.bench.bucket': [
        'work_dir',
        'num_images',
        'files',
        'dim',
        'workers',
        'repeats',
        'threads',
    ],
    'capture_jax.bench.build': [
        'work_dir',
        'num_train',
        'runs',
        'features',
        'examples_per_shard',
        '[no]parts',
        '[no]input',
    ],
    'capture_jax.bench.contrastive': ['kinds', 'batches', 'dim', 'chunk', 'target', 'devices'],
    'capture_jax.bench.eval_identity': [],  # WORKDIR OUT
    'capture_jax.bench.feature_dtype': ['repeats'],
    'capture_jax.bench.fit_table': [
        'config',
        'targets',
        'dtypes',
        'remat',
        'batches',
        'out',
        '[no]markdown',
    ],
    'capture_jax.bench.input': [
        'config',
        'work_dir',
        'batch_size',
        'cores',
        'warmup',
        'batches',
        'repeats',
        'preset',
        'feature_dim',
        'max_regions',
        'num_train',
    ],
    'capture_jax.bench.platform_probe': ['compilers', 'repeats'],
    'capture_jax.bench.retrieval_scale': [
        'work_dir',
        'num_gallery',
        'num_queries',
        'num_train',
        'train_steps',
        'build_workers',
        'paper_rows',
        'stages',
    ],
    'capture_jax.bench.search': [
        'queries',
        'gallery',
        'dim',
        'k',
        'repeats',
        'warmup',
        'data',
        'query_chunk',
        'gallery_chunk',
        'gallery_dtype',
        'faiss',
        '[no]faiss_flat',
        'nlist',
        'nprobe',
        'hnsw_m',
        'ef_construction',
        'ef_search',
        'seed',
        'json',
    ],
    'capture_jax.bench.step_loop': [
        'old_tree',
        'work_dir',
        'steps',
        'log_every',
        'slow_ms',
        'devices',
        'repeats',
        'inputs',
    ],
    'capture_jax.bench.step_profile': [
        'config',
        'batch',
        'steps',
        'warmup',
        'top',
        '[no]optimizer',
    ],
    'capture_jax.bench.versus_torch': [
        'cases',
        'repeats',
        'warmup',
        'old_tree',
        'old_cases',
        'load',
        '[no]without_torch',
        '[no]no_record',
    ],
}
# Modules run with `python -m` that are not a command of their own: the command they are.
NOT_COMMANDS = {'capture_jax.bench.harness': 'capture_jax.bench'}


def _env() -> dict[str, str]:
  path = os.pathsep.join(p for p in (str(REPO), os.environ.get('PYTHONPATH', '')) if p)
  return {**os.environ, 'PYTHONPATH': path, 'JAX_PLATFORMS': 'cpu'}


def _run(argv: list[str]) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, *argv], capture_output=True, text=True, cwd=REPO, env=_env(), timeout=300
  )


@functools.cache
def _helpshort_of_every_command() -> dict[str, subprocess.CompletedProcess]:
  """`python -m MODULE --helpshort` of every command, started together."""
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
    procs = {m: pool.submit(_run, ['-m', m, '--helpshort']) for m in COMMANDS}
    return {m: p.result() for m, p in procs.items()}


def _module_names_run_as_main() -> set[str]:
  """The package's modules with an `if __name__ == '__main__':` block."""
  names = set()
  for path in (REPO / 'capture_jax').rglob('*.py'):
    if "\nif __name__ == '__main__':" in path.read_text(encoding='utf-8'):
      parts = path.relative_to(REPO).with_suffix('').parts
      names.add('.'.join(parts[:-1] if parts[-1] == '__main__' else parts))
  return names


def _summary_line(module: str) -> str:
  """The first line of the docstring of the module that defines `module`'s flags."""
  defining = {command: name for name, command in NOT_COMMANDS.items()}.get(module, module)
  path = REPO.joinpath(*defining.split('.'))
  path = path / '__main__.py' if path.is_dir() else path.with_suffix('.py')
  return ast.get_docstring(ast.parse(path.read_text(encoding='utf-8'))).splitlines()[0]


def test_every_command_is_tested():
  assert _module_names_run_as_main() == set(COMMANDS) | set(NOT_COMMANDS)


@pytest.mark.parametrize('module', sorted(COMMANDS))
def test_helpshort_lists_the_flags_and_exits_0(module):
  proc = _helpshort_of_every_command()[module]
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  text = proc.stdout
  # The module's docstring first, then its own flags (not absl's or the libraries').
  assert text.startswith(_summary_line(module)), text[:300]
  for name in COMMANDS[module]:
    assert f'--{name}:' in text, (name, text[-3000:])
  assert '--verbosity' not in text and '--helpfull' in text


def test_help_of_a_console_script_lists_its_flags():
  # Under a console script (`capture-train`) the command module is not `__main__`: absl's
  # --helpshort lists no flag there; cli's lists the module's. --helpfull adds absl's, exit 0.
  entry = 'from capture_jax import train; train.console_main()'
  short = _run(['-c', entry, '--helpshort'])
  assert short.returncode == 0, short.stderr[-3000:]
  assert all(f'--{name}:' in short.stdout for name in COMMANDS['capture_jax.train'])
  full = _run(['-c', entry, '--helpfull'])
  assert full.returncode == 0, full.stderr[-3000:]
  assert '--stop_after_steps:' in full.stdout and '--verbosity:' in full.stdout


@pytest.mark.parametrize(
    'args, message',
    [
        (['--gt_dir', 'g'], 'error: flag --ranked=None: Flag --ranked must have a value'),
        (['--gt_dir=g', '--ranked=r', '--split', 'gallery'], 'error: flag --split=gallery: '),
        (['--gt_dir=g', '--ranked=r', '--nope'], 'error: Unknown command line flag'),
        (['--gt_dir=g', '--ranked=r', 'stray'], "error: unexpected arguments ['stray']"),
    ],
    ids=['required', 'bad_value', 'unknown', 'stray_argument'],
)
def test_a_refused_command_line_is_one_error_line_and_exit_1(args, message):
  proc = _run(['-m', 'capture_jax.retrieval.metrics', *args])
  assert proc.returncode == 1 and proc.stdout == ''
  assert proc.stderr.startswith(message) and proc.stderr.count('\n') == 1, proc.stderr
