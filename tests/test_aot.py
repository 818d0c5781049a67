"""Ahead-of-time compilation for TPU and NVIDIA targets from this CPU host (`capture_jax.aot`).

The compilers (libtpu, the CUDA PJRT plugin) are installed by `make test` apart from the
suite's environment (`.venv/aot-compilers`, see the Makefile), so that only these commands
load them; the commands run in subprocesses with that folder on their path.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from capture_jax import accelerators, aot
from tests.conftest import REPO

COMPILERS = os.environ.get('CAPTURE_AOT_COMPILERS', str(REPO / '.venv' / 'aot-compilers'))
DEMO = str(REPO / 'configs' / 'demo.py')


def compilers_env() -> dict[str, str]:
  if not os.path.isdir(os.path.join(COMPILERS, 'libtpu')):
    pytest.fail(
        f'no AOT compilers in {COMPILERS}: `make test` installs them there '
        '(requirements-aot.txt); or set CAPTURE_AOT_COMPILERS'
    )
  path = os.pathsep.join(p for p in (COMPILERS, os.environ.get('PYTHONPATH', '')) if p)
  return {**os.environ, 'PYTHONPATH': path}


def run_aot(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, '-m', 'capture_jax.aot', f'--config={DEMO}', *args],
      capture_output=True,
      text=True,
      env=compilers_env(),
      cwd=REPO,
      timeout=timeout,
  )


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
  return [l for l in result.stderr.splitlines() if l.startswith('error:')]


# --------------------------------------------------------------------------
# The target table (no compiler needed).


@pytest.mark.parametrize(
    'name, devices, hosts, chip',
    [
        ('v4-8', 4, 1, 'TPU v4'),
        ('v4-32', 16, 4, 'TPU v4'),
        ('v5e-4', 4, 1, 'TPU v5e'),
        ('v5e-16', 16, 4, 'TPU v5e'),
        ('v5e-256', 256, 64, 'TPU v5e'),
        ('v5p-8', 4, 1, 'TPU v5p'),
        ('v5p-16', 8, 2, 'TPU v5p'),
        ('v5p-64', 32, 8, 'TPU v5p'),
        ('v6e-8', 8, 1, 'TPU v6e'),
        ('2xv5e-256', 512, 128, 'TPU v5e'),
        ('h100x8', 8, 1, 'H100'),
        ('h200x1', 1, 1, 'H200'),
        ('h200x8', 8, 1, 'H200'),
        ('a100x8', 8, 1, 'A100'),
        ('h100x8x4', 32, 4, 'H100'),
    ],
)
def test_targets_are_named_as_users_name_them(name, devices, hosts, chip):
  t = accelerators.target(name)
  assert (t.num_devices, t.num_processes, t.chip.name) == (devices, hosts, chip)
  assert t.chip.hbm_bytes > 0 and t.chip.peak_bf16_flops > 0


def test_unknown_targets_are_refused_with_the_known_forms():
  for bad in ('v5e-3', 'v4-9', 'tpu', 'h300x8', 'h100x3'):
    with pytest.raises(ValueError) as e:
      accelerators.target(bad)
    assert repr(bad) in str(e.value)


@pytest.mark.parametrize(
    'kind, chip',
    [
        ('TPU v4', 'TPU v4'),
        ('TPU v5 lite', 'TPU v5e'),
        ('TPU v5', 'TPU v5p'),
        ('TPU v5p', 'TPU v5p'),
        ('TPU v6 lite', 'TPU v6e'),
        ('NVIDIA H100 80GB HBM3', 'H100'),
        ('NVIDIA H200 141GB HBM3e', 'H200'),
        ('NVIDIA A100-SXM4-80GB', 'A100'),
        ('NVIDIA L4', 'L4'),
    ],
)
def test_every_device_kind_has_its_peak(kind, chip):
  assert accelerators.chip_for_kind(kind).name == chip


def test_a_cpu_has_no_peak():
  assert accelerators.chip_for_kind('cpu') is None


def test_misfit_advice_says_by_how_much_and_what_to_try():
  fit = aot.Fit(
      step='train',
      target='v5e-16',
      chip='TPU v5e',
      batch=4096,
      compile_s=1.0,
      argument_bytes=4 * 2**30,
      output_bytes=4 * 2**30,
      temp_bytes=20 * 2**30,
      alias_bytes=4 * 2**30,
      code_bytes=0,
      hbm_bytes=16 * 2**30,
      flops_per_device=1e12,
      flops_source='XLA',
      peak_flops=197e12,
  )
  assert not fit.fits and fit.total_bytes == 24 * 2**30
  from capture_jax import config as config_lib  # pylint: disable=import-outside-toplevel

  text = aot.advice(fit, config_lib.load_config_file(DEMO))
  assert '24.00 GiB per device' in text and '8.00 GiB more than the 16.00 GiB' in text
  for hint in ('mesh.fsdp', 'model.remat=True', 'train.microbatches=2', 'smaller per-device'):
    assert hint in text
  assert fit.step_seconds(0.5) == pytest.approx(1e12 / (0.5 * 197e12))


# --------------------------------------------------------------------------
# Compiling for targets (subprocesses with the compilers).


@pytest.mark.slow
def test_demo_compiles_for_a_tpu_pod_slice(tmp_path):
  out = tmp_path / 'v4-8.json'
  result = run_aot('--target=v4-8', f'--json={out}')
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  assert (report['num_devices'], report['num_processes'], report['chip']) == (4, 1, 'TPU v4')
  for step in ('train', 'export'):
    row = report['steps'][step]
    assert row['fits'] and 0 < row['total_bytes'] < row['hbm_bytes']
    assert row['flops_source'].startswith('XLA, compiled') and row['flops_per_device'] > 0
    assert row['step_s_at_50pct'] == pytest.approx(2 * row['step_s_at_100pct'])
  assert report['steps']['train']['batch'] == 64
  # The train step's FLOPs grow with the global batch over 4 devices: about 20 GFLOP per
  # step of 64 demo samples in all (XLA's CPU count of the same step, BENCHMARKS).
  assert 2e9 < report['steps']['train']['flops_per_device'] < 2e10
  assert 'TPU v4' in result.stdout and 'GiB HBM' in result.stdout


@pytest.mark.slow
def test_demo_compiles_for_eight_h200s_with_its_split_resident(tmp_path):
  """One compile of the train step for 8 H200s (a GPU compile from this host takes ~45 s), with
  the training split resident in device memory: the resident step is the host-fed step with the
  tables as arguments and a gather in front (the TPU test above compiles the host-fed one)."""
  out = tmp_path / 'h200x8.json'
  result = run_aot(
      '--target=h200x8',
      '--steps=train',
      '--config.data.resident=True',
      '--resident_records=1000000',
      f'--json={out}',
  )
  assert result.returncode == 0, result.stderr[-3000:]
  row = json.loads(out.read_text())['steps']['train']
  # JAX's GPU client takes 75% of the memory by default (XLA_PYTHON_CLIENT_MEM_FRACTION).
  assert row['chip'] == 'H200' and row['fits'] and row['hbm_bytes'] == int(0.75 * 151397597184)
  # No FLOP count from XLA's GPU compiler: the host's count of the global step, per device.
  assert row['flops_source'].startswith('XLA, global step lowered for the host')
  assert 1e9 < row['flops_per_device'] < 1e10
  # The demo's rows: 16 regions x 256 float16 features, their boxes and mask, 24 token ids and
  # their mask; 1M records over 8 devices. The tables are arguments of the compiled step.
  row_bytes = 16 * 256 * 2 + 16 * 5 * 4 + 16 * 4 + 24 * 4 * 2
  assert row['resident_bytes'] == 125_000 * row_bytes
  assert row['argument_bytes'] >= row['resident_bytes']
  assert 'of the arguments, the resident training split' in result.stdout


def test_a_resident_split_over_the_budget_is_refused_before_compiling():
  result = run_aot(
      '--target=h200x8',
      '--steps=train',
      '--config.data.resident=True',
      '--resident_records=1000000',
      '--config.data.resident_memory_fraction=0.001',
      timeout=300,
  )
  assert result.returncode == 1
  (line,) = error_lines(result)
  assert 'the resident split does not fit: 1,000,000 records x' in line
  assert (
      '8,768 bytes over 8 devices take 1.02 GiB per device' in line
      and 'compiled' not in result.stdout
  )
  missing = run_aot('--target=h200x8', '--steps=train', '--config.data.resident=True')
  assert 'pass --resident_records' in error_lines(missing)[0]


def test_a_batch_that_does_not_fit_exits_1_with_the_shortfall():
  result = run_aot(
      '--target=v5e-4', '--steps=export', '--config.data.eval_batch_size=1048576', timeout=300
  )
  assert result.returncode == 1
  (line,) = error_lines(result)
  assert 'the export step at global batch 1048576 does not fit on v5e-4' in line
  assert 'exceeds available HBM' in line and 'smaller --config.data.eval_batch_size' in line
  assert 'Traceback' not in result.stderr


def test_the_targets_process_count_is_checked_not_the_hosts():
  # v5p-16 is two hosts of four chips: a global batch of 1 over a tensor-parallel mesh splits
  # over its 1 batch device but not over its 2 processes (this host has one).
  result = run_aot(
      '--target=v5p-16',
      '--steps=train',
      '--config.mesh.data=1',
      '--config.mesh.tensor=8',
      '--config.data.batch_size=1',
      timeout=300,
  )
  assert result.returncode == 1, result.stdout[-2000:]
  assert 'data.batch_size=1 is not divisible by the 2 processes' in result.stderr
  assert 'over 2 host(s)' in result.stdout


def test_cudnn_attention_is_refused_where_it_cannot_run():
  tpu = run_aot(
      '--target=v4-8', '--config.model.attention_impl=cudnn', '--config.model.dtype=bfloat16'
  )
  assert tpu.returncode == 1
  assert "attention_impl='cudnn' runs only on NVIDIA GPUs, but the devices are tpu" in tpu.stderr
  gpu = run_aot(
      '--target=h200x1', '--config.model.attention_impl=cudnn', '--config.model.dtype=bfloat16'
  )
  assert gpu.returncode == 1
  assert 'cannot be compiled ahead of time on a host without a GPU' in gpu.stderr


ATTENTION_PROGRAM = textwrap.dedent("""
    import json, re, sys
    from capture_jax import accelerators, config as config_lib
    from capture_jax.training import sharding
    from capture_jax.retrieval import embedding as embeddings
    result = {}
    for name in ('h200x1', 'v4-8'):
      target = accelerators.target(name)
      devices = target.devices()
      for impl in ('xla', 'dot_product_attention'):
        cfg = config_lib.load_config_file(sys.argv[1])
        cfg.model.update(dtype='bfloat16', attention_impl=impl)
        cfg.data.eval_batch_size = 8
        step = embeddings.build_export_step(cfg, sharding.make_mesh(cfg.mesh, devices))
        text = step.lower().compile(dict(target.compiler_options)).as_text()
        result[f'{name}/{impl}'] = sorted(set(re.findall(r'custom_call_target="([^"]+)"', text)))
    print(json.dumps(result))
