"""Reading the product1m TFDS dataset: records of one split, and which of them this process reads.

`Product1MSource` is a Grain random-access source over one split; its records
are plain dicts (item_id, title, token_ids [L], labels, image_w, image_h,
boxes [N, 4], features [N, F], and cls_prob [N, C] in the `*_cls_prob`
configs), decoded straight from the `tf.train.Example` bytes. A split of
another vocab than the run's, or of the older layout (no token ids), is
refused with the command that rebuilds it (`product1m_schema.check_identity`). `process_shard`,
`per_process_batch` and `read_options` say how this process reads a split;
the training and evaluation iterators (`train_input`, `eval_input`) share them.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from capture_jax import storage
from capture_jax.data import product1m_schema as schema


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
  """(value, next position) of the protobuf varint at `buf[pos]`."""
  result = shift = 0
  while True:
    byte = buf[pos]
    pos += 1
    result |= (byte & 0x7F) << shift
    if byte < 0x80:
      return result, pos
    shift += 7


def _fields(buf: bytes, pos: int, end: int) -> list[tuple[int, int, int]]:
  """[(field number, start, end)] of the length-delimited fields of the message `buf[pos:end]`.

  Every field of a `tf.train.Example` down to its lists' payloads is length-delimited (int64
  lists are packed), so any other wire type is refused rather than skipped.
  """
  out = []
  while pos < end:
    tag = buf[pos]
    tag, pos = _varint(buf, pos) if tag & 0x80 else (tag, pos + 1)
    if tag & 7 != 2:
      raise ValueError(f'tf.train.Example: field {tag >> 3} has wire type {tag & 7}, expected 2')
    n = buf[pos]
    n, pos = _varint(buf, pos) if n & 0x80 else (n, pos + 1)
    out.append((tag >> 3, pos, pos + n))
    pos += n
  if pos != end:
    raise ValueError('tf.train.Example: a field runs past the end of its message')
  return out


def _example_lists(raw: bytes) -> dict[bytes, tuple[int, int]]:
  """{feature key: (start, end) of its list message} of a serialized `tf.train.Example`.

  Example.features (1) -> Features.feature (1, map entries: key 1, value 2) -> Feature (one of
  bytes_list 1, float_list 2, int64_list 3) -> the list.
  """
  out = {}
  for field, start, end in _fields(raw, 0, len(raw)):
    for entry, s, e in _fields(raw, start, end) if field == 1 else ():
      key, value = b'', ()
      for f, s2, e2 in _fields(raw, s, e) if entry == 1 else ():
        if f == 1:
          key = raw[s2:e2]
        elif f == 2:
          value = _fields(raw, s2, e2)
      out[key] = value[0][1:] if value else (0, 0)
  return out


def _int64s(raw: bytes, span: tuple[int, int]) -> list[int]:
  """The values of the (packed) Int64List message at `span`."""
  values = []
  for _, s, e in _fields(raw, *span):
    while s < e:
      v, s = _varint(raw, s)
      values.append(v - (1 << 64) if v >> 63 else v)
  return values


def _bytes(raw: bytes, span: tuple[int, int]) -> list[tuple[int, int]]:
  """(start, end) of each value of the BytesList message at `span`."""
  return [(s, e) for _, s, e in _fields(raw, *span)]


class _FastDecoder:
  """Decodes product1m records straight from their `tf.train.Example` bytes.

  TFDS's generic numpy decoding costs ~160 us per record in Python. This walks
  the protobuf wire format of the few fields of this schema and views the
  arrays in the record's own bytes (`np.frombuffer` at an offset): neither the
  protobuf parser's copy of the ~100 KB feature payload nor a second one when
  the field is read (docs/BENCHMARKS.md "Input pipeline"). The layout is
  TFDS's (BYTES-encoded tensors: `features/value` + `features/shape`), and
  `Product1MSource` checks on the first record that this and TFDS's decoding
  agree, falling back to TFDS's if they do not.
  """

  def __init__(self, feature_dtype: np.dtype, with_cls_prob: bool):
    self._dtype = np.dtype(feature_dtype)
    self._with_cls_prob = with_cls_prob

  def _array(self, raw: bytes, span: tuple[int, int], dtype: np.dtype) -> np.ndarray:
    ((s, e),) = _bytes(raw, span)
    return np.frombuffer(raw, dtype, (e - s) // dtype.itemsize, s)

  def _tensor(self, raw: bytes, lists: dict, key: bytes) -> np.ndarray:
    shape = _int64s(raw, lists[key + b'/shape'])
    return self._array(raw, lists[key + b'/value'], self._dtype).reshape(shape)

  def __call__(self, raw: bytes) -> dict[str, Any]:
    lists = _example_lists(raw)
    ((s, e),) = _bytes(raw, lists[b'item_id'])
    item_id = raw[s:e].decode()
    ((s, e),) = _bytes(raw, lists[b'title'])
    out = {
        'item_id': item_id,
        'title': raw[s:e].decode(),
        'token_ids': self._array(raw, lists[b'token_ids'], np.dtype(np.int32)),
        'labels': tuple(raw[s:e].decode() for s, e in _bytes(raw, lists[b'labels'])),
        'image_w': _int64s(raw, lists[b'image_w'])[0],
        'image_h': _int64s(raw, lists[b'image_h'])[0],
        'boxes': self._array(raw, lists[b'boxes'], np.dtype(np.float32)).reshape(-1, 4),
        'features': self._tensor(raw, lists, b'features'),
    }
    if self._with_cls_prob:
      out['cls_prob'] = self._tensor(raw, lists, b'cls_prob')
    return out


def _tfds_to_record(ex: dict[str, Any]) -> dict[str, Any]:
  """TFDS's decoded example -> the same plain record `_FastDecoder` gives."""
  out = dict(ex)
  for key in ('item_id', 'title'):
    out[key] = ex[key].decode() if isinstance(ex[key], bytes) else str(ex[key])
  out['labels'] = tuple(l.decode() if isinstance(l, bytes) else str(l) for l in ex['labels'])
  out['image_w'], out['image_h'] = int(ex['image_w']), int(ex['image_h'])
  return out


