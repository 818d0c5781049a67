"""Per-device memory of the contrastive loss step, dense versus ring.

    python -m capture_jax.bench.contrastive [--kinds ntxent,clip,siglip]
        [--batches 8192,65536] [--dim 512] [--chunk 1024] [--devices 8 | --target v5e-256]

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

import os
import sys
import time
from collections.abc import Sequence

from absl import flags

from capture_jax import cli

# losses.CONTRASTIVE_KINDS, restated: importing capture_jax.losses would import JAX.
KINDS = ('ntxent', 'clip', 'siglip')


def _simulate_devices(n: int) -> None:
  xla_flags = os.environ.get('XLA_FLAGS', '')
  if '--xla_force_host_platform_device_count' not in xla_flags:
    os.environ['XLA_FLAGS'] = f'{xla_flags} --xla_force_host_platform_device_count={n}'.strip()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')


def _int_list(values: Sequence[str]) -> list[int]:
  return [int(v) for v in values]


def _are_positive_ints(values: Sequence[str]) -> bool:
  try:
    return bool(values) and all(v > 0 for v in _int_list(values))
  except ValueError:
    return False


def measure(
    kinds: Sequence[str],
    batches: Sequence[int],
    dim: int,
    chunk: int,
    num_devices: int,
    target: str = '',
) -> None:
  """Compiles each variant for each kind and global batch; prints one row each. With `target`
  (`accelerators.target`), for that target's compile-only devices instead."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  from capture_jax import config as config_lib
  from capture_jax import losses
  from capture_jax.training.contrastive import global_contrastive_loss

  from capture_jax import accelerators

  options = {}
  if target:
    spec = accelerators.target(target)
    devices, num_devices, options = spec.devices(), spec.num_devices, dict(spec.compiler_options)
  else:
    devices = jax.devices()[:num_devices]
  if len(devices) < num_devices:
    raise SystemExit(f'need {num_devices} devices, found {len(jax.devices())}')
  mesh = Mesh(np.array(devices).reshape(len(devices), 1, 1), ('data', 'fsdp', 'tensor'))
  rows = NamedSharding(mesh, P(('data', 'fsdp'), None))
  replicated = NamedSharding(mesh, P())
  mib = 2.0**20

  print(
      f'# {len(devices)} x {devices[0].platform} devices ({devices[0].device_kind}), D = {dim}, '
      f'float32; per-device MiB of the compiled forward+backward; jax {jax.__version__}'
  )
  print(
      f'{"kind":7} {"global B":>9} {"local B":>8} {"variant":16} {"temp":>10} {"args":>8} {"output":>8} '
      f'{"compile s":>9}'
  )
  for kind in kinds:
    for gb in batches:
      cfg = config_lib.loss_config()
      cfg.contrastive = kind
      params = losses.init_loss_params(cfg)
      spec_params = jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), params
      )
      vec = jax.ShapeDtypeStruct((gb, dim), jnp.float32, sharding=rows)
      variants = [('dense', None), ('ring chunk=0', 0), (f'ring chunk={chunk}', chunk)]
      for name, block in variants:
        c = cfg.copy_and_resolve_references()
        if block is None:
          loss = lambda t, v, p, c=c: losses.contrastive_loss(t, v, c, p)
        else:
          c.contrastive_chunk = block
          loss = lambda t, v, p, c=c: global_contrastive_loss(t, v, c, p, mesh)
        step = jax.jit(
            jax.value_and_grad(loss, argnums=(0, 1, 2)),
            out_shardings=(replicated, (rows, rows, jax.tree.map(lambda _: replicated, params))),
        )
        start = time.perf_counter()
        compiled = step.lower(vec, vec, spec_params).compile(options)
        seconds = time.perf_counter() - start
        m = compiled.memory_analysis()
        print(
            f'{kind:7} {gb:9d} {gb // len(devices):8d} {name:16} {m.temp_size_in_bytes / mib:10.1f} '
            f'{m.argument_size_in_bytes / mib:8.1f} {m.output_size_in_bytes / mib:8.1f} {seconds:9.1f}',
            flush=True,
        )


def define_flags() -> dict[str, flags.FlagHolder]:
  """The command's flags (defined when the command runs, not on import)."""
  args = {
      'kinds': flags.DEFINE_list('kinds', list(KINDS), 'Comma-separated contrastive losses.'),
      'batches': flags.DEFINE_list(
          'batches', ['8192', '65536'], 'Comma-separated global batch sizes.'
      ),
      'dim': flags.DEFINE_integer(
          'dim', 512, "Embedding width (the paper's pooler width, bi_hidden_size)."
      ),
      'chunk': flags.DEFINE_integer('chunk', 1024, 'Keys per block of the chunked ring variant.'),
      'target': flags.DEFINE_string(
          'target', '', 'Compile for this accelerator target instead (e.g. v5e-256; needs .[aot]).'
      ),
      'devices': flags.DEFINE_integer(
          'devices',
          8,
          'Devices to shard over (simulated CPU devices when JAX is not yet imported).',
      ),
  }
  flags.register_validator(
      'kinds',
      lambda v: bool(v) and set(v) <= set(KINDS),
      message=f'--kinds takes a comma-separated subset of {",".join(KINDS)}',
  )
  flags.register_validator(
      'batches', _are_positive_ints, message='--batches takes comma-separated positive integers'
  )
  return args


def main(args: dict[str, flags.FlagHolder]) -> None:
  target, num_devices = args['target'].value, args['devices'].value
  if 'jax' not in sys.modules and not target:
    _simulate_devices(num_devices)
  measure(
      args['kinds'].value,
      _int_list(args['batches'].value),
      args['dim'].value,
      args['chunk'].value,
      num_devices,
      target,
  )


def console_main() -> None:
  """`python -m capture_jax.bench.contrastive`. JAX is imported only after the flags are read
  (`--devices` simulates CPU devices)."""
  args = define_flags()
  cli.run(lambda argv: main(args))


if __name__ == '__main__':
  console_main()
