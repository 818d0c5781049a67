"""`make demo` on a reduced preset, and the ablation command's pieces. The demo end to end (every
stage, from scratch twice, resumed, reused) is `tests/test_reproducibility.py`'s: one set of runs
for both."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from capture_jax import ablation
from capture_jax import config as config_lib
from tests.helpers import compile_cache_env
from tests.helpers import without_compile_cache

REPO = Path(__file__).resolve().parents[1]

# The demo's configuration, shrunk to the tiny synthetic world and a few steps.
REDUCED_DEMO = textwrap.dedent("""
    import importlib.util
    import os
    spec = importlib.util.spec_from_file_location('demo_config', {demo!r})
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)

    def get_config(arg=None):
      c = demo.get_config()
      c.model.update(hidden_size=32, intermediate_size=48, v_hidden_size=32, v_intermediate_size=48,
                     bi_hidden_size=16, cross_hidden_size=32, num_attention_heads=2, v_num_attention_heads=2,
                     bi_num_attention_heads=2, cross_num_attention_heads=2, num_hidden_layers=1,
                     v_num_hidden_layers=1, co_num_layers=1, cross_num_layers=1, vocab_size=500,
                     max_text_len=16, max_position_embeddings=32, cross_max_position_embeddings=32,
                     v_target_size=32)
      c.data.synthetic_preset = 'tiny'
      c.data.feature_dim = 32
      c.data.max_regions = 8
      c.data.vocab_size = 500
      c.data.batch_size = 8
      c.data.eval_batch_size = 8
      c.train.num_steps = int(os.environ['DEMO_TEST_STEPS'])
      c.train.log_every = 2
      c.checkpoint.every_steps = 2
      c.instances.update(num_steps=6, batch_size=4, hidden_size=16, num_layers=1, num_heads=2,
                         warmup_steps=2, checkpoint_every=3, log_every=2)
      return c
""")


def run_demo(config_file, workdir, steps, compile_cache=True):
  """`python -m capture_jax.demo` with the reduced config; its stdout. `compile_cache`: True, the
  tests' shared compilation cache; False, none (a run from scratch compiles its own programs);
  a folder, a cache of the run's own."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'DEMO_TEST_STEPS': str(steps)}
  if compile_cache is not True:
    env = without_compile_cache(env)
  if compile_cache not in (True, False):
    env.update(compile_cache_env(str(compile_cache)))
  proc = subprocess.run(
      [
          sys.executable,
          '-m',
          'capture_jax.demo',
          '--config',
          str(config_file),
          '--workdir',
          str(workdir),
      ],
      capture_output=True,
      text=True,
      env=env,
      cwd=REPO,
      timeout=600,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


def assert_every_stage_ran(stdout: str, workdir: Path, steps: int) -> None:
  """What a first `make demo` prints and writes: every stage, the report with CAPTURE and the
  three baselines, and the headline."""
  for n in range(1, 7):
    assert f'== stage {n}:' in stdout
  assert (workdir / 'data' / 'synthetic_world.json').is_file()
  assert (workdir / 'checkpoints' / str(steps)).is_dir()
  out = workdir / 'eval_dev'
  for name in ('report.md', 'metrics.json', 'metrics.png', 'retrieval_id_list.txt'):
    assert (out / name).is_file(), name
  # The printed table is the report's, with CAPTURE and the three baselines.
  for method in ('CAPTURE (', 'CAPTURE, random weights', 'TF-IDF', 'Mean region feature'):
    assert method in stdout
  assert str(out / 'report.md') in stdout
  headline = json.loads((out / 'evaluation.json').read_text())['main_method']
  assert f'headline: {headline} mAP@10' in stdout and 'the best baseline' in stdout
  metrics = json.loads((out / 'metrics.json').read_text())
  assert any(m.startswith('CAPTURE (') for m in metrics)


def assert_resumes_then_reuses(config_file, workdir: Path, steps: int, compile_cache) -> None:
  """More steps: training continues from the last checkpoint and the new step is evaluated;
  the same command again trains nothing and reuses the exports."""
  second = run_demo(config_file, workdir, steps + 2, compile_cache)
  assert 'reusing the data set' in second and 'reusing the vocab' in second
  assert 'reusing the built dataset' in second
  assert f'resumed from the checkpoint at step {steps}' in second
  evaluation = json.loads((workdir / 'eval_dev' / 'evaluation.json').read_text())
  assert evaluation['checkpoint_step'] == steps + 2

  third = run_demo(config_file, workdir, steps + 2, compile_cache)
  assert f'training already finished (step {steps + 2})' in third
  assert 'reusing the exports in' in third


def test_ablation_variants_change_only_their_fields():
  base = config_lib.base_config()
  full = ablation.variant_config(base, 'full')
  assert full.to_dict() == {**base.to_dict(), 'eval': {**base.eval.to_dict(), 'baselines': True}}
  mlm = ablation.variant_config(base, 'mlm')
  assert (mlm.loss.mlm_weight, mlm.loss.mrm_weight, mlm.loss.contrastive_weight) == (1.0, 0.0, 0.0)
  assert not mlm.eval.baselines  # baselines are evaluated once, with the full model
  assert ablation.variant_config(base, 'single_stream').model.co_num_layers == 0
  assert ablation.variant_config(base, 'two_stream').model.cross_num_layers == 0
  assert ablation.variant_config(base, 'siglip').loss.contrastive == 'siglip'
  # The variant that equals the full model is not trained twice.
  assert ablation.same_run(base, base.loss.contrastive) and not ablation.same_run(base, 'siglip')
  assert not ablation.same_run(base, 'full')
  assert base.loss.contrastive_weight == 1.0  # the base is not modified
  with pytest.raises(ValueError, match='unknown ablation variant'):
    ablation.variant_config(base, 'no_such_variant')


def test_ablation_table_has_a_row_per_variant_and_baseline():
  m = {'mAP@10': 0.5, 'mAP@50': 0.25, 'mAP@100': 0.125}
  text = ablation.table({'full': m, 'mlm': dict(m)}, {'TF-IDF over titles (text only)': m})
  lines = text.splitlines()
  assert len(lines) == 2 + 3
  assert '`mlm`: MLM only' in text and '| baseline | TF-IDF' in text
  assert lines[2].endswith('| 50.00 | 25.00 | 12.50 |')
  assert '(= `full`)' in ablation.table(
      {'full': m, 'clip': m}, {}
  )  # a variant that is the full run
