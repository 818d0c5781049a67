"""Parameter sharding and the global batch on 8 simulated CPU devices.

Run by `tests/test_sharding.py` in its own process (the device count must be
set before JAX starts):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python tests/multidevice/sharding_check.py {specs,demo}

Prints one JSON object on its last line:

- `specs`: for the paper-size model (plain and `scan_layers=True`) and the
  meshes (8,1,1), (1,8,1), (2,2,2), (1,1,8): every parameter's path, shape,
  spec and the per-device shape JAX derives from a real `NamedSharding`
  (or the error it raised).
- `demo`: the demo model created directly in its (2,2,2) sharding with
  `jax.jit(init, out_shardings=...)`, its forward pass on the sharded
  parameters and batch versus the same parameters on one device,
  AdamW state shardings, and `global_batch_from_local`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from capture_jax import param_paths  # noqa: E402
from capture_jax import batch as batch_lib  # noqa: E402
from capture_jax import config as config_lib  # noqa: E402
from capture_jax.models import capture  # noqa: E402
from capture_jax.training import sharding  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 1, 8)]


def load_config(name: str):
  return config_lib.load_config_file(REPO / 'configs' / f'{name}.py')


def mesh_cfg(shape, **overrides):
  m = config_lib.mesh_config()
  m.data, m.fsdp, m.tensor = shape
  for k, v in overrides.items():
    m[k] = v
  return m


def abstract_params(model_cfg, batch_size=2):
  model = capture.CaptureModel(model_cfg)
  batch = batch_lib.BatchLayout.for_model(model_cfg, model_cfg.max_text_len, 4).dummy(batch_size)
  return jax.eval_shape(lambda r: capture.init_params(model, r, batch), jax.random.key(0))


def spec_json(spec: P) -> list:
  return [list(e) if isinstance(e, tuple) else e for e in spec]


def check_specs() -> dict:
  cfg = load_config('capture_paper')
  out = {}
  for scan in (False, True):
    cfg.model.scan_layers = scan
    params = abstract_params(cfg.model)
    for shape in MESHES:
      mc = mesh_cfg(shape)
      mesh = sharding.make_mesh(mc)
      specs = sharding.param_specs(params, mesh, mc)
      rows = []
      flat = jax.tree_util.tree_flatten_with_path(params)[0]
      flat_specs = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, P))
      for (path, leaf), spec in zip(flat, flat_specs):
        try:
          local = list(NamedSharding(mesh, spec).shard_shape(leaf.shape))
        except Exception as e:  # noqa: BLE001 - reported to the test
          local = f'{type(e).__name__}: {e}'
        rows.append(
            {
                'path': param_paths.path_str(path),
                'shape': list(leaf.shape),
                'spec': spec_json(spec),
                'local': local,
            }
        )
      out[f'{"scan" if scan else "plain"}/{shape}'] = rows
  return {'specs': out}


def rel_err(got, ref) -> float:
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))


def check_demo() -> dict:
  cfg = load_config('demo')
  m = cfg.model
  # Small thresholds so that FSDP shards the demo's (small) kernels too.
  mc = mesh_cfg((2, 2, 2), fsdp_min_size=1024)
  mesh = sharding.make_mesh(mc)
  model = capture.CaptureModel(m)
  regions = cfg.data.max_regions
  init_batch = batch_lib.BatchLayout.for_model(m, m.max_text_len, regions).dummy(2)
  init = lambda rng: capture.init_params(model, rng, init_batch)
  key = jax.random.key(0)
  abstract = jax.eval_shape(init, key)
  shardings = sharding.param_shardings(abstract, mesh, mc)

  params = jax.jit(init, out_shardings=shardings)(key)
  params_one = jax.device_get(params)  # the same values, for the one-device reference

  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_target = jax.tree_util.tree_leaves(shardings)
  placed, sharded_fsdp, sharded_tensor = [], 0, 0
  for (path, x), target in zip(flat, flat_target):
    placed.append(bool(x.sharding.is_equivalent_to(target, x.ndim)))
    local = x.addressable_shards[0].data.shape
    spec = target.spec
    sharded_fsdp += int('fsdp' in spec and local != x.shape)
    sharded_tensor += int('tensor' in spec and local != x.shape)

  rng = np.random.default_rng(0)
  b, t, r1 = 8, m.max_text_len, regions + 1
  input_mask = np.ones((b, t), np.int32)
  input_mask[:, t // 2 :] = rng.integers(0, 2, (b, t - t // 2))
  image_mask = np.ones((b, r1), np.int32)
  image_mask[:, r1 // 2 :] = rng.integers(0, 2, (b, r1 - r1 // 2))
  batch = {
      'input_ids': rng.integers(0, m.vocab_size, (b, t)).astype(np.int32),
      'input_mask': input_mask,
      'segment_ids': rng.integers(0, 2, (b, t)).astype(np.int32),
      'image_feat': rng.normal(size=(b, r1, m.v_feature_size)).astype(np.float32),
      'image_loc': rng.uniform(size=(b, r1, 5)).astype(np.float32),
      'image_mask': image_mask,
  }
  apply = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))
  global_batch = sharding.global_batch_from_local(batch, mesh)
  out = apply(params, global_batch)
  ref = apply(params_one, batch)  # numpy inputs: one device
  forward = {k: rel_err(out[k], ref[k]) for k in ref}
  out_devices = len(out['mlm_logits'].sharding.device_set)
  ref_devices = len(ref['mlm_logits'].sharding.device_set)

  # AdamW state created directly in the parameters' shardings.
  tx = optax.adamw(1e-3, weight_decay=0.01)
  abstract_state = jax.eval_shape(tx.init, abstract)
  state_shardings = sharding.state_shardings_like(abstract_state, abstract, shardings)
  state = jax.jit(tx.init, out_shardings=state_shardings)(params)
  param_spec = {param_paths.path_str(p): s.spec for (p, _), s in zip(flat, flat_target)}
  mirrored, mirrored_ok, others_replicated = 0, 0, True
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    name = param_paths.path_str(path)
    owner = [k for k in param_spec if name.endswith('/' + k)]
    if owner and ('/mu/' in f'/{name}' or '/nu/' in f'/{name}'):
      mirrored += 1
      mirrored_ok += int(leaf.sharding.spec == param_spec[max(owner, key=len)])
    else:
      others_replicated &= leaf.sharding.is_fully_replicated

  # global_batch_from_local in one process.
  local = {
      'a': np.arange(16 * 3, dtype=np.float32).reshape(16, 3),
      'b': np.arange(16, dtype=np.int32),
  }
  g = sharding.global_batch_from_local(local, mesh)
  gb = {
      'shapes': {k: list(v.shape) for k, v in g.items()},
      'sharding_ok': all(
          v.sharding.is_equivalent_to(sharding.batch_sharding(mesh), v.ndim) for v in g.values()
      ),
      'shard_rows': sorted({s.data.shape[0] for v in g.values() for s in v.addressable_shards}),
      'values_ok': all(np.array_equal(np.asarray(g[k]), local[k]) for k in local),
  }
  try:
    sharding.global_batch_from_local({'a': np.zeros((10, 3), np.float32)}, mesh)
    gb['indivisible_error'] = None
  except ValueError as e:
    gb['indivisible_error'] = str(e)

  return {
      'demo': {
          'num_params': len(flat),
          'placed': sum(placed),
          'sharded_fsdp': sharded_fsdp,
          'sharded_tensor': sharded_tensor,
          'forward_rel_err': forward,
          'out_devices': out_devices,
          'ref_devices': ref_devices,
          'opt_mirrored': mirrored,
          'opt_mirrored_ok': mirrored_ok,
          'opt_others_replicated': bool(others_replicated),
          'global_batch': gb,
      }
  }


if __name__ == '__main__':
  assert jax.device_count() == 8, jax.devices()
  part = sys.argv[1]
  result = {'specs': check_specs, 'demo': check_demo}[part]()
  print(json.dumps(result))
