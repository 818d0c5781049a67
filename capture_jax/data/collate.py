"""Records -> batches: tokenisation, region packing, masking and the global token.

`collate` turns decoded records (`source.Product1MSource`) into a batch of
the layout `capture_jax.batch` owns; it masks (MLM + MRM, `masking`) when
given the records' stream positions, and leaves the inputs untouched for
evaluation. `restrict_regions` keeps one product instance's regions of a
record (instance-level queries).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import ml_collections
import numpy as np

from capture_jax import batch as batch_lib
from capture_jax.data import formats
from capture_jax.data import masking as masking_lib
from capture_jax.data import tokenizer as tokenizer_lib


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
  masking: masking_lib.MaskingSpec
  max_regions: int
  feature_dim: int
  seed: int
  target_key: str = 'features'  # 'cls_prob' for the classification MRM target
  target_dim: int | None = None

  @property
  def layout(self) -> batch_lib.BatchLayout:
    """The layout of the batches `collate` makes."""
    target = self.feature_dim if self.target_key == 'features' else self.target_dim
    return batch_lib.BatchLayout(self.encoder.max_len, self.max_regions, self.feature_dim, target)


def collate(
    records: Sequence[dict[str, Any]], positions: np.ndarray | None, spec: BatchSpec
) -> dict[str, np.ndarray]:
  """Records -> the model's batch dict; masked iff `positions` is given.

  Equivalent to `tests.helpers.reference_mask_regions` followed by `formats.add_global_token`, but
  the features are written once into the final `[B, R+1, F]` buffer and
  masked in place (this is the pipeline's hot loop).

  Args:
    records: decoded records.
    positions: [B] global stream positions (seed the masks); None = no masking
      (evaluation): labels are -1 and features untouched.
  """
  ids, input_mask = spec.encoder.pack([r['token_ids'] for r in records])
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
    keys = masking_lib.record_keys(spec.seed, positions)
    ids, lm_label_ids = masking_lib.mask_tokens(ids, input_mask, keys, spec.masking)
    zero, image_label = masking_lib.choose_regions(region_mask, keys, spec.masking)
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
      masking_lib.MaskingSpec.from_config(d, encoder),
      d.max_regions,
      d.feature_dim,
      d.shuffle_seed,
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