""")


@pytest.mark.slow
def test_what_each_attention_impl_compiles_to():
  """README's table: neither 'xla' nor 'dot_product_attention' (jax.nn with implementation=None)
  calls cuDNN's fused attention on an H200 at jax 0.10.2; both are XLA's own fusions around
  cuBLAS GEMMs, and plain XLA on TPU (no Pallas kernel)."""
  result = subprocess.run(
      [sys.executable, '-c', ATTENTION_PROGRAM, DEMO],
      capture_output=True,
      text=True,
      env=compilers_env(),
      cwd=REPO,
      timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  calls = json.loads(result.stdout.strip().splitlines()[-1])
  for impl in ('xla', 'dot_product_attention'):
    gpu = calls[f'h200x1/{impl}']
    assert not [c for c in gpu if re.search('cudnn|fmha', c)], gpu
    assert any('cublas' in c for c in gpu), gpu
    assert not [c for c in calls[f'v4-8/{impl}'] if 'tpu_custom_call' in c]


def test_cudnn_training_needs_even_sequence_lengths():
  from capture_jax.models import layers  # pylint: disable=import-outside-toplevel

  with pytest.raises(ValueError, match=r"\{'visual': 37, 'joint': 73\} are odd"):
    layers.check_attention_impl('cudnn', 'bfloat16', 'gpu', {'text': 36, 'visual': 37, 'joint': 73})
  with pytest.raises(ValueError, match='needs model.dtype'):
    layers.check_attention_impl('cudnn', 'float32', 'gpu')
  layers.check_attention_impl('cudnn', 'bfloat16', 'gpu', {'text': 36, 'visual': 36, 'joint': 72})
  layers.check_attention_impl('xla', 'float32', 'cpu', {'visual': 37})
