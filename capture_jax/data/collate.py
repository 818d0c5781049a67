"""Records -> batches: tokenisation and region packing.

`collate` turns decoded records (`source.Product1MSource`) into a host batch
(the storage layout of `capture_jax.batch`: features in their storage dtype,
unmasked, with the records' stream positions); the masking, the MRM target
and the global token are made on the devices (`masking.model_batch`).
`eval_batch` makes the unmasked float32 model batch of evaluation and export
on the host. `restrict_regions` keeps one product instance's regions of a
record (instance-level queries).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import ml_collections
import numpy as np

from capture_jax import batch as batch_lib
from capture_jax.data import formats
from capture_jax.data import tokenizer as tokenizer_lib


def pack_regions(
    records: Sequence[dict[str, Any]],
    max_regions: int,
    feature_dim: int,
    key: str = 'features',
    offset: int = 0,
    dtype: Any = np.float32,
    allocate: Callable[[tuple[int, ...], Any], np.ndarray] = np.empty,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Pads records' regions into arrays; regions beyond `max_regions` are dropped.

  Args:
    offset: leading empty slots per sample (1 leaves room for the global
      token, so the model's `image_feat` is filled in place).
    dtype: of `feat` (the storage dtype for the host batch: no conversion).
    allocate: `(shape, dtype) -> uninitialised array` for `feat` (a shared-memory
      block in a Grain worker process: handed over without a copy).
  Returns:
    feat [B, offset + R, D] `dtype` (D = feature_dim, the width of `key`),
    loc [B, R, 5] float32 box encodings (zero at padding), mask [B, R] int32.
  """
  b = len(records)
  # np.empty + zeroing only the padding: a full memset of the batch buffer
  # is a pass over it for nothing.
  feat = allocate((b, offset + max_regions, feature_dim), dtype)
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
  loc = formats.encode_boxes(boxes, size[:, 0:1], size[:, 1:2])  # float32
  loc *= mask[..., None]
  return feat, loc, mask


@dataclasses.dataclass(frozen=True)
class BatchSpec:
  """Everything `collate` needs (picklable, for Grain worker processes)."""

  encoder: tokenizer_lib.TextEncoder
  max_regions: int
  feature_dim: int
  feature_dtype: str = 'float16'  # data.storage_dtype: the host batch's region_feat
  target_key: str = 'features'  # 'cls_prob' for the classification MRM target
  target_dim: int | None = None

  @property
  def layout(self) -> batch_lib.BatchLayout:
    """The layout of the batches `collate` (host) and `eval_batch` (model) make."""
    classes = self.target_key != 'features'
    target = self.target_dim if classes else self.feature_dim
    return batch_lib.BatchLayout(
        self.encoder.max_len,
        self.max_regions,
        self.feature_dim,
        target,
        self.feature_dtype,
        classes,
    )


def collate(
    records: Sequence[dict[str, Any]],
    positions: np.ndarray | None,
    spec: BatchSpec,
    allocate: Callable[[tuple[int, ...], Any], np.ndarray] = np.empty,
) -> dict[str, np.ndarray]:
  """Records -> the host batch (`spec.layout.host_keys`): what storage holds, unmasked.

  Args:
    records: decoded records (features in the storage dtype).
    positions: [B] global stream positions (what the device stage's draws
      are a function of); None leaves `positions` out (`eval_batch`).
    allocate: for the feature arrays (`pack_regions`).
  """
  ids, input_mask = spec.encoder.pack([r['token_ids'] for r in records])
  dtype = spec.layout.host_shapes(0)['region_feat'][1]
  feat, loc, region_mask = pack_regions(
      records, spec.max_regions, spec.feature_dim, dtype=dtype, allocate=allocate
  )
  out = {
      'input_ids': ids,
      'input_mask': input_mask,
      'region_feat': feat,
      'region_loc': loc,
      'region_mask': region_mask,
  }
  if positions is not None:
    out['positions'] = batch_lib.encode_positions(positions)
  if spec.target_key != 'features':
    out[batch_lib.CLASS_TARGET_KEY] = pack_regions(
        records, spec.max_regions, spec.target_dim, spec.target_key, dtype=dtype, allocate=allocate
    )[0]
  return out


def eval_batch(records: Sequence[dict[str, Any]], spec: BatchSpec) -> dict[str, np.ndarray]:
  """Records -> the unmasked float32 model batch (`TRAIN_KEYS`) of evaluation and export: the
  inputs untouched, labels -1, the global token the mean of the regions."""
  host = collate(records, None, spec)
  b, r = host['region_mask'].shape
  image_feat = np.empty((b, r + 1, spec.feature_dim), np.float32)
  regions = image_feat[:, 1:]
  regions[:] = host['region_feat']
  m = host['region_mask'].astype(np.float32)
  image_feat[:, 0] = (m[:, None, :] @ regions)[:, 0] / np.maximum(m.sum(1), 1.0)[:, None]
  image_loc = np.empty((b, r + 1, batch_lib.LOC_DIM), np.float32)
  image_loc[:, 0] = formats.GLOBAL_LOC
  image_loc[:, 1:] = host['region_loc']
  image_mask = np.ones((b, r + 1), np.int32)
  image_mask[:, 1:] = host['region_mask']
  target = host.get(batch_lib.CLASS_TARGET_KEY, host['region_feat'])
  ids = host['input_ids']
  return {
      'input_ids': ids,
      'input_mask': host['input_mask'],
      'segment_ids': np.zeros_like(ids),
      'image_feat': image_feat,
      'image_loc': image_loc,
      'image_mask': image_mask,
      'lm_label_ids': np.full(ids.shape, -1, np.int32),
      'image_label': np.full((b, r), -1, np.int32),
      'image_target': target.astype(np.float32),
  }


def make_batch_spec(config: ml_collections.ConfigDict) -> BatchSpec:
  """Tokenizer, sizes and storage dtype from `config.data` (and model.mrm_target)."""
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
      d.max_regions,
      d.feature_dim,
      d.storage_dtype,
      target_key='cls_prob' if classes else 'features',
      target_dim=model.get('v_target_size') if classes else None,
  )


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
