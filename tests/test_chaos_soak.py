"""The chaos soak (`tests/chaos_soak.py`, issue #37): its comparisons, the proxy's random mode,
and a small soak end to end (3 kill -9 under random faults, resumed to the same bytes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from capture_jax import storage
from tests import chaos_soak
from tests.gcs_proxy import RandomFaults
from tests.test_gcs_faults import faults  # pylint: disable=unused-import
from tests.test_gcs_faults import gs
from tests.test_gcs_faults import proxy  # pylint: disable=unused-import


def test_metrics_compare_every_field_but_the_wall_clock():
  row = {'step': 1, 'time': 1.0, 'loss/total': 0.1, 'step_time_s': 2.0, 'mfu': 0.3}
  other = {**row, 'time': 5.0, 'step_time_s': 9.0, 'mfu': 0.4, 'samples_per_s': 3.0}
  line = lambda r: json.dumps(r) + '\n'
  assert chaos_soak.metrics_differences(line(row), line(other)) == []
  # One ulp off in a loss is a difference; so is a missing row.
  off = {**row, 'loss/total': float(np.nextafter(0.1, 1.0))}
  assert len(chaos_soak.metrics_differences(line(row), line(off))) == 1
  assert chaos_soak.metrics_differences(line(row) * 2, line(row)) == ['2 rows vs 1 rows']


def test_state_compare_finds_one_flipped_bit():
  a = {'params': {'w': np.arange(6, dtype=np.float32).reshape(2, 3)}, 'step': np.int32(4)}
  b = jax.tree.map(np.copy, a)
  assert chaos_soak.state_differences(a, b) == []
  b['params']['w'].view(np.uint32)[1, 2] ^= 1
  assert chaos_soak.state_differences(a, b) == ["['params']['w']: float32(2, 3) vs float32(2, 3)"]
  assert chaos_soak.state_differences(a, {'params': a['params']})[0].startswith('tree structure')


def test_random_faults_are_seeded_and_counted():
  draws = lambda seed: [
      (f.kind, f.status) if (f := r.draw('GET', '/x')) else None
      for r in [RandomFaults(0.3, seed=seed)]
      for _ in range(200)
  ]
  assert draws(1) == draws(1) != draws(2)
  r = RandomFaults(0.3, seed=1, path='data')
  assert all(r.draw('GET', '/other') is None for _ in range(100))
  assert sum(r.draw('GET', '/data') is not None for _ in range(1000)) == sum(r.counts.values())
  assert 200 < sum(r.counts.values()) < 400 and set(r.counts) == {
      '503',
      '429',
      '500',
      'reset',
      'lost',
  }
  with pytest.raises(ValueError, match='kinds'):
    RandomFaults(0.1, kinds=('504',))


@pytest.mark.slow
def test_reads_and_writes_under_random_faults_keep_their_bytes(faults, monkeypatch):
  """Random mode through the real clients: every object written and read back whole while
  a third of the requests on it fail (503/429/500, resets, lost answers).

  12 tries per request here, not the module's 3: which request gets which draw depends on
  timing (a lost answer or a slow one adds requests), so the seed does not fix the sequence, and
  at 3 tries an operation fails outright with p = 0.3^3 = 2.7% (it did once in a full-suite run:
  three resets on one upload). At 12, p = 5e-7 per operation, ~2e-5 for the test's ~30."""
  monkeypatch.setattr(storage, 'RETRIES', 12)
  random_faults = RandomFaults(0.3, seed=3, path=r'random-mode/')
  faults.randomly(random_faults)
  try:
    for i in range(10):
      data = bytes([i]) * (1000 + i)
      path = storage.as_path(gs(f'random-mode/{i}.bin'))
      storage.write_bytes(path, data)
      assert path.read_bytes() == data
    assert sorted(storage.file_listing(storage.as_path(gs('random-mode')))) == [
        f'{i}.bin' for i in range(10)
    ]
  finally:
    faults.randomly(None)
  assert sum(random_faults.counts.values()) >= 5, faults.log[-20:]


@pytest.mark.slow
def test_three_kills_under_random_faults_resume_to_the_same_bytes():
  """The soak, small: 3 kill -9 (start-up, steps, saves) under 2% random faults; the final train
  state and metrics.jsonl equal the uninterrupted run's (the 20-kill figures: RELIABILITY.md)."""
  pytest.importorskip('gcp_storage_emulator')
  command = [sys.executable, '-m', 'tests.chaos_soak', '--kills=3', '--seed=0']
  command += ['--fault_rate=0.02', f'--compile_cache={jax.config.jax_compilation_cache_dir}']
  proc = subprocess.run(
      command, cwd=chaos_soak.REPO, capture_output=True, text=True, timeout=1500, env=os.environ
  )
  out = proc.stdout + proc.stderr[-3000:]
  assert proc.returncode == 0, out
  assert 'kill -9: 3 of 3 asked' in out and 'bitwise equal to the uninterrupted run' in out, out
