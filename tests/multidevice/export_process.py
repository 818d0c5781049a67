"""One export process for the multi-process test: `exporting.export` of one split from a JSON config.

    CAPTURE_MAIN=tests/multidevice/export_process.py launch/local_multiprocess.sh 2 \
        CONFIG_JSON WORKDIR SPLIT ROWS OUT

Every process reads its strided share of the rows (p, p + n, ...); the rows
are put back in split order and process 0 writes the shards. Prints OK on
process 0.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from capture_jax.training import distributed  # noqa: E402

distributed.initialize()

import jax  # noqa: E402
import ml_collections  # noqa: E402

from capture_jax.retrieval import exporting  # noqa: E402


def main(config_json: str, workdir: str, split: str, rows: str, out: str) -> None:
  with open(config_json, encoding='utf-8') as f:
    config = ml_collections.ConfigDict(json.load(f))
  assert jax.process_count() == 2, jax.process_count()
  result = exporting.export(config, workdir, split, rows=rows, out=out, progress=False)
  assert result.metadata['processes'] == 2 and result.written, result.metadata
  if jax.process_index() == 0:
    print('OK')


if __name__ == '__main__':
  main(*sys.argv[1:])
