"""Device mesh, parameter sharding rules and the global batch.

The mesh has three named axes (`MESH_AXES`):

- `data`: pure data parallelism (parameters replicated, batch split);
- `fsdp`: the batch is split over it too, and large parameters are sharded
  over it (ZeRO-3 / FSDP: XLA all-gathers them where they are used and
  reduce-scatters their gradients);
- `tensor`: Megatron-style tensor parallelism inside attention and FFN blocks.

The batch is split over `('data', 'fsdp')` (`batch_sharding`). Parameters get
a `PartitionSpec` from the rules of `config.mesh.rules`, computed from their
path and shape only, so they work on the `ShapeDtypeStruct`s of
`jax.eval_shape(init)` and parameters can be created directly in their
sharding with `jax.jit(init, out_shardings=param_shardings(...))`:

| rule | what it shards |
| --- | --- |
| `replicated` | nothing (pure data parallelism when alone) |
| `tensor` | q/k/v and FFN `intermediate` kernels and biases on the output (heads / FFN width) dim; attention-output (`attention_output`, `out_proj`, `dense1`, `dense2`) and FFN `output` kernels on the input dim; embedding tables on the vocab (row) dim, else the width; `mlm_bias` on the vocab |
| `fsdp` | parameters with >= `fsdp_min_size` elements: the largest dimension divisible by the `fsdp` size that `tensor` left free |

A dimension is only sharded when the axis size divides it; otherwise it stays
replicated. Axes of size 1 are never written into specs. `tensor` claims its
dimensions before `fsdp` whatever their order in the list: its dimensions are
fixed by the layer's math, `fsdp` can take any free one. Parameters of
`nn.scan`-ned layers (a `scanned` path level, leading `[num_layers]` axis)
get the spec of one layer with the layer axis never sharded; the size
threshold of `fsdp` is per layer too, so scanning does not change the layout.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from capture_jax.param_paths import path_str

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')
KNOWN_RULES = ('replicated', 'fsdp', 'tensor')

# Megatron tensor parallelism, as (path regex, candidate dims of one layer's
# parameter in order of preference). Column-parallel layers split their output
# features (the attention heads of q/k/v, the FFN width), so their biases split
# too; row-parallel layers split their input features and keep the bias whole
# (it is added after the all-reduce). Embedding tables split their rows (the
# vocabulary; the MLM decoder is tied to the word embeddings, so its logits and
# `mlm_bias` are vocab-parallel) or, when the rows do not divide, their width.
TENSOR_RULES: tuple[tuple[str, tuple[int, ...]], ...] = (
    (r'(^|/)(query|key|value)[12]?/dense/(kernel|bias)$', (-1,)),
    (r'(^|/)intermediate/(kernel|bias)$', (-1,)),
    (r'(^|/)(attention_output|out_proj|dense[12]|output)/kernel$', (0,)),
    (r'(^|/)embedding$', (0, 1)),
    (r'(^|/)mlm_bias$', (0,)),
)
SCAN_LEVEL = 'scanned'  # `layers.LayerStack`'s nn.scan module name


# ----------------------------------------------------------------------------
# Mesh.


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """`(data, fsdp, tensor)` sizes for `num_devices`, with the -1 filled in.

  Raises ValueError (saying the sizes and the device count) when the sizes
  are not positive or -1, when more than one is -1, or when they do not
  multiply to the device count.
  """
  sizes = {a: mesh_cfg[a] for a in MESH_AXES}
  given = ', '.join(f'{a}={s}' for a, s in sizes.items())
  bad = [a for a, s in sizes.items() if not isinstance(s, (int, np.integer)) or (s < 1 and s != -1)]
  if bad:
    raise ValueError(f'mesh sizes must be positive integers or -1, got {given}')
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise ValueError(f'at most one mesh axis may be -1, got {given}')
  known = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if num_devices % known:
      raise ValueError(
          f'mesh ({given}): the fixed axes need a multiple of {known} devices, '
          f'but there are {num_devices}'
      )
    sizes[fill[0]] = num_devices // known
  elif known != num_devices:
    raise ValueError(f'mesh ({given}) needs {known} devices, but there are {num_devices}')
  return tuple(int(sizes[a]) for a in MESH_AXES)


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
  """The `('data', 'fsdp', 'tensor')` mesh of `mesh_cfg` over `devices` (default: every device).

  The device order comes from `jax.make_mesh` (topology-aware on TPU and GPU;
  the last axis, `tensor`, varies fastest, so keep it within a host). Axes are
  `Auto` (GSPMD propagation under `jit`, usable by `shard_map`). Shape errors
  are raised here, before anything compiles.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(
      shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
  )


def _axis_sizes(mesh) -> dict[str, int]:
  sizes = dict(mesh.shape)
  missing = [a for a in MESH_AXES if a not in sizes]
  if missing:
    raise ValueError(f'the mesh has axes {tuple(sizes)}; expected {MESH_AXES}')
  return sizes


