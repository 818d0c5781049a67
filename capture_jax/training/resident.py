"""A training split resident in device memory, its batches gathered by index inside `jit`.

In the host mode every step's records are read, decoded and copied to the
devices. In the resident mode (`data.resident`) the split's rows (the
per-record part of the host batch: features in their storage dtype, boxes,
masks, token ids) are loaded into device memory once, sharded over every
device of the mesh by record, and each step hands the devices only the
global batch's record indices (the epoch permutation of the host mode,
`train_input.ShuffledIndices`, so both modes train on the same records at
the same stream positions).

The gather (`gather_rows`) runs under `shard_map`: every device takes the
batch rows it owns from its shard of the table (zeros for the others) and a
`psum_scatter` over the batch axes leaves each device its slice of the
batch, summed over `tensor`. The sums are of bit patterns (the rows are
bitcast to unsigned integers of their width), so a row arrives bit for bit,
negative zeros included. Its traffic is the global batch's rows per device
and step (`gather_bytes_per_device`); `docs/BENCHMARKS.md` ("The input
against the accelerator") sets it against the step.

    table [N_pad, ...] sharded P(('data', 'fsdp', 'tensor'))   (every device: N_pad / D rows)
    indices [B] int32, replicated                               (the step's records)
      -> rows [B, ...] sharded P(('data', 'fsdp'))              (the host batch's layout)
"""

from __future__ import annotations

import math
import os
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from capture_jax.training import sharding

# Rows are sharded over every mesh axis: a table's bytes are split over all devices.
TABLE_AXES = sharding.MESH_AXES

RowSpec = Mapping[str, tuple[tuple[int, ...], np.dtype]]  # key -> (per-row shape, dtype)


def num_devices(mesh) -> int:
  return math.prod(mesh.shape[a] for a in TABLE_AXES)


def padded_records(num_records: int, mesh) -> int:
  """Rows of a table of `num_records` records: a multiple of the device count (padding rows are
  zero and never indexed)."""
  d = num_devices(mesh)
  return -(-num_records // d) * d


def row_bytes(spec: RowSpec) -> int:
  """Bytes of one record's row over all keys."""
  return sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in spec.values())


def bytes_per_device(spec: RowSpec, num_records: int, mesh) -> int:
  """Device memory that the resident split holds on each device."""
  return padded_records(num_records, mesh) // num_devices(mesh) * row_bytes(spec)


def gather_bytes_per_device(spec: RowSpec, global_batch: int, mesh) -> int:
  """Bytes each device sends per step in the gather's reduce-scatter (a ring moves
  (n - 1) / n of the global batch's rows through every device of the batch axes)."""
  n = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
  return (n - 1) * global_batch // n * row_bytes(spec)


class ResidentSplitTooLargeError(ValueError):
  """The split does not fit the devices' memory budget (`data.resident_memory_fraction`)."""


def _gib(n: float) -> str:
  return f'{n / 2**30:.2f} GiB'


def check_fits(spec: RowSpec, num_records: int, mesh, device_bytes: int, fraction: float) -> int:
  """The resident split's bytes per device; raises `ResidentSplitTooLargeError` with the
  figures when they exceed `fraction` of `device_bytes` (checked before anything compiles or
  loads)."""
  need = bytes_per_device(spec, num_records, mesh)
  allowed = int(fraction * device_bytes)
  if need > allowed:
    raise ResidentSplitTooLargeError(
        f'the resident split does not fit: {num_records:,} records x {row_bytes(spec):,} bytes '
        f'over {num_devices(mesh)} devices take {_gib(need)} per device, above '
        f'data.resident_memory_fraction={fraction} of the {_gib(device_bytes)} of a device '
        f'({_gib(allowed)}); train with data.resident=False (the host input) or on more devices'
    )
  return need


def device_memory_bytes(device) -> int:
  """The memory of `device` that programs may use: its allocator's limit on GPU and TPU; on
  CPU devices (which share the host's memory) the host's memory over its local devices."""
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  if stats and stats.get('bytes_limit'):
    return int(stats['bytes_limit'])
  host = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  return host // max(1, len(jax.local_devices(backend=device.platform)))


def table_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(TABLE_AXES))


