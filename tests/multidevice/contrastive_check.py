"""Global-batch contrastive loss on simulated CPU meshes versus the dense loss on one device.

Run by `tests/test_contrastive_global.py` in its own process (it needs 8 host
devices, which must be configured before JAX starts):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python tests/multidevice/contrastive_check.py [--chunks 0,4]

Prints one JSON object: for every (mesh, kind, chunk) case the relative errors
of the loss and of the gradients w.r.t. text, visual and each loss parameter,
plus a control showing that a per-device (local-batch) loss differs from the
global one, so that equality is not an accident of the data.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from capture_jax import config as config_lib  # noqa: E402
from capture_jax import losses  # noqa: E402
from capture_jax.training.contrastive import global_contrastive_loss  # noqa: E402

GB, D = 64, 32
MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]
CHUNKS = [0, 4]
AXES = ('data', 'fsdp', 'tensor')


def loss_setup(kind, chunk=0):
  """The loss config and parameters of `kind` (shared with tests/test_contrastive_global.py)."""
  cfg = config_lib.loss_config()
  cfg.contrastive = kind
  cfg.contrastive_chunk = chunk
  params = losses.init_loss_params(cfg)
  # Away from the initial values so that every term matters.
  if kind == 'clip':
    params = {'log_inv_temperature': jnp.float32(2.3)}
  if kind == 'siglip':
    params = {'log_inv_temperature': jnp.float32(np.log(5.0)), 'bias': jnp.float32(-2.0)}
  return cfg, params


def rel_err(got, ref) -> float:
  """max |got - ref| / max |ref| over the array (a scalar's plain relative error).

  Relative to the array's scale rather than entry by entry: the gradient of
  the L2 normalisation cancels in some entries, where float32 loses digits in
  the dense reference itself (~6e-5 entrywise from a float64 computation).
  """
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))


def errors(got, ref) -> dict[str, float]:
  (loss_g, (dt_g, dv_g, dp_g)), (loss_r, (dt_r, dv_r, dp_r)) = got, ref
  out = {
      'loss': rel_err(loss_g, loss_r),
      'd_text': rel_err(dt_g, dt_r),
      'd_visual': rel_err(dv_g, dv_r),
  }
  for k in dp_r:
    out[f'd_{k}'] = rel_err(dp_g[k], dp_r[k])
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--chunks', default=','.join(map(str, CHUNKS)))
  chunks = [int(c) for c in parser.parse_args().chunks.split(',')]
  assert len(jax.devices()) == 8, jax.devices()
  kt, kv = jax.random.split(jax.random.key(0))
  text = jax.random.normal(kt, (GB, D), jnp.float32)
  visual = jax.random.normal(kv, (GB, D), jnp.float32) + 0.5 * text  # correlated pairs
  result = {'cases': [], 'controls': {}, 'errors_raised': []}
  for kind in losses.CONTRASTIVE_KINDS:
    cfg, params = loss_setup(kind)
    dense = jax.jit(
        jax.value_and_grad(
            lambda t, v, p, c=cfg: losses.contrastive_loss(t, v, c, p), argnums=(0, 1, 2)
        )
    )
    ref = jax.device_get(dense(text, visual, params))
    # Control: the mean of per-device losses on 8 local batches is not the global loss.
    local = np.mean(
        [float(losses.contrastive_loss(text[i::8], visual[i::8], cfg, params)) for i in range(8)]
    )
    result['controls'][kind] = {'global': float(ref[0]), 'mean_of_local': float(local)}
    for shape in MESHES:
      mesh = Mesh(np.array(jax.devices()).reshape(shape), AXES)
      rows = NamedSharding(mesh, P(('data', 'fsdp'), None))
      t, v = jax.device_put(text, rows), jax.device_put(visual, rows)
      p = jax.device_put(params, NamedSharding(mesh, P()))
      for chunk in chunks:
        c = cfg.copy_and_resolve_references()
        c.contrastive_chunk = chunk
        step = jax.jit(
            jax.value_and_grad(
                lambda t, v, p, c=c, mesh=mesh: global_contrastive_loss(t, v, c, p, mesh),
                argnums=(0, 1, 2),
            )
        )
        got = jax.device_get(step(t, v, p))
        result['cases'].append(
            {'mesh': list(shape), 'kind': kind, 'chunk': chunk, **errors(got, ref)}
        )
  # Bad shapes are refused with a clear error.
  mesh = Mesh(np.array(jax.devices()).reshape(8, 1, 1), AXES)
  cfg, params = loss_setup('clip')
  try:
    global_contrastive_loss(text[:60], visual[:60], cfg, params, mesh)
  except ValueError as e:
    result['errors_raised'].append(str(e))
  print(json.dumps(result))


if __name__ == '__main__':
  main()
