"""The Grain input pipeline: product1m ArrayRecords -> model batches.

Training (`make_train_iterator`)::

    source (tfds.data_source, one split)
      -> global shuffle by seed, a new permutation every epoch, repeated
         forever or for data.num_epochs (`ShuffledIndices`)
      -> tag every record with its position in that global stream
      -> this process's shard: positions p, p + n, p + 2n, ... (n processes)
      -> batch, and per batch: tokenise, MLM + MRM masking, pad, global token

Because process p takes every n-th position and batches are cut after
sharding, global batch b is exactly the positions [b*B, (b+1)*B) of the
stream whatever the number of processes. Masking draws come from a
counter-based hash of (seed, position), so a record's masks depend only on
the seed and its position: not on the batch size, the thread that built it,
or whether the run was resumed. The iterator is a Grain `DatasetIterator`;
`get_state()` / `set_state()` checkpoint and restore the exact position.

Evaluation (`make_eval_iterator`) reads a split in file order without
masking, pads the last batch, and yields `EvalBatch`es: the model inputs,
`is_valid [B]`, and the item ids and labels kept outside the device arrays.
`make_instance_eval_iterator` does the same for instance-level queries, one
row per product instance with the visual input restricted to its regions.

Batch dict (B = per-process batch, T = data.max_text_len, R = data.max_regions,
F = data.feature_dim), exactly these keys::

    input_ids [B,T] int32       input_mask [B,T] int32     segment_ids [B,T] int32
    image_feat [B,R+1,F] f32    image_loc [B,R+1,5] f32    image_mask [B,R+1] int32
    lm_label_ids [B,T] int32    image_label [B,R] int32    image_target [B,R,F] f32

(`image_target` is `[B,R,C]` detector class distributions when
model.mrm_target == 'class'.)
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import sys
from typing import Any, Iterator, Sequence

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from capture_jax.data import formats
from capture_jax.data import product1m_tfds
from capture_jax.data import tokenizer as tokenizer_lib

MODEL_KEYS = (
    'input_ids',
    'input_mask',
    'segment_ids',
    'image_feat',
    'image_loc',
    'image_mask',
    'lm_label_ids',
    'image_label',
    'image_target',
)

# --------------------------------------------------------------------------
# Counter-based randomness: uniforms as a pure function of (key, stream, index).

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_STEP = np.uint64(0xD1B54A32D192ED03)
_STREAM_MLM_CHOOSE, _STREAM_MLM_ACTION, _STREAM_MLM_TOKEN = 1, 2, 3
_STREAM_MRM_CHOOSE, _STREAM_MRM_ZERO = 4, 5


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64 finaliser on a uint64 array (wrapping arithmetic)."""
  z = x + _GOLDEN
  z = (z ^ (z >> np.uint64(30))) * _MIX1
  z = (z ^ (z >> np.uint64(27))) * _MIX2
  return z ^ (z >> np.uint64(31))


def record_keys(seed: int, positions: np.ndarray) -> np.ndarray:
  """[B] uint64 keys of records from the seed and their stream positions."""
  base = _splitmix64(np.array([seed], np.uint64) ^ np.uint64(0x5EED5EED5EED5EED))
  return _splitmix64(base ^ np.asarray(positions).astype(np.uint64))


def uniforms(keys: np.ndarray, stream: int, n: int) -> np.ndarray:
  """[B, n] float64 uniforms in [0, 1) for keys [B], one independent stream each."""
  counter = (np.uint64(stream) << np.uint64(32)) + np.arange(1, n + 1, dtype=np.uint64)
  bits = _splitmix64(keys.astype(np.uint64)[:, None] ^ (counter * _STEP)[None, :])
  return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# --------------------------------------------------------------------------
# Masking recipe of the reference, vectorised over the batch.