def abstract_tables(spec: RowSpec, num_records: int, mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """`ShapeDtypeStruct`s of the resident tables (for `jit(...).lower` and `aot`)."""
  rows = padded_records(num_records, mesh)
  shard = table_sharding(mesh)
  return {
      k: jax.ShapeDtypeStruct((rows, *shape), np.dtype(dtype), sharding=shard)
      for k, (shape, dtype) in spec.items()
  }


def load_tables(
    read_rows: Callable[[int, int], Mapping[str, np.ndarray]],
    spec: RowSpec,
    num_records: int,
    mesh: Mesh,
    chunk: int = 1024,
) -> dict[str, jax.Array]:
  """The split's tables in device memory, each process reading only its own devices' rows.

  Args:
    read_rows: (start, stop) -> {key: [stop - start, *shape]} of records [start, stop) in
      record order (the host batch's per-record arrays, unmasked).
    spec: key -> (per-row shape, dtype); `read_rows` must give exactly these.
    chunk: records read at a time (bounds the host memory of the load).
  Returns:
    key -> [padded_records, *shape] `jax.Array`, sharded with `table_sharding(mesh)`.
  """
  rows = padded_records(num_records, mesh)
  sharding_ = table_sharding(mesh)
  index_map = sharding_.addressable_devices_indices_map((rows,))
  per_device: dict[str, list[jax.Array]] = {k: [] for k in spec}
  devices = []
  for device, index in index_map.items():
    start, stop, _ = index[0].indices(rows)
    local = _read_range(read_rows, spec, start, stop, num_records, chunk)
    for k in spec:
      per_device[k].append(jax.device_put(local[k], device))
    devices.append(device)
  return {
      k: jax.make_array_from_single_device_arrays((rows, *spec[k][0]), sharding_, per_device[k])
      for k in spec
  }


def _read_range(read_rows, spec: RowSpec, start: int, stop: int, num_records: int, chunk: int):
  """Rows [start, stop) of the table (zeros past `num_records`), checked against `spec`."""
  out = {k: np.zeros((stop - start, *shape), dtype) for k, (shape, dtype) in spec.items()}
  for lo in range(start, min(stop, num_records), chunk):
    hi = min(lo + chunk, stop, num_records)
    got = read_rows(lo, hi)
    for k, (shape, dtype) in spec.items():
      arr = np.asarray(got[k])
      if arr.shape != (hi - lo, *shape) or arr.dtype != np.dtype(dtype):
        raise ValueError(
            f'resident table {k!r}: records [{lo}, {hi}) read as {arr.shape} {arr.dtype}, '
            f'expected {(hi - lo, *shape)} {np.dtype(dtype)}'
        )
      out[k][lo - start : hi - start] = arr
  return out


def _as_bits(x: jax.Array) -> jax.Array:
  """The same bytes as an unsigned integer array (sums of one nonzero term are exact)."""
  if jnp.issubdtype(x.dtype, jnp.unsignedinteger):
    return x
  return jax.lax.bitcast_convert_type(x, jnp.dtype(f'uint{8 * x.dtype.itemsize}'))


def _from_bits(bits: jax.Array, dtype) -> jax.Array:
  return bits if bits.dtype == dtype else jax.lax.bitcast_convert_type(bits, dtype)


def gather_rows(
    tables: Mapping[str, jax.Array], indices: jax.Array, mesh: Mesh
) -> dict[str, jax.Array]:
  """The rows of `indices` from resident tables, as a batch split over the batch axes.

  Call inside `jit`. Args: tables, key -> [N_pad, ...] sharded with `table_sharding`;
  indices [B] int32 record indices (replicated; B divisible by the batch devices).
  Returns key -> [B, ...] with `sharding.batch_sharding(mesh)`'s layout.
  """
  batch_axes = sharding.BATCH_AXES

  def local_gather(local_tables, idx):
    first = _shard_offset(mesh) * next(iter(local_tables.values())).shape[0]
    local = idx - first
    n = next(iter(local_tables.values())).shape[0]
    mine = (local >= 0) & (local < n)
    safe = jnp.where(mine, local, 0)
    out = {}
    for k, table in local_tables.items():
      bits = _as_bits(jnp.take(table, safe, axis=0))
      keep = mine.reshape((-1,) + (1,) * (bits.ndim - 1))
      bits = jnp.where(keep, bits, jnp.zeros_like(bits))
      bits = jax.lax.psum_scatter(bits, batch_axes, scatter_dimension=0, tiled=True)
      bits = jax.lax.psum(bits, 'tensor')
      out[k] = _from_bits(bits, table.dtype)
    return out

  spec_tables = {k: P(TABLE_AXES) for k in tables}
  spec_out = {k: P(batch_axes) for k in tables}
  return jax.shard_map(
      local_gather,
      mesh=mesh,
      in_specs=(spec_tables, P()),
      out_specs=spec_out,
      check_vma=False,
  )(dict(tables), indices)


def _shard_offset(mesh: Mesh) -> jax.Array:
  """This device's position along `TABLE_AXES` (row-major, as `P(TABLE_AXES)` lays out rows)."""
  offset = 0
  for axis in TABLE_AXES:
    offset = offset * mesh.shape[axis] + jax.lax.axis_index(axis)
  return offset
