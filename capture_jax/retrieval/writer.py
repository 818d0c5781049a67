"""The shard writer: embeds planned rows into an export folder, shard by shard, on every process.

Evaluation batches are unmasked and the model runs with train=False (no
dropout); the last batch is padded and its padding rows are dropped. Rows
are written in the order of their plan (`eval_input.EvalRows`) whatever the
number of devices or processes: every batch says which rows of the plan it
holds, and each process's rows are gathered (`process_allgather`) and put
back in order before process 0 writes the shard. Only the shards missing
(or not reading back) are computed, so an interrupted export resumes. The
folder is locked while an export writes into it (a second export into it is
refused, naming the first), and non-finite embeddings are refused, naming
the split and how many rows.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np

from capture_jax import batch as batch_lib
from capture_jax import progress as progress_lib
from capture_jax import storage
from capture_jax.data import eval_input
from capture_jax.data import source as source_lib
from capture_jax.retrieval import embedding as embedding_lib
from capture_jax.retrieval import export_format
from capture_jax.retrieval import identity as identity_lib
from capture_jax.training import distributed
from capture_jax.training import lock as lock_lib
from capture_jax.training import sharding

LOCK_FILE = '.export.lock'


class NonFiniteEmbeddingsError(ValueError):
  """The model produced NaN or inf embeddings: its parameters are not usable."""


@dataclasses.dataclass
class ExportResult:
  out_dir: storage.Path
  metadata: dict[str, Any]
  written: list[int]  # shard indices computed by this call
  reused: bool  # the export was complete already: nothing was computed
  samples_per_s: float | None  # rows embedded per second by this call (data reading included)


def write_export(
    config: ml_collections.ConfigDict,
    out_dir: storage.PathLike,
    embedder: embedding_lib.Embedder,
    model_params: Any,
    source: source_lib.Product1MSource,
    rows: eval_input.EvalRows,
    *,
    identity: identity_lib.ExportIdentity,
    overwrite: bool = False,
    replace_other: bool = False,
    progress: bool | None = None,
) -> ExportResult:
  """Embeds `rows` of `source` with `model_params` into `out_dir`, computing only the shards
  not written yet.

  Args:
    identity: the export's identity (`ExportIdentity.of_rows` of `rows`), written in its metadata.
    overwrite: recompute every shard, replacing whatever export `out_dir`
      holds (otherwise an export of something else there is an error, and
      the shards of the same export are kept).
    replace_other: replace an export of something else (`ExportIdentity.reusable`).
  Returns:
    what was written; an export that was complete already is left as it is
    (`reused=True`).
  """
  out_dir = storage.as_path(out_dir)
  with lock_lib.FolderLock(out_dir, LOCK_FILE, 'export'):
    done = distributed.decide_on_main(lambda: identity.reusable(out_dir, overwrite, replace_other))
    if done is not None:
      return ExportResult(out_dir, done, [], True, None)
    _start(out_dir, identity, overwrite)
    # A shard that does not read as a whole file (truncated) is computed again. Decided on
    # process 0 (it writes the shards): a read error on another process must not give it
    # another list, and so other collectives.
    missing = distributed.decide_on_main(lambda: _missing_shards(out_dir, identity.num_shards))
    start = time.perf_counter()
    computed = _write_shards(
        config,
        out_dir,
        embedder,
        model_params,
        rows=rows,
        source=source,
        identity=identity,
        missing=missing,
        progress=progress,
    )
    elapsed = time.perf_counter() - start
    rate = computed / elapsed if computed and elapsed > 0 else None
    _sync(f'export {out_dir}')
    lock_lib.confirm(out_dir, LOCK_FILE)  # fencing: no "complete" written by a lost holder
    metadata = _finish(config, out_dir, embedder, identity, rows, rate)
  return ExportResult(out_dir, metadata, missing, False, rate)


def _start(out_dir: storage.Path, identity: identity_lib.ExportIdentity, overwrite: bool) -> None:
  """Process 0 marks the folder incomplete; then every process sees the same shard files."""
  if distributed.is_main_process():
    storage.makedirs(out_dir)
    # Start afresh when asked or when the folder holds an export of something else; always
    # drop temporary files a killed export left (the lock says no other export is writing).
    _remove_leftovers(out_dir, remove_shards=overwrite or identity.stale(out_dir))
    export_format.write_metadata(out_dir, {**identity.fields, 'complete': False})
  _sync(f'export start {out_dir}')


def _missing_shards(out_dir: storage.Path, num_shards: int) -> list[int]:
  names = (export_format.shard_name(s, num_shards) for s in range(num_shards))
  return [s for s, name in enumerate(names) if not identity_lib.shard_readable(out_dir / name)]


def _remove_leftovers(out_dir: storage.Path, remove_shards: bool) -> None:
  """Temporary files of a killed export (and with `remove_shards` the shards of a replaced one)."""
  patterns = ['.shard-*.tmp-*', f'.{export_format.METADATA_FILE}.tmp-*']
  if remove_shards:
    patterns.append('shard-*-of-*.npz')
  for pattern in patterns:
    with storage.reading(out_dir, operation='listing'):
      found = list(out_dir.glob(pattern))
    for path in found:
      with storage.reading(path, operation='deleting'):
        path.unlink()


def _write_shards(
    config, out_dir, embedder, model_params, *, rows, source, identity, missing, progress
) -> int:
  """Embeds and writes the `missing` shards in order; returns the rows computed."""
  n, shard_rows = len(rows), identity.shard_rows
  sizes = {s: min((s + 1) * shard_rows, n) - s * shard_rows for s in missing}
  show = config.eval.progress_bar if progress is None else progress
  bar = progress_lib.Progress(
      sum(sizes.values()),
      f'embedding {rows.split} {rows.kind}',
      'row',
      enabled=distributed.is_main_process() and show and bool(missing),
  )
  iterator = None
  if missing:
    iterator = eval_input.iterate_rows(config, source, rows, batch_size=embedder.batch_size)
  batches_per_shard = shard_rows // embedder.batch_size
  next_batch = 0
  for s in missing:
    first = s * batches_per_shard
    if next_batch != first:
      iterator.set_state({'next_index': first})  # Grain: seek without reading the batches between
    vectors, row_ids = _embed_batches(iterator, batches_per_shard, embedder, model_params)
    next_batch = first + batches_per_shard
    expected = np.arange(s * shard_rows, s * shard_rows + sizes[s])
    vectors, row_ids = _in_row_order(vectors, row_ids, expected, s)
    _check_finite(vectors, rows, identity, s, out_dir)
    if distributed.is_main_process():
      export_format.write_shard(
          out_dir / export_format.shard_name(s, identity.num_shards),
          _shard_arrays(rows, row_ids, vectors),
      )
    bar.update(len(expected))
  bar.close()
  return sum(sizes.values())


def _in_row_order(
    vectors: np.ndarray, row_ids: np.ndarray, expected: np.ndarray, shard: int
) -> tuple[np.ndarray, np.ndarray]:
  """A shard's `[N, D]` vectors and `[N]` row ids without padding, sorted by row; they must be
  exactly the rows `expected`."""
  keep = row_ids >= 0
  order = np.argsort(row_ids[keep], kind='stable')
  vectors, row_ids = vectors[keep][order], row_ids[keep][order]
  if not np.array_equal(row_ids, expected):
    raise RuntimeError(f'shard {shard}: got rows {row_ids[:5]}..., expected {expected[:5]}...')
  return vectors, row_ids


def _check_finite(vectors, rows, identity, shard, out_dir) -> None:
  bad = int(np.count_nonzero(~np.isfinite(vectors).all(axis=1)))
  if bad:
    step = identity.fields['checkpoint_step']
    weights = 'random' if step is None else f'step {step}'
    raise NonFiniteEmbeddingsError(
        f'split {rows.split!r} ({rows.kind}): {bad} of {len(vectors)} rows of shard {shard} have '
        f'non-finite (NaN or inf) embeddings with the {weights} weights; the checkpoint is '
        f'not usable (diverged training?). Nothing was written for this shard in {out_dir}.'
    )


def _finish(config, out_dir, embedder, identity, rows, rate) -> dict[str, Any]:
  """The complete export's metadata, written by process 0 once every shard is there."""
  metadata = {
      **identity.fields,
      'complete': True,
      'samples_per_s': rate,
      'devices': jax.device_count(),
      'processes': jax.process_count(),
      'eval_batch_size': embedder.batch_size,
      'data': {'tfds_dir': config.data.tfds_dir, 'data_dir': config.data.data_dir},
      'created': time.strftime('%Y-%m-%dT%H:%M:%S'),
  }
  if distributed.is_main_process():
    if not len(rows):
      print(
          f'WARNING: split {rows.split!r} has no {rows.kind} rows: the export is empty', flush=True
      )
    export_format.write_metadata(out_dir, metadata)
  return metadata