@dataclasses.dataclass(frozen=True)
class MaskingSpec:
  """MLM/MRM probabilities and the tokenizer's special ids."""

  mlm_probability: float
  mask_probability: float  # chosen token -> [MASK]
  random_probability: float  # chosen token -> random token; otherwise kept
  mrm_probability: float
  zero_probability: float  # chosen region -> zero feature; otherwise kept
  vocab_size: int
  mask_id: int
  special_ids: tuple[int, ...]  # never chosen: [CLS], [SEP], [PAD]

  @classmethod
  def from_config(
      cls, data: ml_collections.ConfigDict, encoder: tokenizer_lib.TextEncoder
  ) -> 'MaskingSpec':
    return cls(
        data.mlm_probability,
        data.mlm_mask_probability,
        data.mlm_random_probability,
        data.mrm_probability,
        data.mrm_zero_probability,
        encoder.vocab_size,
        encoder.mask_id,
        (encoder.cls_id, encoder.sep_id, encoder.pad_id),
    )


def mask_tokens(
    input_ids: np.ndarray, input_mask: np.ndarray, keys: np.ndarray, spec: MaskingSpec
) -> tuple[np.ndarray, np.ndarray]:
  """MLM: each caption token is chosen with p; 80/10/10 [MASK]/random/kept.

  Args:
    input_ids, input_mask: [B, T] int32.
    keys: [B] uint64 record keys.
  Returns:
    masked input_ids [B, T] int32 and lm_label_ids [B, T] int32 (the original
    id where chosen, -1 elsewhere, including [CLS], [SEP] and padding).
  """
  t = input_ids.shape[1]
  special = np.isin(input_ids, spec.special_ids) | (input_mask == 0)
  chosen = (uniforms(keys, _STREAM_MLM_CHOOSE, t) < spec.mlm_probability) & ~special
  action = uniforms(keys, _STREAM_MLM_ACTION, t)
  to_mask = chosen & (action < spec.mask_probability)
  to_random = chosen & ~to_mask & (action < spec.mask_probability + spec.random_probability)
  random_ids = (uniforms(keys, _STREAM_MLM_TOKEN, t) * spec.vocab_size).astype(np.int32)
  out = np.where(to_mask, np.int32(spec.mask_id), np.where(to_random, random_ids, input_ids))
  labels = np.where(chosen, input_ids, np.int32(-1))
  return out.astype(np.int32), labels.astype(np.int32)


def mask_regions(
    feat: np.ndarray, region_mask: np.ndarray, keys: np.ndarray, spec: MaskingSpec
) -> tuple[np.ndarray, np.ndarray]:
  """MRM: each valid region is chosen with p; a chosen region is zeroed with p0.

  Args:
    feat: [B, R, F] float32 region features (not modified).
    region_mask: [B, R] 1 for valid regions.
    keys: [B] uint64 record keys.
  Returns:
    masked features [B, R, F] float32 and image_label [B, R] int32 (1 where
    chosen, -1 elsewhere). The regression target is `feat` itself.
  """
  zero, image_label = _choose_regions(region_mask, keys, spec)
  return feat * (~zero)[..., None].astype(feat.dtype), image_label


def _choose_regions(
    region_mask: np.ndarray, keys: np.ndarray, spec: MaskingSpec
) -> tuple[np.ndarray, np.ndarray]:
  """[B, R] regions to zero (bool) and image_label (1 chosen, -1 not)."""
  r = region_mask.shape[1]
  chosen = (uniforms(keys, _STREAM_MRM_CHOOSE, r) < spec.mrm_probability) & (region_mask > 0)
  zero = chosen & (uniforms(keys, _STREAM_MRM_ZERO, r) < spec.zero_probability)
  return zero, np.where(chosen, np.int32(1), np.int32(-1))


# --------------------------------------------------------------------------
# Reading the TFDS dataset.


