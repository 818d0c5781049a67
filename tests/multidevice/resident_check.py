"""The resident gather on 8 simulated CPU devices, against numpy indexing.

Run by `tests/test_resident.py` in its own process (the device count must be set before JAX
starts). For the meshes (8,1,1), (2,2,2), (1,2,4) and (1,1,8): tables of float16 (negative
zeros and NaN payloads included), bfloat16, float32, int32 and uint8 rows are loaded with
`load_tables` and gathered with `gather_rows` inside `jit`; prints one JSON line per mesh with
whether every row arrived bit for bit and the output's sharding.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from capture_jax.training import resident  # noqa: E402
from capture_jax.training import sharding  # noqa: E402

NUM_RECORDS = 37  # not a multiple of 8: the tables carry padding rows


def make_rows(num: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  feat = rng.normal(size=(num, 3, 4)).astype(np.float16)
  feat[0, 0, 0] = np.float16(-0.0)
  feat[1, 0, 1] = np.frombuffer(np.uint16(0x7E01).tobytes(), np.float16)[0]  # a NaN payload
  return {
      'feat': feat,
      'feat_bf16': rng.normal(size=(num, 2)).astype(jax.numpy.bfloat16),
      'loc': rng.normal(size=(num, 3, 5)).astype(np.float32),
      'ids': rng.integers(-5, 1000, size=(num, 6)).astype(np.int32),
      'mask': rng.integers(0, 2, size=(num, 3)).astype(np.uint8),
  }


def main() -> None:
  rows = make_rows(NUM_RECORDS)
  spec = {k: (v.shape[1:], v.dtype) for k, v in rows.items()}
  reads = []

  def read_rows(start, stop):
    reads.append((start, stop))
    return {k: v[start:stop] for k, v in rows.items()}

  for shape in ((8, 1, 1), (2, 2, 2), (1, 2, 4), (1, 1, 8)):
    cfg = ml_collections.ConfigDict(dict(zip(sharding.MESH_AXES, shape)))
    mesh = sharding.make_mesh(cfg, jax.devices())
    reads.clear()
    tables = resident.load_tables(read_rows, spec, NUM_RECORDS, mesh, chunk=3)
    batch = 8 * shape[0] * shape[1]  # a multiple of the batch devices
    indices = np.random.default_rng(1).integers(0, NUM_RECORDS, batch).astype(np.int32)
    indices[:2] = [0, 1]  # the negative zero and the NaN
    gathered = jax.jit(lambda t, i, m=mesh: resident.gather_rows(t, i, m))(tables, indices)
    same = {
        k: bool(
            np.array_equal(np.asarray(gathered[k]).view(np.uint8), rows[k][indices].view(np.uint8))
        )
        for k in rows
    }
    print(
        json.dumps(
            {
                'mesh': shape,
                'bitwise': same,
                'table_rows': int(tables['feat'].shape[0]),
                'per_device_rows': int(tables['feat'].addressable_shards[0].data.shape[0]),
                'out_spec': str(gathered['feat'].sharding.spec),
                'records_read': sorted({r for a, b in reads for r in range(a, b)})
                == list(range(NUM_RECORDS)),
                'bytes_per_device': resident.bytes_per_device(spec, NUM_RECORDS, mesh),
            }
        ),
        flush=True,
    )


if __name__ == '__main__':
  main()
