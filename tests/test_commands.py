"""The absl commands parse their flags: help lists them, list and negated flags parse, and the
calibration command runs end to end on a tiny synthetic world. Nothing here compiles a model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from capture_jax.data import synthetic

REPO = Path(__file__).resolve().parents[1]

COMMANDS = {
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
    'capture_jax.bench.contrastive': ['kinds', 'batches', 'dim', 'chunk', 'devices'],
    'capture_jax.evaluation.calibration': [
        'data_dir',
        'split',
        'r',
        'max_regions',
        'tfidf_max_features',
    ],
}


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, '-m', *args],
      capture_output=True,
      text=True,
      cwd=REPO,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
      timeout=timeout,
  )


@pytest.mark.parametrize('module', sorted(COMMANDS))
def test_help_lists_the_flags(module):
  proc = _run(module, '--helpfull')
  # absl prints the usage on stdout and exits before main runs; cli.run makes that status 0.
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  for name in COMMANDS[module]:
    assert f'--{name}:' in proc.stdout, (name, proc.stdout[-3000:])


@pytest.mark.parametrize(
    'args',
    [
        ['capture_jax.bench.input', '--preset=tiny', '--cores=1', '--batch_size=8'],
        [
            'capture_jax.bench.search',
            '--faiss=',
            '--nofaiss_flat',
            '--nprobe=1,2',
            '--ef_search=8',
            '--data',
            'clustered',
        ],
        ['capture_jax.bench.search', '--faiss=ivf', '--faiss_flat=false'],
        ['capture_jax.bench.contrastive', '--kinds=clip,siglip', '--batches=64,128', '--devices=2'],
        ['capture_jax.evaluation.calibration', '--data_dir=/nonexistent', '--split=test'],
    ],
    ids=lambda args: args[0].rsplit('.', 1)[-1] + '_' + '_'.join(args[1:3]),
)
def test_flags_parse(args):
  # --only_check_args: absl parses and validates the flags, then exits 0 before main runs.
  proc = _run(*args, '--only_check_args')
  assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize(
    'args',
    [
        ['capture_jax.bench.search', '--faiss=ivf,flat'],
        ['capture_jax.bench.search', '--nprobe=16,x'],
        ['capture_jax.bench.search', '--no_faiss_flat'],  # absl spells it --nofaiss_flat
        ['capture_jax.bench.contrastive', '--batches=8192,big'],
        ['capture_jax.evaluation.calibration'],  # --data_dir is required
    ],
    ids=lambda args: args[0].rsplit('.', 1)[-1] + '_' + '_'.join(args[1:2]),
)
def test_bad_flags_are_rejected_before_main(args):
  proc = _run(*args, '--only_check_args')
  assert proc.returncode == 1
  # One `error:` line (capture_jax.cli.parse_flags_or_exit), no traceback.
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert [l for l in proc.stderr.splitlines() if l.startswith('error: ')], proc.stderr[-3000:]


def test_calibration_prints_the_baselines(tmp_path):
  root = str(tmp_path / 'world')
  synthetic.generate(root, 'tiny', seed=0, progress=False)
  proc = _run('capture_jax.evaluation.calibration', f'--data_dir={root}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  assert [line.split()[:3] for line in lines] == [
      ['dev', 'mAP@10', name] for name in ('random', 'tfidf', 'mean_region', 'fusion')
  ], proc.stdout
  for line in lines:
    assert 0.0 <= float(line.split()[-1]) <= 100.0
