"""One trainer process for the multi-process test: `train.run` for a few steps from a JSON config.

    python tests/multidevice/train_process.py CONFIG_JSON WORKDIR STEPS

Started once with 4 CPU devices, and as 2 processes x 2 devices through
`launch/local_multiprocess.sh` (Gloo collectives); process 0 writes
`WORKDIR/metrics.jsonl`.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from capture_jax.training import distributed  # noqa: E402

distributed.initialize()

import ml_collections  # noqa: E402

from capture_jax import train  # noqa: E402


def main(config_json: str, workdir: str, steps: int) -> None:
  with open(config_json, encoding='utf-8') as f:
    config = ml_collections.ConfigDict(json.load(f))
  train.run(config, workdir, stop_after_steps=steps)


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
