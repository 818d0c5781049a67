"""Export on 8 devices with the parameters tensor-sharded: the rows and ids are those of one device.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/multidevice/export_sharded.py CONFIG WORKDIR OUT

Exports the gallery of WORKDIR's latest checkpoint over a (data=2, fsdp=2,
tensor=2) mesh into OUT; the test compares OUT with a one-device export.
Prints OK.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import ml_collections  # noqa: E402

from capture_jax.retrieval import exporting  # noqa: E402


def main(config_json: str, workdir: str, out: str) -> None:
  with open(config_json, encoding='utf-8') as f:
    config = ml_collections.ConfigDict(json.load(f))
  assert jax.device_count() == 8, jax.devices()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  result = exporting.export(config, workdir, 'gallery', out=out, progress=False)
  assert result.written and result.metadata['devices'] == 8, result
  print('OK')


if __name__ == '__main__':
  main(*sys.argv[1:])