class _FastDecoder:
  """Decodes product1m records straight from their `tf.train.Example` bytes.

  TFDS's generic numpy decoding costs ~160 us per record in Python; reading
  the few fields of this schema directly costs ~10 us. The layout is TFDS's
  (BYTES-encoded tensors: `features/value` + `features/shape`), and
  `Product1MSource` checks on the first record that both decoders agree,
  falling back to TFDS's if they do not.
  """

  def __init__(self, feature_dtype: np.dtype, with_cls_prob: bool):
    from tensorflow_datasets.proto import tf_example_pb2  # TFDS's bundled proto

    self._parse = tf_example_pb2.Example.FromString
    self._dtype = np.dtype(feature_dtype)
    self._with_cls_prob = with_cls_prob

  def _tensor(self, f, key: str) -> np.ndarray:
    shape = tuple(f[f'{key}/shape'].int64_list.value)
    return np.frombuffer(f[f'{key}/value'].bytes_list.value[0], self._dtype).reshape(shape)

  def __call__(self, raw: bytes) -> dict[str, Any]:
    f = self._parse(raw).features.feature
    out = {
        'item_id': f['item_id'].bytes_list.value[0].decode(),
        'title': f['title'].bytes_list.value[0].decode(),
        'labels': tuple(v.decode() for v in f['labels'].bytes_list.value),
        'image_w': int(f['image_w'].int64_list.value[0]),
        'image_h': int(f['image_h'].int64_list.value[0]),
        'boxes': np.frombuffer(f['boxes'].bytes_list.value[0], np.float32).reshape(-1, 4),
        'features': self._tensor(f, 'features'),
    }
    if self._with_cls_prob:
      out['cls_prob'] = self._tensor(f, 'cls_prob')
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