# ----------------------------------------------------------------------------
# Parameter sharding rules.


def parse_rules(rules: str) -> tuple[str, ...]:
  """`'fsdp,tensor'` -> `('fsdp', 'tensor')`; ValueError on an unknown, empty or repeated rule."""
  names = tuple(r.strip() for r in str(rules).split(',') if r.strip())
  if not names:
    raise ValueError(f'mesh.rules is empty; give a comma-separated list of {list(KNOWN_RULES)}')
  unknown = [r for r in names if r not in KNOWN_RULES]
  if unknown:
    raise ValueError(
        f'unknown sharding rule(s) {unknown} in mesh.rules={rules!r}; '
        f'known rules: {list(KNOWN_RULES)}'
    )
  if len(set(names)) != len(names):
    raise ValueError(f'mesh.rules={rules!r} names a rule twice')
  return names


def _tensor_dims(path: str, rank: int) -> tuple[int, ...]:
  for pattern, dims in TENSOR_RULES:
    if re.search(pattern, path):
      return tuple(d % rank for d in dims if -rank <= d < rank)
  return ()


def leaf_spec(
    path: str,
    shape: Sequence[int],
    sizes: Mapping[str, int],
    rules: Sequence[str],
    fsdp_min_size: int,
) -> P:
  """The `PartitionSpec` of one parameter (one entry per dimension)."""
  shape = tuple(int(d) for d in shape)
  lead = 1 if (SCAN_LEVEL in path.split('/') and shape) else 0  # the scan's layer axis
  body = shape[lead:]
  axes: list[Any] = [None] * len(body)
  tensor, fsdp = sizes['tensor'], sizes['fsdp']
  if 'tensor' in rules and tensor > 1 and body:
    for d in _tensor_dims(path, len(body)):
      if body[d] % tensor == 0:
        axes[d] = 'tensor'
        break
  if 'fsdp' in rules and fsdp > 1 and body and math.prod(body) >= fsdp_min_size:
    free = [d for d in range(len(body)) if axes[d] is None and body[d] % fsdp == 0]
    if free:
      axes[max(free, key=lambda d: (body[d], -d))] = 'fsdp'  # largest; the first on ties
  return P(*([None] * lead + axes))


def param_specs(abstract_params: Any, mesh, mesh_cfg: ml_collections.ConfigDict) -> Any:
  """A tree of `PartitionSpec`s like `abstract_params` (any leaves with `.shape`).

  `mesh` may be a `Mesh` or an `AbstractMesh` (only its axis sizes are read).
  """
  sizes = _axis_sizes(mesh)
  rules = parse_rules(mesh_cfg.rules)
  min_size = int(mesh_cfg.fsdp_min_size)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: leaf_spec(path_str(path), np.shape(x), sizes, rules, min_size),
      abstract_params,
  )


def param_shardings(abstract_params: Any, mesh: Mesh, mesh_cfg: ml_collections.ConfigDict) -> Any:
  """A tree of `NamedSharding`s like `abstract_params`, e.g. for `jax.jit(init, out_shardings=...)`."""
  specs = param_specs(abstract_params, mesh, mesh_cfg)
  return jax.tree_util.tree_map(
      lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P)
  )


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _key_tuple(path: Sequence[Any]) -> tuple[str, ...]:
  return tuple(path_str([k]) for k in path)


def state_shardings_like(
    abstract_state: Any, abstract_params: Any, param_shardings_tree: Any
) -> Any:
  """Shardings for an optimizer state (e.g. `jax.eval_shape(tx.init, abstract_params)`).

  Optax states mirror the parameters (`mu`, `nu`, ... hold a params-shaped
  tree under some prefix). A state leaf whose key path ends with a
  parameter's path and whose shape equals that parameter's gets the
  parameter's sharding; every other leaf (step counts, scalars, hyper-
  parameters, factored statistics) is replicated.
  """
  flat_params = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  flat_shardings = jax.tree_util.tree_leaves(param_shardings_tree)
  if len(flat_params) != len(flat_shardings):
    raise ValueError(f'{len(flat_params)} parameters but {len(flat_shardings)} shardings')
  if not flat_shardings:
    raise ValueError('no parameters: cannot tell the mesh of the optimizer state')
  by_path = {
      _key_tuple(path): (tuple(np.shape(x)), s) for (path, x), s in zip(flat_params, flat_shardings)
  }
  longest = max(len(k) for k in by_path)
  rep = replicated(flat_shardings[0].mesh)

  def pick(path, leaf):
    keys = _key_tuple(path)
    for n in range(min(len(keys), longest), 0, -1):
      hit = by_path.get(keys[-n:])
      if hit is not None and hit[0] == tuple(np.shape(leaf)):
        return hit[1]
    return rep

  return jax.tree_util.tree_map_with_path(pick, abstract_state)


