"""Pod processes decide together: a read error on one process only does not send the processes
of a job down different paths (`distributed.decide_on_main`). Two real processes (Gloo on CPU)
run `tests/multidevice/decide_process.py`, with the error injected on process 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import portpicker

from tests.helpers import without_compile_cache
from tests.helpers import without_device_count

REPO = Path(__file__).resolve().parents[1]


def test_a_read_error_on_one_process_leaves_both_on_process_0s_decisions(tmp_path):
  env = without_compile_cache(
      without_device_count(
          {k: v for k, v in os.environ.items() if not k.startswith(('CAPTURE_', 'SLURM_'))}
      )
  )
  env.update(
      PYTHON=sys.executable,
      CAPTURE_MAIN=str(REPO / 'tests' / 'multidevice' / 'decide_process.py'),
      CAPTURE_DEVICES_PER_PROCESS='1',
      CAPTURE_PORT=str(portpicker.pick_unused_port()),
  )
  proc = subprocess.run(
      [str(REPO / 'launch' / 'local_multiprocess.sh'), '2', str(tmp_path)],
      env=env,
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  p0, p1 = (json.loads((tmp_path / f'process_{i}.json').read_text()) for i in range(2))
  # Process 1 could not list storage: both restored step 2, verified on process 0 (no 'note:
  # ... restored without verifying it'), each its own shard of the array.
  assert p0['listing'] == {'step': 2, 'local': [[20.0, 21.0]]}
  assert p1['listing'] == {'step': 2, 'local': [[22.0, 23.0]]}
  assert 'without verifying' not in proc.stdout
  # Step 2 corrupt, process 1 still blind: both fell back to step 1.
  assert p0['corrupt']['step'] == p1['corrupt']['step'] == 1
  assert proc.stdout.count('checksum differs from checksums.json') == 2  # reported by both
  # The helper: process 0's value everywhere, and its error as the same class.
  assert p0['decide_value'] == p1['decide_value'] == {'from': 0}
  assert p0['decide_error'] == ['FileNotFoundError', 'no such shard']
  assert p1['decide_error'] == ['FileNotFoundError', 'no such shard (decided on process 0)']