class Product1MSource:
  """Grain random-access source over one split of the `product1m` TFDS dataset.

  Records are dicts: item_id, title, labels (tuple of str), image_w, image_h,
  boxes [N, 4] float32, features [N, F] in the storage dtype, and cls_prob
  [N, C] in the `*_cls_prob` configs. Reads go through
  `tfds.data_source(..., deserialize_method=RAW_BYTES)` (batched ArrayRecord
  reads) and `_FastDecoder`.
  """

  def __init__(
      self, tfds_dir: str, split: str, storage_dtype: str = 'float16', with_cls_prob: bool = False
  ):
    self._args = dict(
        tfds_dir=tfds_dir, split=split, storage_dtype=storage_dtype, with_cls_prob=with_cls_prob
    )
    name = f'{product1m_tfds.NAME}/{product1m_tfds.config_name(storage_dtype, with_cls_prob)}'
    if not os.path.isdir(product1m_tfds.dataset_dir(tfds_dir, storage_dtype, with_cls_prob)):
      raise FileNotFoundError(
          f'no {name} dataset under {tfds_dir}; build it with `python -m '
          f'capture_jax.data.product1m_tfds --data_dir DATA --out {tfds_dir}`'
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
    self._fast = _FastDecoder(product1m_tfds.STORAGE_DTYPES[storage_dtype], with_cls_prob)
    self._use_fast = True
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
    """The decoded records at `indices`, in that order (one batched ArrayRecord read)."""
    return [self._decode(r) for r in self._raw.__getitems__(list(indices))]

  def __repr__(self) -> str:
    return f'Product1MSource({self.name}, split={self.split!r}, {len(self)} records)'


# --------------------------------------------------------------------------
# Records -> arrays.


def pack_regions(
    records: Sequence[dict[str, Any]],
    max_regions: int,
    feature_dim: int,
    key: str = 'features',
    offset: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Pads records' regions into arrays; regions beyond `max_regions` are dropped.

  Args:
    offset: leading empty slots per sample (1 leaves room for the global
      token, so the model's `image_feat` is filled in place).
  Returns:
    feat [B, offset + R, D] float32 (D = feature_dim, the width of `key`),
    loc [B, R, 5] float32 box encodings (zero at padding), mask [B, R] int32.
  """
  b = len(records)
  # np.empty + zeroing only the padding: at paper sizes the batch buffer is
  # 77 MB, and a full memset is a pass over it for nothing.
  feat = np.empty((b, offset + max_regions, feature_dim), np.float32)
  feat[:, :offset] = 0
  boxes = np.zeros((b, max_regions, 4), np.float32)
  mask = np.zeros((b, max_regions), np.int32)
  size = np.ones((b, 2), np.float32)
  for i, r in enumerate(records):
    x = r[key]
    if x.shape[1] != feature_dim:
      raise ValueError(
          f'item {r["item_id"]}: {key} width {x.shape[1]} in the dataset, '
          f'expected {feature_dim} (config data.feature_dim / v_target_size)'
      )
    n = min(x.shape[0], max_regions)
    feat[i, offset : offset + n] = x[:n]
    feat[i, offset + n :] = 0
    boxes[i, :n] = r['boxes'][:n]
    mask[i, :n] = 1
    size[i] = r['image_w'], r['image_h']
  loc = formats.encode_boxes(boxes, size[:, 0:1], size[:, 1:2]) * mask[..., None]
  return feat, loc, mask


@dataclasses.dataclass(frozen=True)
class BatchSpec:
  """Everything `collate` needs (picklable, for Grain worker processes)."""

  encoder: tokenizer_lib.TextEncoder
  masking: MaskingSpec
  max_regions: int
  feature_dim: int
  seed: int
  target_key: str = 'features'  # 'cls_prob' for the classification MRM target
  target_dim: int | None = None


def collate(
    records: Sequence[dict[str, Any]], positions: np.ndarray | None, spec: BatchSpec
) -> dict[str, np.ndarray]:
  """Records -> the model's batch dict; masked iff `positions` is given.

  Equivalent to `mask_regions` followed by `formats.add_global_token`, but
  the features are written once into the final `[B, R+1, F]` buffer and
  masked in place (this is the pipeline's hot loop).

  Args:
    records: decoded records.
    positions: [B] global stream positions (seed the masks); None = no masking
      (evaluation): labels are -1 and features untouched.
  """
  ids, input_mask = spec.encoder([r['title'] for r in records])
  image_feat, loc, region_mask = pack_regions(records, spec.max_regions, spec.feature_dim, offset=1)
  regions = image_feat[:, 1:]  # a view: masking below writes into image_feat
  if spec.target_key == 'features':
    target = regions.copy()  # before masking
  else:
    target = pack_regions(records, spec.max_regions, spec.target_dim, spec.target_key)[0]
  if positions is None:
    image_label = np.full(region_mask.shape, -1, np.int32)
    lm_label_ids = np.full(ids.shape, -1, np.int32)
  else:
    keys = record_keys(spec.seed, positions)
    ids, lm_label_ids = mask_tokens(ids, input_mask, keys, spec.masking)
    zero, image_label = _choose_regions(region_mask, keys, spec.masking)
    regions[zero] = 0.0
  # The global token is the mean of the regions *after* masking, as released.
  m = region_mask.astype(np.float32)
  image_feat[:, 0] = (m[:, None, :] @ regions)[:, 0] / np.maximum(m.sum(1), 1.0)[:, None]
  b = len(records)
  image_loc = np.empty((b, spec.max_regions + 1, 5), np.float32)
  image_loc[:, 0] = formats.GLOBAL_LOC
  image_loc[:, 1:] = loc
  image_mask = np.ones((b, spec.max_regions + 1), np.int32)
  image_mask[:, 1:] = region_mask
  return {
      'input_ids': ids,
      'input_mask': input_mask,
      'segment_ids': np.zeros_like(ids),
      'image_feat': image_feat,
      'image_loc': image_loc,
      'image_mask': image_mask,
      'lm_label_ids': lm_label_ids,
      'image_label': image_label,
      'image_target': target,
  }


@dataclasses.dataclass(frozen=True)
class _TrainBatchLoader:
  """Batch index -> this process's training batch (a Grain map function).

  Process p of n takes stream positions p, p + n, p + 2n, ...; its batch b
  holds the positions (b * B + j) * n + p, j < B, so global batch b is
  positions [b * B * n, (b + 1) * B * n) whatever n is. Grain's element is
  the whole batch: its per-element bookkeeping (~60 us) is paid once per
  batch, and the records are fetched in one batched ArrayRecord read.
  """

  source: 'Product1MSource'
  indices: 'ShuffledIndices'
  spec: BatchSpec
  batch_size: int  # per process
  process_index: int
  process_count: int

  def __call__(self, batch_index: int) -> dict[str, np.ndarray]:
    j = np.arange(self.batch_size, dtype=np.int64)
    positions = (int(batch_index) * self.batch_size + j) * self.process_count + self.process_index
    records = self.source.read_records(self.indices.take(positions).tolist())
    return collate(records, positions, self.spec)


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
# Configuration helpers.


def process_shard(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """(index, count) of this process; defaults from jax.process_index/count()."""
  if process_index is None or process_count is None:
    import jax  # deferred: only multi-host runs need it, and it is slow to import

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  return int(process_index), int(process_count)


def _per_process(global_batch: int, process_count: int) -> int:
  if global_batch % process_count:
    raise ValueError(f'batch size {global_batch} does not split over {process_count} processes')
  return global_batch // process_count


def make_batch_spec(config: ml_collections.ConfigDict) -> BatchSpec:
  """Tokenizer, masking and sizes from `config.data` (and model.mrm_target)."""
  d = config.data
  if not d.vocab_file:
    raise ValueError(
        'config.data.vocab_file is empty; train one with `python -m '
        'capture_jax.data.tokenizer train --data_dir DIR --out vocab.txt`'
    )
  encoder = tokenizer_lib.TextEncoder(d.vocab_file, d.max_text_len)
  model = config.get('model', ml_collections.ConfigDict())
  vocab_size = model.get('vocab_size', encoder.vocab_size)
  if vocab_size < encoder.vocab_size:
    raise ValueError(
        f'model.vocab_size {vocab_size} < {encoder.vocab_size} tokens in {d.vocab_file}'
    )
  classes = model.get('mrm_target', 'feature') == 'class'
  return BatchSpec(
      encoder,
      MaskingSpec.from_config(d, encoder),
      d.max_regions,
      d.feature_dim,
      d.shuffle_seed,
      target_key='cls_prob' if classes else 'features',
      target_dim=model.get('v_target_size') if classes else None,
  )


def make_source(config: ml_collections.ConfigDict, split: str) -> Product1MSource:
  d = config.data
  classes = config.get('model', ml_collections.ConfigDict()).get('mrm_target') == 'class'
  return Product1MSource(d.tfds_dir, split, d.storage_dtype, with_cls_prob=classes)


def _read_options(config: ml_collections.ConfigDict) -> grain.ReadOptions:
  d = config.data
  return grain.ReadOptions(
      num_threads=d.read_threads, prefetch_buffer_size=max(d.prefetch_batches, d.read_threads)
  )


# --------------------------------------------------------------------------
# Training.


def make_train_dataset(
    config: ml_collections.ConfigDict,
    *,
    split: str = 'train',
    process_index: int | None = None,
    process_count: int | None = None,
    batch_size: int | None = None,
    source: Product1MSource | None = None,
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
  """
  d = config.data
  index, count = process_shard(process_index, process_count)
  per_process = _per_process(batch_size or d.batch_size, count)
  spec = make_batch_spec(config)
  source = source or make_source(config, split)
  if len(source) == 0:
    raise ValueError(f'{source} is empty')
  indices = ShuffledIndices(len(source), d.shuffle_seed, d.num_epochs)
  # Every process yields the same number of full batches: a finite stream is
  # cut to a multiple of the global batch.
  num_batches = len(indices) // (per_process * count)
  loader = _TrainBatchLoader(source, indices, spec, per_process, index, count)
  ds = grain.MapDataset.range(num_batches).map(loader)
  it = ds.to_iter_dataset(_read_options(config))
  if d.num_workers > 0:
    _ensure_absl_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.num_workers))
  return it


def _ensure_absl_flags_parsed() -> None:
  """Grain's worker processes read its absl flags, which raises outside an
  `absl.app` program unless the flags are parsed; use their defaults then."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_train_iterator(config: ml_collections.ConfigDict, **kwargs: Any) -> grain.DatasetIterator:
  """A checkpointable iterator of training batches (dicts of `MODEL_KEYS`).

  `it.get_state()` returns a small JSON-able dict; `it.set_state(state)` on a
  fresh iterator of the same config continues with exactly the batches the
  original would have produced next. Keyword arguments as `make_train_dataset`.
  """
  return iter(make_train_dataset(config, **kwargs))


# --------------------------------------------------------------------------
# Evaluation.


@dataclasses.dataclass
class EvalBatch:
  """One evaluation batch.

  Attributes:
    inputs: the model's batch dict (`MODEL_KEYS`), unmasked: lm_label_ids and
      image_label are all -1; padding rows are zero.
    is_valid: [B] int32, 0 for padding rows of the last batch.
    item_id: [B] numpy str array ('' at padding), kept off the device.
    labels: B tuples of labels (empty at padding and for unlabelled splits).
    instance_label: [B] str array, for instance-level batches ('' otherwise).
    instance_index: [B] int32, the instance's position in its sample's
      sidecar entry (-1 otherwise).
  """

  inputs: dict[str, np.ndarray]
  is_valid: np.ndarray
  item_id: np.ndarray
  labels: list[tuple[str, ...]]
  instance_label: np.ndarray
  instance_index: np.ndarray


def num_eval_batches(num_rows: int, batch_per_process: int, process_count: int) -> int:
  """Batches every process yields (equal across processes, for collectives)."""
  return max(1, math.ceil(math.ceil(num_rows / process_count) / batch_per_process))


def _pad_rows(rows: list[Any], size: int) -> list[Any]:
  return rows + [None] * (size - len(rows))


def _zero_inputs(batch: int, spec: BatchSpec) -> dict[str, np.ndarray]:
  """Model inputs of padding rows: zeros, and -1 labels."""
  t, r, f = spec.encoder.max_len, spec.max_regions, spec.feature_dim
  target_dim = f if spec.target_key == 'features' else spec.target_dim
  i32 = lambda *shape: np.zeros((batch,) + shape, np.int32)
  f32 = lambda *shape: np.zeros((batch,) + shape, np.float32)
  return {
      'input_ids': i32(t),
      'input_mask': i32(t),
      'segment_ids': i32(t),
      'image_feat': f32(r + 1, f),
      'image_loc': f32(r + 1, 5),
      'image_mask': i32(r + 1),
      'lm_label_ids': i32(t) - 1,
      'image_label': i32(r) - 1,
      'image_target': f32(r, target_dim),
  }


def _eval_batch(
    rows: Sequence[tuple[dict[str, Any], str, int] | None], spec: BatchSpec
) -> EvalBatch:
  """Collates (record, instance_label, instance_index) rows; None rows are padding."""
  is_valid = np.array([r is not None for r in rows], np.int32)
  valid = [r[0] for r in rows if r is not None]
  inputs = _zero_inputs(len(rows), spec)
  if valid:
    where = np.flatnonzero(is_valid)
    for key, arr in collate(valid, None, spec).items():
      inputs[key][where] = arr
  item_id = np.array([r[0]['item_id'] if r else '' for r in rows], dtype=object).astype(str)
  labels = [tuple(r[0]['labels']) if r else () for r in rows]
  inst_label = np.array([r[1] if r else '' for r in rows], dtype=object).astype(str)
  inst_index = np.array([r[2] if r else -1 for r in rows], np.int32)
  return EvalBatch(inputs, is_valid, item_id, labels, inst_label, inst_index)


def _load_eval_rows(
    source: Product1MSource,
    plan: np.ndarray,
    regions: Sequence[tuple[str, int, tuple[int, ...] | None]] | None,
    spec: BatchSpec,
) -> EvalBatch:
  """Reads the records of one batch plan ([B] row ids, -1 = padding)."""
  valid = plan[plan >= 0]
  if regions is None:
    records = source.read_records([int(i) for i in valid]) if len(valid) else []
    rows = iter((rec, '', -1) for rec in records)
  else:
    wanted = [regions[int(i)] for i in valid]
    records = source.read_records([w[1] for w in wanted]) if wanted else []
    rows = iter((restrict_regions(rec, w[2]), w[0], w[3]) for rec, w in zip(records, wanted))
  return _eval_batch([next(rows) if i >= 0 else None for i in plan], spec)


def _eval_plan(
    num_rows: int, batch_per_process: int, process_index: int, process_count: int
) -> np.ndarray:
  """[num_batches, B] row ids of this process (strided shard), -1 padding."""
  mine = np.arange(process_index, num_rows, process_count)
  n = num_eval_batches(num_rows, batch_per_process, process_count)
  plan = np.full(n * batch_per_process, -1, np.int64)
  plan[: len(mine)] = mine
  return plan.reshape(n, batch_per_process)


def _eval_iterator(
    config: ml_collections.ConfigDict,
    source: Product1MSource,
    num_rows: int,
    regions,
    process_index,
    process_count,
    batch_size,
) -> Iterator[EvalBatch]:
  index, count = process_shard(process_index, process_count)
  per_process = _per_process(batch_size or config.data.eval_batch_size, count)
  spec = make_batch_spec(config)
  plan = _eval_plan(num_rows, per_process, index, count)
  ds = grain.MapDataset.source(list(plan)).map(
      functools.partial(_load_eval_rows, source, regions=regions, spec=spec)
  )
  return iter(ds.to_iter_dataset(_read_options(config)))


def make_eval_iterator(
    config: ml_collections.ConfigDict,
    split: str,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    batch_size: int | None = None,
    source: Product1MSource | None = None,
) -> Iterator[EvalBatch]:
  """`EvalBatch`es of a split in file order, unmasked, last batch padded.

  With n processes, process p reads rows p, p + n, ... (in order); every
  process yields `num_eval_batches(len(split), B, n)` batches, padding with
  invalid rows as needed. `batch_size` is global (default
  config.data.eval_batch_size).
  """
  source = source or make_source(config, split)
  return _eval_iterator(config, source, len(source), None, process_index, process_count, batch_size)


def restrict_regions(record: dict[str, Any], region_indices: Sequence[int]) -> dict[str, Any]:
  """The record with only the given regions (an instance's), in the given order.

  Indices beyond the stored regions (truncated at build time) are dropped.
  """
  n = record['features'].shape[0]
  keep = np.array([i for i in region_indices if 0 <= i < n], np.int64)
  out = dict(record)
  out['features'] = record['features'][keep]
  out['boxes'] = record['boxes'][keep]
  if 'cls_prob' in record:
    out['cls_prob'] = record['cls_prob'][keep]
  return out


def instance_inputs(
    record: dict[str, Any], region_indices: Sequence[int], spec: BatchSpec
) -> dict[str, np.ndarray]:
  """The unmasked model inputs (batch of 1) of one instance of a sample: the
  full title, and as visual input only that instance's regions (their mean as
  the global token)."""
  return collate([restrict_regions(record, region_indices)], None, spec)


def read_split_item_ids(source: Product1MSource, chunk: int = 1024) -> list[str]:
  """Item ids of a split in record order."""
  ids: list[str] = []
  for start in range(0, len(source), chunk):
    ids += [
        r['item_id'] for r in source.read_records(range(start, min(start + chunk, len(source))))
    ]
  return ids


def make_instance_eval_iterator(
    config: ml_collections.ConfigDict,
    split: str,
    *,
    instances: dict[str, list[formats.Instance]] | str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    batch_size: int | None = None,
    source: Product1MSource | None = None,
) -> Iterator[EvalBatch]:
  """`EvalBatch`es with one row per product instance of each sample.

  Rows follow the split's order, then the sidecar's instance order; each has
  the sample's title and only the instance's regions. `instance_label` and
  `instance_index` say which instance a row is. Samples absent from the
  sidecar are skipped, as are instances with no region left after
  truncation (both logged).

  Args:
    instances: item_id -> instances, or a sidecar path; default
      `{config.data.data_dir}/instances_{split}.jsonl`.
  """
  source = source or make_source(config, split)
  if instances is None or isinstance(instances, str):
    path = instances or os.path.join(config.data.data_dir, formats.instances_filename(split))
    instances = formats.read_instances(path)
  rows: list[tuple[str, int, tuple[int, ...], int]] = []
  missing = empty = 0
  for i, item_id in enumerate(read_split_item_ids(source)):
    if item_id not in instances:
      missing += 1
      continue
    for k, inst in enumerate(instances[item_id]):
      regions = tuple(r for r in inst.regions if r < config.data.max_regions)
      if not regions:
        empty += 1
        continue
      rows.append((inst.label, i, regions, k))
  if missing or empty:
    logging.warning(
        '%s: %d samples without instances in the sidecar, %d instances with no '
        'region within max_regions; skipped',
        split,
        missing,
        empty,
    )
  return _eval_iterator(config, source, len(rows), rows, process_index, process_count, batch_size)
