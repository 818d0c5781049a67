"""One process of the 2-process test: `jax.distributed` start-up, a mesh over both processes, collectives.

Started by `tests/test_sharding.py` through `launch/local_multiprocess.sh`
(CPU devices, Gloo collectives):

    CAPTURE_MAIN=tests/multidevice/sharding_two_process.py CAPTURE_DEVICES_PER_PROCESS=2 \
        launch/local_multiprocess.sh 2 OUT_DIR

Each process feeds only its share of a global batch of 8 rows (process p:
rows 4p .. 4p+3, row r holding the value r), builds the (data=2, fsdp=2,
tensor=1) mesh over the 4 devices of both processes, and computes a
cross-process sum (jit and shard_map's psum) and an all-gather of the batch.
Writes `OUT_DIR/process_{id}.json`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from capture_jax.training import distributed  # noqa: E402

plan = distributed.initialize()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from capture_jax import config as config_lib  # noqa: E402
from capture_jax.training import sharding  # noqa: E402


def main(out_dir: Path) -> None:
  mc = config_lib.mesh_config()
  mc.fsdp = 2  # data = -1 -> 2
  mesh = sharding.make_mesh(mc)
  pid = jax.process_index()
  rows = np.arange(4 * pid, 4 * pid + 4, dtype=np.float32)
  local = {'x': rows[:, None] * np.ones((1, 3), np.float32), 'ids': rows.astype(np.int32)}
  batch = sharding.global_batch_from_local(local, mesh)
  replicated = sharding.replicated(mesh)

  total = jax.jit(lambda b: jnp.sum(b['x']), out_shardings=replicated)(batch)
  psum = jax.shard_map(
      lambda x: jax.lax.psum(jnp.sum(x), sharding.BATCH_AXES),
      mesh=mesh,
      in_specs=P(sharding.BATCH_AXES),
      out_specs=P(),
  )(batch['x'])
  gathered = jax.jit(lambda b: b['ids'], out_shardings=replicated)(batch)
  result = {
      'plan': plan.method,
      'process_index': pid,
      'process_count': jax.process_count(),
      'device_count': jax.device_count(),
      'local_device_count': jax.local_device_count(),
      'is_main': distributed.is_main_process(),
      'mesh': dict(mesh.shape),
      'global_shape': list(batch['x'].shape),
      'sum': float(np.asarray(total.addressable_data(0))),
      'psum': float(np.asarray(psum.addressable_data(0))),
      'gathered': np.asarray(gathered.addressable_data(0)).tolist(),
      'summary': distributed.process_summary(),
  }
  (out_dir / f'process_{pid}.json').write_text(json.dumps(result))
  print(json.dumps(result))


if __name__ == '__main__':
  main(Path(sys.argv[1]))
