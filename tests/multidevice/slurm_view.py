"""One task's view of its SLURM job, for tests/test_slurm.py: what launch/slurm_gpu.sbatch told
it, what JAX's own SLURM detection finds, and what `distributed.resolve` plans from SLURM's
variables alone. Prints `VIEW {json}`; starts no JAX backend.

    CAPTURE_MAIN=tests/multidevice/slurm_view.py sbatch launch/slurm_gpu.sbatch ARGS...

With `CAPTURE_TEST_AWAIT_SIGTERM_S=S` it then waits up to S seconds for a SIGTERM (the warning
of `sbatch --signal=TERM@...` before the time limit) and prints `SIGTERM {json}` with the
seconds it came after the start (null if it did not).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

# First, so that a signal during the slow imports below is counted rather than fatal.
STARTED = time.monotonic()
TERM_AT: list[float] = []
signal.signal(signal.SIGTERM, lambda *_: TERM_AT.append(time.monotonic() - STARTED))

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's capture_jax

from jax._src.clusters import slurm_cluster  # noqa: E402

from capture_jax.training import distributed  # noqa: E402


def main() -> None:
  jax_slurm = slurm_cluster.SlurmCluster
  slurm_only = {k: v for k, v in os.environ.items() if not k.startswith('CAPTURE_')}
  plan = distributed.resolve({**slurm_only, 'CAPTURE_CLUSTER': 'slurm'})
  view = {
      'argv': sys.argv[1:],
      'script': {
          k: os.environ.get(f'CAPTURE_{k.upper()}')
          for k in ('coordinator', 'num_processes', 'process_id', 'local_device_ids')
      },
      'jax': {
          'present': jax_slurm.is_env_present(),
          'coordinator': jax_slurm.get_coordinator_address(None, None),
          'num_processes': jax_slurm.get_process_count(),
          'process_id': jax_slurm.get_process_id(),
          'local_process_id': jax_slurm.get_local_process_id(),
      },
      'plan': [plan.method, plan.num_processes, plan.process_id, plan.local_device_ids],
  }
  print('VIEW ' + json.dumps(view), flush=True)
  wait_s = float(os.environ.get('CAPTURE_TEST_AWAIT_SIGTERM_S', '0'))
  while not TERM_AT and time.monotonic() - STARTED < wait_s:
    time.sleep(0.1)
  if wait_s:
    got = {'process_id': view['jax']['process_id'], 'after_s': TERM_AT[0] if TERM_AT else None}
    print('SIGTERM ' + json.dumps(got), flush=True)


if __name__ == '__main__':
  main()