def spec_table(abstract_params: Any, specs: Any, mesh=None, pattern: str = '') -> str:
  """A readable table `path | shape | spec | per-device shape` (paths matching `pattern`)."""
  flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  flat_specs = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, P))
  sizes = dict(mesh.shape) if mesh is not None else {}
  rows = []
  for (path, x), spec in zip(flat, flat_specs):
    name = path_str(path)
    if pattern and not re.search(pattern, name):
      continue
    shape = tuple(np.shape(x))
    local = list(shape)
    for d, axes in enumerate(spec):
      for a in axes if isinstance(axes, tuple) else (axes,):
        if a is not None and a in sizes:
          local[d] //= sizes[a]
    rows.append((name, str(shape), str(spec), str(tuple(local))))
  head = ('parameter', 'shape', 'spec', 'per device')
  widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
  fmt = lambda r: '  '.join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
  return '\n'.join([fmt(head), fmt(tuple('-' * w for w in widths))] + [fmt(r) for r in rows])


# ----------------------------------------------------------------------------
# The global batch.


def batch_devices(mesh: Mesh) -> int:
  """How many ways the batch axes `('data', 'fsdp')` split a batch."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_split_problems(batch_size: int, mesh: Mesh, field: str) -> list[str]:
  """Why a global batch of `batch_size` (the config field `field`) cannot be split evenly
  over the mesh's batch axes and the processes; empty when it can."""
  if batch_size < 1:
    return [f'{field}={batch_size} must be a positive number of samples']
  n = batch_devices(mesh)
  problems = []
  if batch_size % n:
    problems.append(
        f"{field}={batch_size} is not divisible by the {n} devices of the mesh's batch axes "
        f"(data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})"
    )
  processes = mesh_process_count(mesh)
  if batch_size % processes:
    problems.append(f'{field}={batch_size} is not divisible by the {processes} processes')
  return problems


def mesh_process_count(mesh) -> int:
  """How many processes (hosts) drive the mesh's devices: the target's, not this host's, when
  the mesh is of a topology's compile-only devices (this run's for an `AbstractMesh`)."""
  if isinstance(mesh, jax.sharding.AbstractMesh):
    return jax.process_count()
  return len({d.process_index for d in mesh.devices.flat})


def mesh_platform(mesh) -> str:
  """'cpu', 'gpu' or 'tpu': the platform of the mesh's devices (this run's default backend for
  an `AbstractMesh`)."""
  if isinstance(mesh, jax.sharding.AbstractMesh):
    return jax.default_backend()
  return mesh.devices.flat[0].platform


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
  """`ShapeDtypeStruct`s of the pytree `abstract`, each carrying its leaf of `shardings`."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over `('data', 'fsdp')`, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def global_batch_from_local(
    local_batch: Mapping[str, np.ndarray], mesh: Mesh
) -> dict[str, jax.Array]:
  """Every process's share of the batch -> global `jax.Array`s split over `('data', 'fsdp')`.

  Each process passes only its own `[B / num_processes, ...]` rows (the data
  pipeline splits the global batch evenly over processes; keep `tensor`
  within a host so that processes hold distinct rows); the result has global
  shape `[B, ...]`, sharded with `batch_sharding(mesh)`. Raises ValueError
  when the arrays disagree on the local batch size or when the global batch
  is not divisible by `data * fsdp`.
  """
  if not local_batch:
    raise ValueError('empty batch')
  sizes = _axis_sizes(mesh)
  shards = sizes['data'] * sizes['fsdp']
  local_rows = {k: (np.shape(v)[0] if np.ndim(v) else None) for k, v in local_batch.items()}
  if None in local_rows.values():
    raise ValueError(
        f'every batch array needs a leading batch dimension; got shapes '
        f'{ {k: np.shape(v) for k, v in local_batch.items()} }'
    )
  if len(set(local_rows.values())) != 1:
    raise ValueError(f'batch arrays disagree on the local batch size: {local_rows}')
  local = next(iter(local_rows.values()))
  # The batch shards (data, fsdp positions) this process's devices hold: all
  # of them in one process, 1/num_processes of them when `tensor` stays within
  # hosts; fewer when it spans hosts (those processes then feed the same rows).
  position = {d: idx for idx, d in np.ndenumerate(mesh.devices)}
  mine = {position[d][0] * sizes['fsdp'] + position[d][1] for d in mesh.local_devices}
  if local % len(mine):
    processes = jax.process_count()
    if len(mine) * processes == shards:
      raise ValueError(
          f'global batch {local * processes} (= {local} per process x {processes} processes) is not '
          f'divisible by mesh data x fsdp = {sizes["data"]} x {sizes["fsdp"]} = {shards}'
      )
    raise ValueError(
        f'the local batch {local} of process {jax.process_index()} does not split over the '
        f'{len(mine)} batch shards of its devices (mesh data x fsdp = {shards})'
    )
  global_rows = local // len(mine) * shards
  sharding = batch_sharding(mesh)
  return {
      k: jax.make_array_from_process_local_data(
          sharding, np.asarray(v), (global_rows,) + np.shape(v)[1:]
      )
      for k, v in local_batch.items()
  }
