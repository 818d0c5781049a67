"""Per-device memory of the contrastive loss step, dense versus ring.

    python -m capture_jax.bench.contrastive [--kinds ntxent,clip,siglip]
        [--batches 8192,65536] [--dim 512] [--chunk 1024] [--devices 8]

Compiles (without running) the forward and backward pass of the contrastive
loss w.r.t. text, visual and the loss parameters, with the global batch
sharded over the devices, and prints the per-device temp / argument / output
bytes from `compiled.memory_analysis()`:

- dense: `losses.contrastive_loss` under jit on the sharded batch (XLA builds
  the global similarity matrix);
- ring: `training.contrastive.global_contrastive_loss` with one block per
  device (`contrastive_chunk=0`) and with `--chunk` keys per block.

Without an accelerator it simulates `--devices` CPU devices (XLA_FLAGS is set
before JAX is imported).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _simulate_devices(n: int) -> None:
  flags = os.environ.get('XLA_FLAGS', '')
  if '--xla_force_host_platform_device_count' not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={n}'.strip()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--kinds', default='ntxent,clip,siglip')
  p.add_argument('--batches', default='8192,65536')
  p.add_argument('--dim', type=int, default=512)  # the paper's pooler width (bi_hidden_size)
  p.add_argument('--chunk', type=int, default=1024)
  p.add_argument('--devices', type=int, default=8)
  return p.parse_args(argv)


def main(argv=None) -> None:
  args = _parse(argv)
  if 'jax' not in sys.modules:
    _simulate_devices(args.devices)

  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  from capture_jax import config as config_lib
  from capture_jax import losses
  from capture_jax.training.contrastive import global_contrastive_loss

  devices = jax.devices()[: args.devices]
  if len(devices) < args.devices:
    raise SystemExit(f'need {args.devices} devices, found {len(jax.devices())}')
  mesh = Mesh(np.array(devices).reshape(len(devices), 1, 1), ('data', 'fsdp', 'tensor'))
  rows = NamedSharding(mesh, P(('data', 'fsdp'), None))
  replicated = NamedSharding(mesh, P())
  mib = 2.0**20

  print(
      f'# {len(devices)} x {devices[0].platform} devices ({devices[0].device_kind}), D = {args.dim}, '
      f'float32; per-device MiB of the compiled forward+backward; jax {jax.__version__}'
  )
  print(
      f'{"kind":7} {"global B":>9} {"local B":>8} {"variant":16} {"temp":>10} {"args":>8} {"output":>8} '
      f'{"compile s":>9}'
  )
  for kind in args.kinds.split(','):
    for gb in [int(b) for b in args.batches.split(',')]:
      cfg = config_lib.loss_config()
      cfg.contrastive = kind
      params = losses.init_loss_params(cfg)
      spec_params = jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), params
      )
      vec = jax.ShapeDtypeStruct((gb, args.dim), jnp.float32, sharding=rows)
      variants = [('dense', None), ('ring chunk=0', 0), (f'ring chunk={args.chunk}', args.chunk)]
      for name, chunk in variants:
        c = cfg.copy_and_resolve_references()
        if chunk is None:
          loss = lambda t, v, p, c=c: losses.contrastive_loss(t, v, c, p)
        else:
          c.contrastive_chunk = chunk
          loss = lambda t, v, p, c=c: global_contrastive_loss(t, v, c, p, mesh)
        step = jax.jit(
            jax.value_and_grad(loss, argnums=(0, 1, 2)),
            out_shardings=(replicated, (rows, rows, jax.tree.map(lambda _: replicated, params))),
        )
        start = time.perf_counter()
        compiled = step.lower(vec, vec, spec_params).compile()
        seconds = time.perf_counter() - start
        m = compiled.memory_analysis()
        print(
            f'{kind:7} {gb:9d} {gb // len(devices):8d} {name:16} {m.temp_size_in_bytes / mib:10.1f} '
            f'{m.argument_size_in_bytes / mib:8.1f} {m.output_size_in_bytes / mib:8.1f} {seconds:9.1f}',
            flush=True,
        )


if __name__ == '__main__':
  main()