def _records_equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
  if a.keys() != b.keys():
    return False
  return all(
      np.array_equal(np.asarray(a[k]), np.asarray(b[k]))
      if isinstance(a[k], np.ndarray)
      else a[k] == b[k]
      for k in a
  )


def _refuse_older_versions(
    tfds_dir: str, storage_dtype: str, with_cls_prob: bool, rebuild: str
) -> None:
  """Raises ValueError if `tfds_dir` holds this config only in a version this code does not read."""
  for version in schema.OLDER_VERSIONS:
    old = schema.dataset_dir(tfds_dir, storage_dtype, with_cls_prob, version)
    if os.path.isdir(old):
      raise ValueError(
          f'{old}: a product1m dataset of an older layout (version {version}: no title token '
          f'ids, no vocab fingerprint; this code reads {schema.DATASET_VERSION}); rebuild it: '
          f'{rebuild.removesuffix(" --overwrite")}'
      )


class Product1MSource:
  """Grain random-access source over one split of the `product1m` TFDS dataset.

  Records are dicts: item_id, title, token_ids [L] int32 (the title's
  WordPiece ids, no [CLS]/[SEP]), labels (tuple of str), image_w, image_h,
  boxes [N, 4] float32, features [N, F] in the storage dtype, and cls_prob
  [N, C] in the `*_cls_prob` configs. Reads go through
  `tfds.data_source(..., deserialize_method=RAW_BYTES)` (batched ArrayRecord
  reads) and `_FastDecoder`.

  `vocab_file`: the run's vocab; the split must have been built with it
  (None: any vocab, e.g. to read item ids; the layout is checked either way).
  """

  def __init__(
      self,
      tfds_dir: str,
      split: str,
      storage_dtype: str = 'float16',
      with_cls_prob: bool = False,
      vocab_file: str | None = None,
  ):
    self._args = dict(
        tfds_dir=tfds_dir,
        split=split,
        storage_dtype=storage_dtype,
        with_cls_prob=with_cls_prob,
        vocab_file=vocab_file,
    )
    name = f'{schema.NAME}/{schema.config_name(storage_dtype, with_cls_prob)}'
    folder = schema.dataset_dir(tfds_dir, storage_dtype, with_cls_prob)
    rebuild = schema.rebuild_command(tfds_dir, storage_dtype, with_cls_prob, vocab_file)
    if not os.path.isdir(folder):
      _refuse_older_versions(tfds_dir, storage_dtype, with_cls_prob, rebuild)
      raise FileNotFoundError(
          f'no {name} dataset under {tfds_dir}; build it with `{rebuild.removesuffix(" --overwrite")}`'
      )
    sources = tfds.data_source(
        name, data_dir=tfds_dir, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES
    )
    if split not in sources:
      raise ValueError(
          f'split {split!r} was not built in {tfds_dir} (built: '
          f'{sorted(sources)}); its annotation file was absent'
      )
    self.split = split
    self.name = name
    self._raw = sources[split]
    self._info = self._raw.dataset_info
    schema.check_identity(folder, self._info.metadata, vocab_file, rebuild)
    self._fast = _FastDecoder(schema.STORAGE_DTYPES[storage_dtype], with_cls_prob)
    self._use_fast = True
    self._item_ids: tuple[str, ...] | None = None  # `item_ids()`, once read
    if len(self._raw):
      first = self._raw[0]
      reference = _tfds_to_record(self._info.features.deserialize_example_np(first))
      if not _records_equal(self._fast(first), reference):
        logging.warning('product1m: fast decoding disagrees with TFDS; using TFDS decoding')
        self._use_fast = False

  def __getstate__(self) -> dict[str, Any]:
    # Readers and protobuf classes do not pickle; Grain worker processes
    # reopen the source from its arguments instead.
    return self._args

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(**state)

  def _decode(self, raw: bytes) -> dict[str, Any]:
    if self._use_fast:
      return self._fast(raw)
    return _tfds_to_record(self._info.features.deserialize_example_np(raw))

  def __len__(self) -> int:
    return len(self._raw)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._decode(self._raw[index])

  def read_records(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    """The decoded records at `indices`, in that order, read one by one.

    Not ArrayRecord's batched `__getitems__`: its thread pool costs more CPU per record than it
    saves (docs/BENCHMARKS.md, "The input against the accelerator"); the parallelism of the
    input is Grain's (read threads, worker processes), one batch each.
    """
    return [self._decode(self._raw[i]) for i in indices]

  def item_ids(self, chunk: int = 1024) -> list[str]:
    """Item ids of the split in record order.

    The ids live inside the records, so the first call reads the whole split (its cost:
    docs/BENCHMARKS.md, "Retrieval at Product1M's size"); the source keeps them, as an
    evaluation asks once per proposer.
    """
    if self._item_ids is None:
      ids: list[str] = []
      for start in range(0, len(self), chunk):
        ids += [
            r['item_id'] for r in self.read_records(range(start, min(start + chunk, len(self))))
        ]
      self._item_ids = tuple(ids)
    return list(self._item_ids)

  def __repr__(self) -> str:
    return f'Product1MSource({self.name}, split={self.split!r}, {len(self)} records)'


INPUT_PATH_FIELDS = (
    'data.data_dir',
    'data.features',
    'data.tfds_dir',
    'data.vocab_file',
    'train.init_path',
)


# Why a dataset in a bucket is not read where it lies (measured: docs/BENCHMARKS.md "Product1M
# from a bucket", `python -m capture_jax.bench.bucket`).
GCS_DATASET_REASON = (
    "array_record's reader opens gs:// shards (riegeli's GCS reader), but each record read at "
    'random is a GCS request of its own: 81 ms a record against the GCS emulator (12 records/s '
    'on one thread, 15 with 4) against 0.02 ms from local disk; the input reads records one by '
    'one in data.read_threads threads, and its target of 6,000 samples/s per core would need '
    '6,000 x (seconds a request) reads in flight per core: 490 at 81 ms, still 60 at 10 ms'
)


def require_local_inputs(config: ml_collections.ConfigDict) -> None:
  """Refuses a `gs://` input path before anything starts: inputs are read from local disk (or a
  mounted bucket); only outputs (workdir, export and evaluation folders) can be in a bucket."""
  for field in INPUT_PATH_FIELDS:
    section, name = field.split('.')
    value = config.get(section, ml_collections.ConfigDict()).get(name)
    if not value:
      continue
    try:
      storage.require_local(value, f'--config.{field}')
    except ValueError as err:
      if field != 'data.tfds_dir':
        raise
      raise ValueError(f'{err} Why not read in place: {GCS_DATASET_REASON}.') from None


def make_source(config: ml_collections.ConfigDict, split: str) -> Product1MSource:
  """The split's source as the config reads it (storage dtype; `cls_prob` for the class MRM target)."""
  d = config.data
  require_local_inputs(config)
  classes = config.get('model', ml_collections.ConfigDict()).get('mrm_target') == 'class'
  return Product1MSource(
      d.tfds_dir, split, d.storage_dtype, with_cls_prob=classes, vocab_file=d.vocab_file or None
  )


# --------------------------------------------------------------------------
# How this process reads.


def process_shard(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """(index, count) of this process; defaults from jax.process_index/count()."""
  if process_index is None or process_count is None:
    import jax  # deferred: only multi-host runs need it, and it is slow to import

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  return int(process_index), int(process_count)


def per_process_batch(global_batch: int, process_count: int) -> int:
  """This process's share of a global batch."""
  if global_batch % process_count:
    raise ValueError(f'batch size {global_batch} does not split over {process_count} processes')
  return global_batch // process_count


def read_options(config: ml_collections.ConfigDict) -> grain.ReadOptions:
  """Grain's read threads and prefetch buffer from `config.data`."""
  d = config.data
  return grain.ReadOptions(
      num_threads=d.read_threads, prefetch_buffer_size=max(d.prefetch_batches, d.read_threads)
  )