def _embed_batches(
    iterator: Iterator[eval_input.EvalBatch],
    num_batches: int,
    embedder: embedding_lib.Embedder,
    model_params: Any,
) -> tuple[np.ndarray, np.ndarray]:
  """The next `num_batches` global batches -> host `[N, D]` embeddings and `[N]` row ids (-1 at
  padding), gathered from every process in global-batch order."""
  outputs, row_ids = [], []
  for _ in range(num_batches):
    try:
      local = next(iterator)
    except StopIteration:  # the last shard ends before its last whole batch
      break
    global_batch = sharding.global_batch_from_local(
        batch_lib.model_inputs(local.inputs), embedder.mesh
    )
    outputs.append(embedder(model_params, global_batch))  # dispatched asynchronously
    row_ids.append(local.row)
  if not outputs:
    return np.zeros((0, embedder.dimension), np.float32), np.zeros(0, np.int64)
  if jax.process_count() > 1:
    # Process p's rows are the p-th block of each global batch (`global_batch_from_local`), so
    # gathering the host row ids in process order lines them up with the gathered embeddings.
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    outputs = multihost_utils.process_allgather(outputs, tiled=True)
    row_ids = [
        np.asarray(multihost_utils.process_allgather(r, tiled=True)).reshape(-1) for r in row_ids
    ]
  vectors = np.concatenate([np.asarray(v) for v in outputs]).astype(np.float32)
  return vectors, np.concatenate(row_ids).astype(np.int64)


def _shard_arrays(
    rows: eval_input.EvalRows, row_ids: np.ndarray, vectors: np.ndarray
) -> dict[str, np.ndarray]:
  """A shard's arrays (`export_format`), named from the row plan."""
  arrays = {
      'embeddings': vectors,
      'row': row_ids,
      'item_id': np.array([rows.item_id[i] for i in row_ids], dtype=str),
  }
  if rows.kind == 'instances':
    arrays['instance_label'] = np.array([rows.instance_label[i] for i in row_ids], dtype=str)
    arrays['instance_index'] = np.array([rows.instance_index[i] for i in row_ids], np.int32)
  return arrays


def _sync(name: str) -> None:
  """A barrier across processes (nothing to do in a single-process run)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    multihost_utils.sync_global_devices(name)
