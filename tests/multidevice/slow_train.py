"""`python -m capture_jax.train` with slowed input, so that a test can stop a job mid-run.

    CAPTURE_MAIN=tests/multidevice/slow_train.py sbatch launch/slurm_gpu.sbatch --config=... --workdir=...

Each batch takes at least `CAPTURE_TEST_BATCH_DELAY_S` (default 0.3 s) to read; the batches are
unchanged, so a run resumed without the delay ends bitwise where an uninterrupted one does.
Every process prints `RESULT process I step S preempted P` when the run returns (the trainer
itself reports on process 0 only).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

# This checkout's capture_jax (a script's own folder, not the cwd, heads sys.path).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax  # noqa: E402

from capture_jax import train  # noqa: E402
from capture_jax.data import train_input  # noqa: E402

DELAY_S = float(os.environ.get('CAPTURE_TEST_BATCH_DELAY_S', '0.3'))
_load = train_input._TrainBatchLoader.__call__  # pylint: disable=protected-access
_run = train.run


def _slow_load(self, batch_index):
  time.sleep(DELAY_S)
  return _load(self, batch_index)


def _run_and_report(*args, **kwargs):
  result = _run(*args, **kwargs)
  print(
      f'RESULT process {jax.process_index()} step {int(result.state.step)} '
      f'preempted {result.preempted}',
      flush=True,
  )
  return result


if __name__ == '__main__':
  train_input._TrainBatchLoader.__call__ = _slow_load  # pylint: disable=protected-access
  train.run = _run_and_report  # what train.main calls
  train.console_main()
