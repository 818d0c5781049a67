"""The contrastive loss over the whole global batch, without a `GB x GB` matrix.

`losses.contrastive_loss` on a sharded `[GB, D]` batch would have XLA build the
global similarity matrix (a `[GB/n, GB]` slab per device, several times over in
the backward pass). Here every device keeps its own rows as queries and the key
embeddings travel round a ring of the batch devices (`ppermute`, one block per
step). Each step sees a `[rows, chunk]` block of logits:

- softmax kinds ('ntxent', 'clip'): an online log-sum-exp per query row, as in
  flash / ring attention; the loss is then `lse - positive logit` per row.
- sigmoid ('siglip'): the per-pair terms are summed directly.

The ring is a `jax.custom_vjp` whose backward pass goes round the ring again,
recomputing each block from the saved per-row log-sum-exp, and sends each key
block's gradient along with it so that it is home after the last hop. Nothing
larger than `[rows, chunk]` or `[rows, D]` is kept per device in either pass:
memory grows with local batch x chunk, not with the square of the global batch.

The value and the gradients (w.r.t. text, visual and the loss parameters) equal
those of `losses.contrastive_loss` on the whole global batch on one device.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from capture_jax import losses

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class _Ring:
  """Static description of one ring reduction (hashable: a `nondiff_argnums` arg).

  mode: 'lse' (log-sum-exp over every key), 'lse_noself' (the same without the
    key that is the query itself, NT-Xent) or 'sigmoid' (sum over keys of
    `-log sigmoid(+-logit)`, + where key and query are a pair).
  groups: the local query and key blocks are `groups` stacked slices of the
    local batch (2 for NT-Xent's `[visual; text]`, else 1); global row ids are
    `group * GB + device * b + row`, so equal ids mean the same vector
    ('lse_noself') or a positive pair ('sigmoid').
  axes: the mesh axes flattened into the ring; n_dev: their total size.
  chunk: keys per block processed at once (0: the whole block).
  """

  mode: str
  groups: int
  axes: tuple[str, ...]
  n_dev: int
  chunk: int

  def n_chunks(self, rows: int) -> int:
    if self.chunk <= 0 or self.chunk >= rows:
      return 1
    if rows % self.chunk:
      raise ValueError(
          f'loss.contrastive_chunk={self.chunk} must divide the per-device key block of '
          f'{rows} rows (the local batch, twice it for ntxent)'
      )
    return rows // self.chunk

  def ids(self, device: Array, rows: int) -> Array:
    b = rows // self.groups
    r = jnp.arange(rows)
    return (r // b) * (b * self.n_dev) + device * b + r % b

  def vary(self, x: Array) -> Array:
    return _vary(x, self.axes)

  def shift(self, x):
    """Sends every device's `x` to the next device of the ring."""
    if self.n_dev == 1:
      return x
    return lax.ppermute(x, self.axes, [(i, (i + 1) % self.n_dev) for i in range(self.n_dev)])


def _vary(x: Array, axes: tuple[str, ...]) -> Array:
  """Marks `x` as varying over `axes` (shard_map's type check needs it for loop carries)."""
  aval = jax.typeof(x)
  varying = aval.mat.varying if hasattr(aval, 'mat') else aval.vma  # `.vma` in older JAX
  missing = tuple(a for a in axes if a not in varying)
  return lax.pcast(x, missing, to='varying') if missing else x


def _logits(ring: _Ring, q, kc, qids, kids, scale, bias):
  """`[n, c]` logits of one chunk, with the pair / self mask `same`."""
  raw = q @ kc.T
  logits = scale * raw
  if ring.mode == 'sigmoid':
    logits = logits + bias
  same = qids[:, None] == kids[None, :]
  if ring.mode == 'lse_noself':
    logits = jnp.where(same, -jnp.inf, logits)
  return raw, logits, same


def _chunks(ring: _Ring, rows: int, body, carry):
  """Runs `body(start, carry)` over the key chunks of a block."""
  nc = ring.n_chunks(rows)
  if nc == 1:
    return body(0, carry)
  size = rows // nc
  return lax.fori_loop(0, nc, lambda j, c: body(j * size, c), carry)


def _chunk_size(ring: _Ring, rows: int) -> int:
  return rows // ring.n_chunks(rows)


def _ring_forward(ring: _Ring, q, k, scale, bias):
  n, rows = q.shape[0], k.shape[0]
  c = _chunk_size(ring, rows)
  me = lax.axis_index(ring.axes)
  qids = ring.ids(me, n)

  def block(src, k_blk, state):
    kids_blk = ring.ids(src, rows)

    def body(start, state):
      kc = lax.dynamic_slice_in_dim(k_blk, start, c)
      kids = lax.dynamic_slice_in_dim(kids_blk, start, c)
      _, logits, same = _logits(ring, q, kc, qids, kids, scale, bias)
      if ring.mode == 'sigmoid':
        sign = jnp.where(same, 1.0, -1.0)
        return state - jnp.sum(jax.nn.log_sigmoid(sign * logits), axis=1)
      mx, se = state
      new = jnp.maximum(mx, jnp.max(logits, axis=1))
      safe = jnp.where(jnp.isfinite(new), new, 0.0)  # a row whose keys were all masked so far
      se = se * jnp.exp(mx - safe) + jnp.sum(jnp.exp(logits - safe[:, None]), axis=1)
      return new, se

    return _chunks(ring, rows, body, state)

  zeros = ring.vary(jnp.zeros((n,), jnp.float32))
  state = zeros if ring.mode == 'sigmoid' else (zeros - jnp.inf, zeros)
  state = block(me, k, state)

  def step(s, carry):
    k_blk, state = carry
    k_blk = ring.shift(k_blk)
    return k_blk, block((me - s) % ring.n_dev, k_blk, state)

  _, state = lax.fori_loop(1, ring.n_dev, step, (k, state))
  if ring.mode == 'sigmoid':
    return state
  mx, se = state
  return mx + jnp.log(se)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_reduce(ring: _Ring, q: Array, k: Array, scale: Array, bias: Array) -> Array:
  """Per local query row: log-sum-exp of its logits against every key of the
  global batch, or the sum of its sigmoid-loss terms.

  Args:
    q: `[n, D]` this device's queries; k: `[m, D]` this device's keys (the ring
      brings the others'); scale, bias: scalars (`logit = scale * q.k + bias`,
      the bias only for 'sigmoid'), varying over the ring axes.
  Returns:
    `[n]` float32.
  """
  return _ring_forward(ring, q, k, scale, bias)


def _ring_reduce_fwd(ring, q, k, scale, bias):
  out = _ring_forward(ring, q, k, scale, bias)
  return out, (q, k, scale, bias, out)


def _ring_reduce_bwd(ring, res, g):
  q, k, scale, bias, out = res
  n, rows = q.shape[0], k.shape[0]
  c = _chunk_size(ring, rows)
  me = lax.axis_index(ring.axes)
  qids = ring.ids(me, n)

  def block(src, k_blk, dk_blk, acc):
    kids_blk = ring.ids(src, rows)

    def body(start, carry):
      dk_blk, (dq, dscale, dbias) = carry
      kc = lax.dynamic_slice_in_dim(k_blk, start, c)
      kids = lax.dynamic_slice_in_dim(kids_blk, start, c)
      raw, logits, same = _logits(ring, q, kc, qids, kids, scale, bias)
      if ring.mode == 'sigmoid':
        sign = jnp.where(same, 1.0, -1.0)
        dlogits = g[:, None] * (-sign) * jax.nn.sigmoid(-sign * logits)
        dbias = dbias + jnp.sum(dlogits)
      else:  # d lse / d logits = softmax, recomputed from the saved lse (0 where masked)
        dlogits = g[:, None] * jnp.exp(logits - out[:, None])
      dq = dq + scale * (dlogits @ kc)
      dkc = scale * (dlogits.T @ q)
      dk_blk = lax.dynamic_update_slice_in_dim(
          dk_blk, lax.dynamic_slice_in_dim(dk_blk, start, c) + dkc.astype(dk_blk.dtype), start, 0
      )
      dscale = dscale + jnp.sum(dlogits * raw)
      return dk_blk, (dq, dscale, dbias)

    return _chunks(ring, rows, body, (dk_blk, acc))

  acc = (jnp.zeros_like(q), jnp.zeros_like(scale), jnp.zeros_like(bias))
  dk, acc = block(me, k, jnp.zeros_like(k), acc)

  def step(s, carry):
    k_blk, dk_blk, acc = carry
    k_blk, dk_blk = ring.shift((k_blk, dk_blk))
    dk_blk, acc = block((me - s) % ring.n_dev, k_blk, dk_blk, acc)
    return k_blk, dk_blk, acc

  _, dk, (dq, dscale, dbias) = lax.fori_loop(1, ring.n_dev, step, (k, dk, acc))
  # The block now held came from the next device; one more hop takes its gradient home.
  dk = ring.shift(dk)
  return dq, dk, dscale, dbias


_ring_reduce.defvjp(_ring_reduce_fwd, _ring_reduce_bwd)


def _local_loss(
    text,
    visual,
    scale,
    bias,
    *,
    kind: str,
    axes: tuple[str, ...],
    n_dev: int,
    chunk: int,
    global_batch: int,
):
  """One device's share of the global loss (inside shard_map), psum'ed."""
  t, v = losses.l2_normalize(text), losses.l2_normalize(visual)
  ring = functools.partial(_Ring, axes=axes, n_dev=n_dev, chunk=chunk)
  s, b = _vary(scale, axes), _vary(bias, axes)
  positive = scale * jnp.sum(t * v, axis=-1)  # [local B] logit of each pair (same both ways)
  if kind == 'ntxent':
    z = jnp.concatenate([v, t], axis=0)
    lse = _ring_reduce(ring(mode='lse_noself', groups=2), z, z, s, b)
    local, denom = jnp.sum(lse) - 2.0 * jnp.sum(positive), 2 * global_batch
  elif kind == 'clip':
    one = ring(mode='lse', groups=1)
    lse_t2v = _ring_reduce(one, t, v, s, b)
    lse_v2t = _ring_reduce(one, v, t, s, b)
    local, denom = 0.5 * (jnp.sum(lse_t2v) + jnp.sum(lse_v2t)) - jnp.sum(positive), global_batch
  else:  # siglip
    local, denom = jnp.sum(_ring_reduce(ring(mode='sigmoid', groups=1), t, v, s, b)), global_batch
  return lax.psum(local, axes) / denom


def _scale_and_bias(loss_cfg: ml_collections.ConfigDict, loss_params: Mapping[str, Array]):
  """The logit scale and bias of the configured kind, as in `losses`."""
  kind = loss_cfg.contrastive
  zero = jnp.zeros((), jnp.float32)
  if kind == 'ntxent':
    return jnp.asarray(1.0 / loss_cfg.temperature, jnp.float32), zero
  lit = jnp.asarray(loss_params['log_inv_temperature'], jnp.float32)
  if kind == 'clip':
    return losses.clip_logit_scale(lit), zero
  return jnp.exp(lit), jnp.asarray(loss_params['bias'], jnp.float32)


def global_contrastive_loss(
    text: Array,
    visual: Array,
    loss_cfg: ml_collections.ConfigDict,
    loss_params: Mapping[str, Array],
    mesh: Mesh,
    batch_axes: Sequence[str] = ('data', 'fsdp'),
) -> Array:
  """`losses.contrastive_loss` over the global batch, computed as a ring over devices.

  Args:
    text, visual: `[GB, D]` pooled vectors of the global batch, sharded (or
      resharded here) along the batch over `batch_axes`; other mesh axes (e.g.
      `tensor`) see them replicated and repeat the same work.
    loss_cfg: the `loss` config section (`contrastive`, `temperature`,
      `contrastive_chunk`: keys per block processed at once, 0 for the whole
      per-device block).
    loss_params: from `losses.init_loss_params` (empty for 'ntxent').
    mesh: the device mesh; batch_axes: its axes holding the batch, flattened
      (row-major) into one ring.
  Returns:
    The float32 scalar loss, equal to the dense single-device value; gradients
    flow to text, visual and loss_params. Per-device memory is
    O(local batch x (D + chunk)) in the forward and the backward pass.
  """
  kind = loss_cfg.contrastive
  if kind not in losses.CONTRASTIVE_KINDS:
    raise ValueError(f'loss.contrastive must be one of {losses.CONTRASTIVE_KINDS}, got {kind!r}')
  axes = tuple(batch_axes)
  unknown = [a for a in axes if a not in mesh.axis_names]
  if unknown:
    raise ValueError(f'batch axes {unknown} are not axes of the mesh {mesh.axis_names}')
  if text.ndim != 2 or text.shape != visual.shape:
    raise ValueError(f'text and visual must both be [GB, D], got {text.shape} and {visual.shape}')
  n_dev = math.prod(mesh.shape[a] for a in axes)
  global_batch = text.shape[0]
  if global_batch % n_dev:
    raise ValueError(
        f'global batch {global_batch} is not divisible by the {n_dev} devices of axes {axes}'
    )
  chunk = int(loss_cfg.get('contrastive_chunk', 0) or 0)
  scale, bias = _scale_and_bias(loss_cfg, loss_params)
  fn = functools.partial(
      _local_loss, kind=kind, axes=axes, n_dev=n_dev, chunk=chunk, global_batch=global_batch
  )
  rows = P(axes, None)
  return jax.shard_map(fn, mesh=mesh, in_specs=(rows, rows, P(), P()), out_specs=P())(
      text, visual, scale, bias
  )
