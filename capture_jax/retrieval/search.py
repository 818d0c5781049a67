"""Nearest-neighbour search by cosine similarity: exact (JAX) and approximate (FAISS).

Exact search streams the gallery from host memory in chunks of
``gallery_chunk`` rows. Each chunk is split evenly over the devices of a
one-axis mesh (``"g"``); every device scores its shard against all queries,
one query chunk at a time ([query_chunk, shard] scores at most), keeps its
local top-k, and the local candidates are all-gathered and merged into a
running top-k that is replicated over the devices. Neither the full
[Q, N] score matrix nor the whole gallery is ever on a device.

Memory, for 10,000 queries x 1,000,000 gallery x 1,024 (defaults
``query_chunk=1024``, ``gallery_chunk=65536``): the caller's gallery (2 GB as
float16, 4 GB as float32, or a ``np.memmap``) plus per device the padded
queries (40 MB), one gallery shard (<= 256 MB), one score block
(1024 x 65536 x 4 B = 256 MB divided by the device count) and the running
top-k (10,000 x 100 x 8 B = 8 MB): well inside one accelerator, and inside
24 GB of host RAM on CPU.

Ties: ``lax.top_k`` puts the lower index first among equal values, the
running list holds lower gallery indices than the current chunk, and device
shards are contiguous and gathered in device order, so in every merge equal
scores sit in gallery-index order and the lower gallery index wins.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from capture_jax import losses

_AXIS = 'g'


def _unit_rows(x: np.ndarray) -> np.ndarray:
  """`losses.l2_normalize` of host rows, as the float32 numpy array FAISS takes."""
  return np.asarray(losses.l2_normalize(np.asarray(x, np.float32)), np.float32)


def _validate(queries: np.ndarray, gallery: np.ndarray, k: int) -> None:
  if queries.ndim != 2 or gallery.ndim != 2:
    raise ValueError(
        f'queries and gallery must be 2-D [count, dim], got shapes '
        f'{tuple(queries.shape)} and {tuple(gallery.shape)}'
    )
  if gallery.shape[0] == 0:
    raise ValueError('the gallery is empty: nothing to search')
  if queries.shape[1] != gallery.shape[1]:
    raise ValueError(
        f'embedding dimensions differ: queries have width '
        f'{queries.shape[1]}, gallery has width {gallery.shape[1]}'
    )
  if k < 1:
    raise ValueError(f'k must be >= 1, got {k}')
  if gallery.shape[0] >= 2**31 - 1:
    raise ValueError('galleries of 2**31 items or more need int64 indices')


def _balanced_chunk(n: int, cap: int) -> int:
  """The smallest chunk size that covers n items in ceil(n / cap) chunks."""
  cap = max(1, int(cap))
  n_chunks = -(-n // cap)
  return -(-n // n_chunks)


@functools.partial(jax.jit, static_argnames=('query_chunk', 'normalize'))
def _prepare_queries(queries: jax.Array, *, query_chunk: int, normalize: bool) -> jax.Array:
  """[Q, D] -> [ceil(Q / qc), qc, D] float32, zero-padded (padding is dropped later)."""
  q = queries.astype(jnp.float32)
  if normalize:
    q = losses.l2_normalize(q)
  n_chunks = -(-q.shape[0] // query_chunk)
  q = jnp.pad(q, ((0, n_chunks * query_chunk - q.shape[0]), (0, 0)))
  return q.reshape(n_chunks, query_chunk, q.shape[1])


@functools.partial(jax.jit, static_argnames=('mesh', 'k', 'normalize', 'precision'))
def _merge_gallery_chunk(
    best_vals: jax.Array,
    best_idx: jax.Array,
    queries: jax.Array,
    chunk: jax.Array,
    base: jax.Array,
    n_valid: jax.Array,
    *,
    mesh: Mesh,
    k: int,
    normalize: bool,
    precision: str,
) -> tuple[jax.Array, jax.Array]:
  """Folds one gallery chunk into the running top-k.

  Args:
    best_vals, best_idx: [C, qc, k] running scores and gallery indices,
      replicated.
    queries: [C, qc, D] prepared queries, replicated.
    chunk: [G, D] gallery rows base .. base + G, sharded over ``mesh``.
    base: int32 scalar, the gallery index of ``chunk[0]``.
    n_valid: int32 scalar, the gallery size; rows at or past it are padding.

  Returns:
    The new [C, qc, k] scores and indices, replicated.
  """

  def per_device(best_vals, best_idx, queries, shard, base, n_valid):
    g = shard.astype(jnp.float32)
    if normalize:
      g = losses.l2_normalize(g)
    rows = g.shape[0]
    gidx = base + lax.axis_index(_AXIS).astype(jnp.int32) * rows + jnp.arange(rows, dtype=jnp.int32)
    valid = gidx < n_valid
    k_local = min(k, rows)

    def one_query_chunk(args):
      q, bv, bi = args  # [qc, D], [qc, k], [qc, k]
      s = jnp.matmul(q, g.T, precision=precision)  # [qc, rows]
      # -0.0 and 0.0 are equal scores; make them one value so that the
      # tie rule (lower index first) applies to them too.
      s = jnp.where(s == 0, 0.0, s)
      s = jnp.where(valid[None, :], s, -jnp.inf)
      v, i = lax.top_k(s, k_local)
      i = gidx[i]
      v = lax.all_gather(v, _AXIS, axis=1, tiled=True, to='invarying')
      i = lax.all_gather(i, _AXIS, axis=1, tiled=True, to='invarying')
      v, pos = lax.top_k(jnp.concatenate([bv, v], axis=1), k)
      i = jnp.take_along_axis(jnp.concatenate([bi, i], axis=1), pos, axis=1)
      return v, i

    return lax.map(one_query_chunk, (queries, best_vals, best_idx))

  return jax.shard_map(
      per_device,
      mesh=mesh,
      in_specs=(P(), P(), P(), P(_AXIS, None), P(), P()),
      out_specs=(P(), P()),
  )(best_vals, best_idx, queries, chunk, base, n_valid)


def _scan_gallery(
    q: jax.Array,
    gallery: np.ndarray,
    *,
    chunk: int,
    k: int,
    mesh: Mesh,
    normalize: bool,
    precision: str,
) -> tuple[jax.Array, jax.Array]:
  """The top-k of the prepared queries `q` ([n_qchunks, qc, D]) over the host `gallery`
  ([N, D]), `chunk` rows (a multiple of the devices) sent at a time: scores [n_qchunks, qc, k]
  float32 and indices [n_qchunks, qc, k] int32."""
  replicated = NamedSharding(mesh, P())
  sharded = NamedSharding(mesh, P(_AXIS, None))
  n_gallery = gallery.shape[0]
  best_vals = jax.device_put(np.full((*q.shape[:2], k), -np.inf, np.float32), replicated)
  best_idx = jax.device_put(np.full((*q.shape[:2], k), -1, np.int32), replicated)
  in_flight = None
  for start in range(0, n_gallery, chunk):
    rows = np.asarray(gallery[start : start + chunk])
    if rows.dtype == np.float64:
      rows = rows.astype(np.float32)
    if rows.shape[0] < chunk:  # one shape for every chunk: a single compilation
      rows = np.concatenate([rows, np.zeros((chunk - rows.shape[0], rows.shape[1]), rows.dtype)])
    best_vals, best_idx = _merge_gallery_chunk(
        best_vals,
        best_idx,
        q,
        jax.device_put(rows, sharded),
        np.int32(start),
        np.int32(n_gallery),
        mesh=mesh,
        k=k,
        normalize=normalize,
        precision=precision,
    )
    # Dispatch is asynchronous: without a bound the loop would run ahead
    # and queue every chunk's transfer, i.e. a second copy of the gallery.
    # Waiting for the previous step keeps at most two chunks in flight
    # (the next transfer still overlaps the current computation).
    if in_flight is not None:
      jax.block_until_ready(in_flight)
    in_flight = best_vals
  return best_vals, best_idx


def exact_topk(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    *,
    query_chunk: int = 1024,
    gallery_chunk: int = 65536,
    normalize: bool = True,
    devices: Sequence[jax.Device] | None = None,
    precision: str = 'highest',
) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-k gallery items per query by cosine similarity.

  Args:
    queries: [Q, D] embeddings (any float dtype).
    gallery: [N, D] embeddings on the host (float32 or float16 numpy array,
      or a ``np.memmap``); read ``gallery_chunk`` rows at a time.
    k: results per query; more than N gives N.
    query_chunk: at most this many queries are scored together (bounds the
      [query_chunk, gallery_chunk / devices] score block); chunks are
      balanced to equal sizes.
    gallery_chunk: at most this many gallery rows (rounded up to a multiple
      of the device count) are sent to the devices at once.
    normalize: L2-normalise both sides (cosine); False scores raw dot products.
    devices: the devices to shard the gallery over (default: all).
    precision: matmul precision; "highest" keeps float32 accuracy on GPUs,
      whose default would be TF32.

  Returns:
    scores [Q, min(k, N)] float32, descending, and indices [Q, min(k, N)]
    int64 into the gallery; equal scores are ordered by lower index.

  Raises:
    ValueError: on an empty gallery, mismatched widths, or k < 1.
  """
  queries = np.asarray(queries)
  _validate(queries, gallery, k)
  n_gallery, n_query = gallery.shape[0], queries.shape[0]
  k = min(int(k), n_gallery)
  if n_query == 0:
    return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
  devices = list(devices) if devices is not None else jax.devices()
  mesh = Mesh(np.array(devices), (_AXIS,))
  n_dev = len(devices)
  # Balanced chunks: the same number of chunks as the caps ask for, but of
  # equal size, so the last one is not mostly padding.
  gc = _balanced_chunk(n_gallery, gallery_chunk)
  gc = -(-gc // n_dev) * n_dev
  qc = _balanced_chunk(n_query, query_chunk)

  replicated = NamedSharding(mesh, P())
  if queries.dtype == np.float64:
    queries = queries.astype(np.float32)
  q = _prepare_queries(jax.device_put(queries, replicated), query_chunk=qc, normalize=normalize)
  best_vals, best_idx = _scan_gallery(
      q, gallery, chunk=gc, k=k, mesh=mesh, normalize=normalize, precision=precision
  )
  scores = np.asarray(best_vals).reshape(-1, k)[:n_query]
  indices = np.asarray(best_idx).reshape(-1, k)[:n_query].astype(np.int64)
  return scores, indices


def brute_force_topk(
    queries: np.ndarray, gallery: np.ndarray, k: int, *, normalize: bool = True
) -> tuple[np.ndarray, np.ndarray]:
  """Reference: the full [Q, N] float64 score matrix, sorted by (-score, index).

  Only for tests and small sizes.
  """
  queries = np.asarray(queries, np.float64)
  gallery = np.asarray(gallery, np.float64)
  _validate(queries, gallery, k)
  if normalize:
    queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    gallery = gallery / np.maximum(np.linalg.norm(gallery, axis=1, keepdims=True), 1e-12)
  s = queries @ gallery.T
  order = np.argsort(-s, axis=1, kind='stable')[:, : min(k, gallery.shape[0])]
  return np.take_along_axis(s, order, axis=1), order.astype(np.int64)


# ----------------------------------------------------------------------------
# Approximate search with FAISS.
# ----------------------------------------------------------------------------


def build_faiss_index(
    gallery: np.ndarray,
    *,
    kind: str = 'ivf',
    nlist: int | None = None,
    hnsw_m: int = 32,
    ef_construction: int = 200,
    train_size: int | None = None,
    add_chunk: int = 65536,
    seed: int = 0,
):
  """A FAISS inner-product index over L2-normalised gallery rows.

  Args:
    gallery: [N, D] embeddings; normalised and added ``add_chunk`` rows at a
      time, so the float32 copy of the whole gallery is the index's own.
    kind: "ivf" (IndexIVFFlat, k-means coarse quantiser) or "hnsw"
      (IndexHNSWFlat).
    nlist: IVF lists; default round(sqrt(N)), a cheap-to-train setting.
    train_size: rows sampled (with ``seed``) to train IVF; default
      min(N, 64 * nlist).

  Returns:
    A ``faiss.Index`` with ``ntotal == N``.
  """
  import faiss  # optional dependency, imported only when asked for

  n, d = gallery.shape
  if n == 0:
    raise ValueError('the gallery is empty: nothing to index')
  if kind == 'ivf':
    nlist = int(nlist or max(1, round(math.sqrt(n))))
    nlist = min(nlist, n)
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    train_size = min(n, int(train_size or 64 * nlist))
    rows = np.sort(np.random.default_rng(seed).choice(n, train_size, replace=False))
    index.train(_unit_rows(gallery[rows]))
  elif kind == 'hnsw':
    index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
  else:
    raise ValueError(f"unknown FAISS index kind {kind!r}; use 'ivf' or 'hnsw'")
  for start in range(0, n, add_chunk):
    index.add(_unit_rows(gallery[start : start + add_chunk]))
  return index


def faiss_search(
    index, queries: np.ndarray, k: int, *, nprobe: int = 16, ef_search: int = 128
) -> tuple[np.ndarray, np.ndarray]:
  """Searches a ``build_faiss_index`` index: scores [Q, k], indices [Q, k] (int64,
  -1 where fewer than k were found)."""
  import faiss

  if queries.shape[1] != index.d:
    raise ValueError(
        f'embedding dimensions differ: queries have width '
        f'{queries.shape[1]}, index has width {index.d}'
    )
  ivf = faiss.try_extract_index_ivf(index)
  if ivf is not None:
    ivf.nprobe = min(nprobe, ivf.nlist)
  if hasattr(index, 'hnsw'):
    index.hnsw.efSearch = max(ef_search, k)
  scores, indices = index.search(_unit_rows(queries), min(k, index.ntotal))
  return scores, indices.astype(np.int64)


def faiss_topk(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    *,
    kind: str = 'ivf',
    nlist: int | None = None,
    nprobe: int = 16,
    hnsw_m: int = 32,
    ef_construction: int = 200,
    ef_search: int = 128,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
  """Approximate top-k by cosine similarity with FAISS (build + search).

  Returns:
    scores [Q, min(k, N)] float32 and indices [Q, min(k, N)] int64.

  Raises:
    ValueError: on an empty gallery or mismatched widths.
  """
  queries = np.asarray(queries)
  _validate(queries, gallery, k)
  index = build_faiss_index(
      gallery, kind=kind, nlist=nlist, hnsw_m=hnsw_m, ef_construction=ef_construction, seed=seed
  )
  return faiss_search(index, queries, k, nprobe=nprobe, ef_search=ef_search)


def recall_at_k(approx_idx: np.ndarray, exact_idx: np.ndarray) -> float:
  """Mean over queries of |approx top-k & exact top-k| / k, k = exact_idx.shape[1].

  Args:
    approx_idx: [Q, >= k] indices from an approximate search (-1 = none).
    exact_idx: [Q, k] indices from exact search.
  """
  approx_idx = np.asarray(approx_idx)
  exact_idx = np.asarray(exact_idx)
  if approx_idx.shape[0] != exact_idx.shape[0]:
    raise ValueError(f'query counts differ: {approx_idx.shape[0]} vs {exact_idx.shape[0]}')
  k = exact_idx.shape[1]
  if exact_idx.shape[0] == 0 or k == 0:
    raise ValueError('recall needs at least one query and k >= 1')
  approx = approx_idx[:, :k]
  # Exact lists have distinct indices, so membership counts the overlap.
  found = (approx[:, :, None] == exact_idx[:, None, :]).any(axis=2) & (approx >= 0)
  return float(found.sum() / exact_idx.size)


def indices_to_ranked_lists(
    query_ids: Sequence[str], gallery_ids: Sequence[str], indices: np.ndarray
) -> dict[str, list[str]]:
  """[Q, k] gallery indices -> query id -> ranked gallery ids (-1 entries dropped)."""
  if len(query_ids) != indices.shape[0]:
    raise ValueError(f'{len(query_ids)} query ids for {indices.shape[0]} result rows')
  gallery_ids = np.asarray(gallery_ids, dtype=object)
  return {
      str(q): [str(g) for g in gallery_ids[row[row >= 0]]] for q, row in zip(query_ids, indices)
  }
