"""One trainer process of the two-process preemption test, with the loop's transfer guard on.

    python tests/multidevice/preempt_process.py CONFIG_JSON WORKDIR STOP_AFTER_STEPS OUT_NPZ

`train.BETWEEN_SYNC_POINTS = helpers.no_device_fetches`: a device-to-host
fetch on a step between the logging / skip-check / checkpoint points raises. Each batch takes at least `CAPTURE_TEST_BATCH_DELAY_S` (default
0.05 s) to read, so that a test can signal a run before it ends (the batches
are unchanged). Prints `RESULT {"step": ..., "preempted": ...}`; process 0
writes the final parameters (gathered) to OUT_NPZ.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from capture_jax.training import distributed  # noqa: E402

distributed.initialize()

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from capture_jax import train  # noqa: E402
from capture_jax.data import train_input  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests import helpers  # noqa: E402

DELAY_S = float(os.environ.get('CAPTURE_TEST_BATCH_DELAY_S', '0.05'))
_load = train_input._TrainBatchLoader.__call__  # pylint: disable=protected-access


def _slow_load(self, batch_index):
  time.sleep(DELAY_S)
  return _load(self, batch_index)


def main(config_json: str, workdir: str, steps: int, out_npz: str) -> None:
  with open(config_json, encoding='utf-8') as f:
    config = ml_collections.ConfigDict(json.load(f))
  train_input._TrainBatchLoader.__call__ = _slow_load  # pylint: disable=protected-access
  train.BETWEEN_SYNC_POINTS = helpers.no_device_fetches
  result = train.run(config, workdir, stop_after_steps=steps)
  flat = jax.tree_util.tree_leaves_with_path(result.state.params)
  gathered = multihost_utils.process_allgather([x for _, x in flat], tiled=True)
  if jax.process_index() == 0:
    np.savez(
        out_npz, **{jax.tree_util.keystr(p): np.asarray(x) for (p, _), x in zip(flat, gathered)}
    )
  print('RESULT ' + json.dumps({'step': int(result.state.step), 'preempted': result.preempted}))


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
