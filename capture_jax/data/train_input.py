"""The training iterator: the product1m train split -> host batches, resumable.

    source (tfds.data_source, one split)
      -> global shuffle by seed, a new permutation every epoch, repeated
         forever or for data.num_epochs (`ShuffledIndices`)
      -> tag every record with its position in that global stream
      -> this process's shard: positions p, p + n, p + 2n, ... (n processes)
      -> batch, and per batch: tokenise, pack the regions in the storage dtype

Because process p takes every n-th position and batches are cut after
sharding, global batch b is exactly the positions [b*B, (b+1)*B) of the
stream whatever the number of processes. Batches are host batches
(`capture_jax.batch`, `BatchLayout.host_keys`, B = the per-process batch):
unmasked, with each record's stream position; the train step masks them on
the devices with draws from (seed, position) (`masking.model_batch`). The
iterator is a Grain `DatasetIterator`; `get_state()` / `set_state()`
checkpoint and restore the exact position.

With `data.num_workers` > 0, Grain worker processes build the batches
(`mp_prefetch`) and hand them over in shared memory: the loader allocates the
batch's largest array in a shared-memory block in the worker, so Grain passes
its name instead of copying it (`_host_buffer`).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable

import grain
import ml_collections
import numpy as np

from capture_jax import batch as batch_lib
from capture_jax.data import collate as collate_lib
from capture_jax.data import source as source_lib


@dataclasses.dataclass(frozen=True)
class _TrainBatchLoader:
  """Batch index -> this process's training batch (a Grain map function).

  Process p of n takes stream positions p, p + n, p + 2n, ...; its batch b
  holds the positions (b * B + j) * n + p, j < B, so global batch b is
  positions [b * B * n, (b + 1) * B * n) whatever n is. Grain's element is
  the whole batch: its per-element bookkeeping (~60 us) is paid once per
  batch, and the records are fetched in one batched ArrayRecord read.
  With `source` None (a split resident on the devices) the batch is only the
  records' indices and positions (`batch.INDEX_KEYS`): the step gathers the rest.
  """

  source: source_lib.Product1MSource | None
  indices: 'ShuffledIndices'
  spec: collate_lib.BatchSpec
  batch_size: int  # per process
  process_index: int
  process_count: int
  shared_memory: bool = False  # runs in Grain worker processes: features into shared memory

  def __call__(self, batch_index: int) -> dict[str, np.ndarray]:
    j = np.arange(self.batch_size, dtype=np.int64)
    positions = (int(batch_index) * self.batch_size + j) * self.process_count + self.process_index
    record_index = self.indices.take(positions)
    if self.source is None:
      return {
          'record_index': record_index.astype(np.int32),
          'positions': batch_lib.encode_positions(positions),
      }
    records = self.source.read_records(record_index.tolist())
    allocate = _host_buffer if self.shared_memory else np.empty
    return collate_lib.collate(records, positions, self.spec, allocate)


def _host_buffer(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
  """An uninitialised array in a new shared-memory block (in a Grain worker process).

  Grain's `mp_prefetch` copies every array of an element into shared memory unless it already
  is a `SharedMemoryArray`, whose block it hands over by name; the main process maps it and
  unlinks it when the batch is dropped. Packing the features straight into one saves that copy
  of the batch's largest array.
  """
  return grain.multiprocessing.SharedMemoryArray(shape, dtype)


class ShuffledIndices:
  """The record index at each position of the global training stream.

  Epoch e (positions [e*N, (e+1)*N)) is a permutation of range(N) drawn from
  (seed, e), so every epoch is shuffled anew and any position can be read
  directly (what resuming and sharding need). A Grain source of ints.

  Why not `MapDataset.shuffle`: Grain's index_shuffle costs 7 us per element
  on large splits and ~550 us on a 100-record split; a cached numpy
  permutation costs well under 1 us, for 4 bytes per record.
  """

  def __init__(self, num_records: int, seed: int, num_epochs: int = 0):
    if num_records <= 0:
      raise ValueError(f'cannot shuffle {num_records} records')
    self.num_records, self.seed, self.num_epochs = num_records, seed, num_epochs
    self._cache: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return self.num_records * self.num_epochs if self.num_epochs else sys.maxsize

  def permutation(self, epoch: int) -> np.ndarray:
    perm = self._cache.get(epoch)
    if perm is None:  # two threads may both compute it: same result, no lock needed
      perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_records)
      perm = perm.astype(np.int32 if self.num_records < 2**31 else np.int64)
      self._cache = {e: p for e, p in self._cache.items() if e >= epoch - 1}
      self._cache[epoch] = perm
    return perm

  def __getitem__(self, position: int) -> int:
    epoch, i = divmod(int(position), self.num_records)
    return int(self.permutation(epoch)[i])

  def take(self, positions: np.ndarray) -> np.ndarray:
    """[B] record indices at [B] stream positions (vectorised)."""
    positions = np.asarray(positions, np.int64)
    epochs, within = np.divmod(positions, self.num_records)
    out = np.empty(len(positions), np.int64)
    for e in np.unique(epochs):  # a batch spans one or two epochs
      sel = epochs == e
      out[sel] = self.permutation(int(e))[within[sel]]
    return out

  def __getstate__(self) -> dict[str, Any]:
    return {'num_records': self.num_records, 'seed': self.seed, 'num_epochs': self.num_epochs}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(**state)


# --------------------------------------------------------------------------
# Training.


def make_train_dataset(
    config: ml_collections.ConfigDict,
    *,
    split: str = 'train',
    process_index: int | None = None,
    process_count: int | None = None,
    batch_size: int | None = None,
    source: source_lib.Product1MSource | None = None,
) -> grain.IterDataset:
  """The training `IterDataset` of this process (see the module docstring).

  Args:
    config: the run config (`config.data`, and `config.model` for vocab and
      MRM-target checks).
    split: which split to train on.
    process_index, process_count: this process's shard; default
      jax.process_index() / jax.process_count().
    batch_size: global batch (default config.data.batch_size); each process
      gets batch_size / process_count.
    source: an already opened source (default: opened from config).

  With `data.resident` the batches are index batches (`batch.INDEX_KEYS`) of the split whose
  rows `resident_rows` reads: the same records at the same stream positions.
  """
  d = config.data
  index, count = source_lib.process_shard(process_index, process_count)
  per_process = source_lib.per_process_batch(batch_size or d.batch_size, count)
  spec = collate_lib.make_batch_spec(config)
  source = source or source_lib.make_source(config, split)
  if len(source) == 0:
    raise ValueError(f'{source} is empty')
  if d.resident and len(source) >= 2**31:
    raise ValueError(f'{source}: a resident split indexes its records with int32, at most 2**31')
  indices = ShuffledIndices(len(source), d.shuffle_seed, d.num_epochs)
  # Every process yields the same number of full batches: a finite stream is
  # cut to a multiple of the global batch.
  num_batches = len(indices) // (per_process * count)
  loader = _TrainBatchLoader(
      None if d.resident else source,
      indices,
      spec,
      per_process,
      index,
      count,
      shared_memory=d.num_workers > 0,
  )
  ds = grain.MapDataset.range(num_batches).map(loader)
  it = ds.to_iter_dataset(source_lib.read_options(config))
  if d.num_workers > 0:
    _ensure_absl_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.num_workers))
  return it


def resident_rows(
    config: ml_collections.ConfigDict, source: source_lib.Product1MSource
) -> Callable[[int, int], dict[str, np.ndarray]]:
  """`(start, stop) -> rows` of records [start, stop) of `source` in record order: the host
  batch without positions (`BatchLayout.row_shapes`), what a resident split holds. The same
  `collate` as the host mode, so both modes train on the same bytes."""
  spec = collate_lib.make_batch_spec(config)

  def read_rows(start: int, stop: int) -> dict[str, np.ndarray]:
    return collate_lib.collate(source.read_records(range(start, stop)), None, spec)

  return read_rows


def _ensure_absl_flags_parsed() -> None:
  """Grain's worker processes read its absl flags, which raises outside an
  `absl.app` program unless the flags are parsed; use their defaults then."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_train_iterator(config: ml_collections.ConfigDict, **kwargs: Any) -> grain.DatasetIterator:
  """A checkpointable iterator of host training batches (dicts of `BatchLayout.host_keys`; of
  `batch.INDEX_KEYS` with `data.resident`).

  `it.get_state()` returns a small JSON-able dict; `it.set_state(state)` on a
  fresh iterator of the same config continues with exactly the batches the
  original would have produced next. Keyword arguments as `make_train_dataset`.
  """
  return iter(make_train_dataset(config, **kwargs))
