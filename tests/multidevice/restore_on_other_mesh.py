"""Saved on 8 devices, restored on 4 and on 1: the checkpointed state is the same wherever it lands.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/multidevice/restore_on_other_mesh.py CONFIG WORKDIR

Trains 2 steps with the parameters FSDP-sharded over 8 devices, then restores
the latest checkpoint onto a (data=2, fsdp=2) mesh of 4 devices and onto 1
device, and checks every leaf against the trained state. Prints OK.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from capture_jax import train  # noqa: E402
from capture_jax.training import state as state_lib  # noqa: E402
from capture_jax.training import checkpoint as checkpoint_lib  # noqa: E402
from capture_jax.training import sharding  # noqa: E402


def restore_on(config, workdir, devices, mesh_shape):
  config = config.copy_and_resolve_references()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh_shape
  mesh = sharding.make_mesh(config.mesh, devices)
  _, _, abstract_state, shardings = state_lib.train_state_layout(config, mesh)
  manager = checkpoint_lib.make_manager(workdir, config.checkpoint)
  state, step = checkpoint_lib.restore_latest(
      manager, sharding.abstract_with_shardings(abstract_state, shardings), None
  )
  manager.close()
  return state, step


def main(config_json: str, workdir: str) -> None:
  with open(config_json, encoding='utf-8') as f:
    config = ml_collections.ConfigDict(json.load(f))
  config.mesh.update(data=1, fsdp=8, tensor=1, fsdp_min_size=64)
  trained = train.run(config, workdir, stop_after_steps=2).state
  sharded = [l.sharding.spec for l in jax.tree.leaves(trained.params) if any(l.sharding.spec)]
  assert sharded, 'nothing was sharded over fsdp: the test would prove nothing'
  expected = jax.tree.map(np.asarray, jax.device_get(trained))
  for devices, shape in ((jax.devices()[:4], (2, 2, 1)), (jax.devices()[:1], (1, 1, 1))):
    state, step = restore_on(config, workdir, devices, shape)
    assert step == 2, step
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(expected)):
      assert {d.id for d in a.sharding.device_set} <= {d.id for d in devices}, jax.tree_util.keystr(
          path
      )
      np.testing.assert_array_equal(np.asarray(a), b, err_msg=jax.tree_util.keystr(path))
  print('OK')


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2])
