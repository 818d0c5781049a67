"""The batch layouts: the one owner of the keys, shapes and dtypes of a batch.

Two layouts (B = batch, T = data.max_text_len, R = data.max_regions,
F = data.feature_dim, C = the MRM target width: F for feature regression,
model.v_target_size for the detector's class distribution).

The model batch, which the model, the losses, the evaluation and the export
take (`TRAIN_KEYS`)::

    input_ids [B,T] int32       input_mask [B,T] int32     segment_ids [B,T] int32
    image_feat [B,R+1,F] f32    image_loc [B,R+1,5] f32    image_mask [B,R+1] int32
    lm_label_ids [B,T] int32    image_label [B,R] int32    image_target [B,R,C] f32

The first six are the model's inputs (`MODEL_INPUTS`); row 0 of the visual
axis is the global token (mean of the regions, `formats.GLOBAL_LOC`). The last
three are the pretraining targets (`TARGETS`): -1 in `lm_label_ids` and
`image_label` marks a position that is not predicted.

The host batch: what the training input pipeline yields and what crosses
from the host to the devices (`BatchLayout.host_keys`): what storage holds,
unmasked, in its dtype (S = data.storage_dtype, float16 unless configured)::

    input_ids [B,T] int32       input_mask [B,T] int32
    region_feat [B,R,S]         region_loc [B,R,5] f32     region_mask [B,R] int32
    positions [B,2] uint32      (+ region_target [B,R,C] S for the class MRM target)

`positions` are the records' positions in the global training stream as
(high, low) 32-bit halves (`encode_positions`): JAX has no int64 without x64,
and a stream longer than 2**32 records (four thousand epochs of Product1M)
is not refused. The jitted device stage (`data.masking.model_batch`, run
inside the train step) turns a host batch into the model batch: the float32
cast, the MLM and MRM draws from (data.shuffle_seed, position), the MRM target
and the global token. The host batch has no global token, no target copy of
the features and no labels: in float16 its features take a quarter of the
model batch's bytes (BENCHMARKS.md "Input pipeline" has the figures).

The index batch: what crosses instead when the training split is resident
in device memory (`data.resident`, `training/resident.py`): the step's record
indices and their stream positions; the step gathers the host batch's other
keys (its per-record rows, `BatchLayout.row_shapes`) from the resident split::

    record_index [B] int32      positions [B,2] uint32

Everything else (the pipeline's padding rows, the trainer's and export's
abstract batches, `init` inputs, random batches for benchmarks and tests)
is derived here from a `BatchLayout`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np

MODEL_INPUTS = (
    'input_ids',
    'input_mask',
    'segment_ids',
    'image_feat',
    'image_loc',
    'image_mask',
)
TARGETS = ('lm_label_ids', 'image_label', 'image_target')
TRAIN_KEYS = MODEL_INPUTS + TARGETS
HOST_KEYS = ('input_ids', 'input_mask', 'region_feat', 'region_loc', 'region_mask', 'positions')
CLASS_TARGET_KEY = 'region_target'  # in the host batch only for model.mrm_target='class'
INDEX_KEYS = ('record_index', 'positions')  # the batch of a resident split
LOC_DIM = 5  # x1, y1, x2, y2 (relative) and the relative area: `formats.encode_boxes`


@dataclasses.dataclass(frozen=True)
class BatchLayout:
  """Per-example sizes of a batch; with a batch size, the shape of every key."""

  text_len: int  # T, tokens incl. [CLS] and [SEP]
  regions: int  # R, detector regions (the global token comes on top)
  feature_dim: int  # F
  target_dim: int  # C
  feature_dtype: str = 'float32'  # S, of the host batch's region_feat (and region_target)
  class_target: bool = False  # the host batch carries region_target (the class MRM target)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> 'BatchLayout':
    """The layout of a run: sizes and storage dtype from `config.data`, the MRM target from
    `config.model`."""
    d, m = config.data, config.model
    classes = m.mrm_target == 'class'
    target = m.v_target_size if classes else d.feature_dim
    return cls(d.max_text_len, d.max_regions, d.feature_dim, target, d.storage_dtype, classes)

  @classmethod
  def for_model(
      cls, model_cfg: ml_collections.ConfigDict, text_len: int, regions: int
  ) -> 'BatchLayout':
    """A layout of the model's widths with the given lengths (e.g. a minimal `init` batch)."""
    target = (
        model_cfg.v_target_size if model_cfg.mrm_target == 'class' else model_cfg.v_feature_size
    )
    return cls(text_len, regions, model_cfg.v_feature_size, target)

  def shapes(
      self, batch_size: int, keys: Sequence[str] = TRAIN_KEYS
  ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """`{key: (shape, dtype)}` of a batch of `batch_size` rows."""
    b, t, r1 = batch_size, self.text_len, self.regions + 1
    i32, f32 = np.dtype(np.int32), np.dtype(np.float32)
    table = {
        'input_ids': ((b, t), i32),
        'input_mask': ((b, t), i32),
        'segment_ids': ((b, t), i32),
        'image_feat': ((b, r1, self.feature_dim), f32),
        'image_loc': ((b, r1, LOC_DIM), f32),
        'image_mask': ((b, r1), i32),
        'lm_label_ids': ((b, t), i32),
        'image_label': ((b, self.regions), i32),
        'image_target': ((b, self.regions, self.target_dim), f32),
    }
    return {k: table[k] for k in keys}

  @property
  def host_keys(self) -> tuple[str, ...]:
    """The keys of the host batch (`HOST_KEYS`, and `region_target` for the class target)."""
    return HOST_KEYS + ((CLASS_TARGET_KEY,) if self.class_target else ())

  def host_shapes(self, batch_size: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """`{key: (shape, dtype)}` of a host batch of `batch_size` rows (see the module docstring)."""
    b, t, r = batch_size, self.text_len, self.regions
    i32, f32 = np.dtype(np.int32), np.dtype(np.float32)
    storage = np.dtype(jax.numpy.dtype(self.feature_dtype))  # bfloat16 through ml_dtypes
    table = {
        'input_ids': ((b, t), i32),
        'input_mask': ((b, t), i32),
        'region_feat': ((b, r, self.feature_dim), storage),
        'region_loc': ((b, r, LOC_DIM), f32),
        'region_mask': ((b, r), i32),
        'positions': ((b, 2), np.dtype(np.uint32)),
        CLASS_TARGET_KEY: ((b, r, self.target_dim), storage),
    }
    return {k: table[k] for k in self.host_keys}

  def row_shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """`{key: (shape, dtype)}` of one record's row of the host batch: every host key but
    `positions` (which belongs to the stream, not the record), without the batch axis."""
    return {
        k: (shape[1:], dtype)
        for k, (shape, dtype) in self.host_shapes(1).items()
        if k != 'positions'
    }

  def index_shapes(self, batch_size: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """`{key: (shape, dtype)}` of an index batch (`INDEX_KEYS`) of `batch_size` rows."""
    return {
        'record_index': ((batch_size,), np.dtype(np.int32)),
        'positions': self.host_shapes(batch_size)['positions'],
    }

  def host_random(
      self, batch_size: int, vocab_size: int, *, seed: int = 0, first_position: int = 0
  ) -> dict[str, np.ndarray]:
    """A host batch of random values (benchmarks and tests): every token and region valid,
    stream positions `first_position + range(batch_size)`."""
    rng = np.random.default_rng(seed)
    shapes = self.host_shapes(batch_size)
    b, t, r = batch_size, self.text_len, self.regions
    ids = rng.integers(5, vocab_size, (b, t)).astype(np.int32)  # above the special ids
    out = {
        'input_ids': ids,
        'input_mask': np.ones((b, t), np.int32),
        'region_feat': rng.normal(size=shapes['region_feat'][0]).astype(shapes['region_feat'][1]),
        'region_loc': rng.uniform(size=(b, r, LOC_DIM)).astype(np.float32),
        'region_mask': np.ones((b, r), np.int32),
        'positions': encode_positions(first_position + np.arange(b)),
    }
    if self.class_target:
      shape, dtype = shapes[CLASS_TARGET_KEY]
      out[CLASS_TARGET_KEY] = rng.dirichlet(np.ones(shape[-1]), shape[:2]).astype(dtype)
    return out

  def abstract(
      self, batch_size: int, keys: Sequence[str] = TRAIN_KEYS, sharding: Any = None
  ) -> dict[str, jax.ShapeDtypeStruct]:
    """`jax.ShapeDtypeStruct`s of a batch (for `jit(...).lower`), optionally with a sharding."""
    return abstract_of(self.shapes(batch_size, keys), sharding)

  def padding(self, batch_size: int, keys: Sequence[str] = TRAIN_KEYS) -> dict[str, np.ndarray]:
    """Rows that are not there (the padding of a last evaluation batch): zero inputs and
    masks, -1 labels."""
    out = {k: np.zeros(shape, dtype) for k, (shape, dtype) in self.shapes(batch_size, keys).items()}
    for key in ('lm_label_ids', 'image_label'):
      if key in out:
        out[key] -= 1
    return out

  def dummy(self, batch_size: int = 1) -> dict[str, np.ndarray]:
    """All-valid model inputs (every token and region unmasked) for `init` and `eval_shape`."""
    out = self.padding(batch_size, MODEL_INPUTS)
    out['input_mask'][:] = 1
    out['image_mask'][:] = 1
    return out

  def random(
      self,
      batch_size: int,
      vocab_size: int,
      *,
      seed: int = 0,
      text_valid: Sequence[int] | None = None,
      regions_valid: Sequence[int] | None = None,
      label_fraction: float = 0.15,
  ) -> dict[str, np.ndarray]:
    """A batch of random values of this layout (benchmarks and tests).

    Args:
      text_valid: [B] tokens per row (default all T); padding has id 0, mask 0
        and label -1.
      regions_valid: [B] regions per row, global token not counted (default R).
      label_fraction: share of valid tokens and regions that carry an MLM or
        MRM label.
    """
    rng = np.random.default_rng(seed)
    b, t, r = batch_size, self.text_len, self.regions
    text_valid = list(text_valid or [t] * b)
    regions_valid = list(regions_valid or [r] * b)
    input_mask = (np.arange(t)[None, :] < np.array(text_valid)[:, None]).astype(np.int32)
    region_mask = (np.arange(r)[None, :] < np.array(regions_valid)[:, None]).astype(np.int32)
    image_mask = np.concatenate([np.ones((b, 1), np.int32), region_mask], axis=1)
    input_ids = rng.integers(1, vocab_size, (b, t)).astype(np.int32) * input_mask
    feat = rng.normal(size=(b, r + 1, self.feature_dim)).astype(np.float32) * image_mask[..., None]
    lm_chosen = (rng.uniform(size=(b, t)) < label_fraction) & (input_mask > 0)
    mrm_chosen = (rng.uniform(size=(b, r)) < label_fraction) & (region_mask > 0)
    return {
        'input_ids': input_ids,
        'input_mask': input_mask,
        'segment_ids': np.zeros((b, t), np.int32),
        'image_feat': feat,
        'image_loc': rng.uniform(size=(b, r + 1, LOC_DIM)).astype(np.float32),
        'image_mask': image_mask,
        'lm_label_ids': np.where(lm_chosen, input_ids, -1).astype(np.int32),
        'image_label': np.where(mrm_chosen, 1, -1).astype(np.int32),
        'image_target': rng.normal(size=(b, r, self.target_dim)).astype(np.float32),
    }


def abstract_of(
    shapes: Mapping[str, tuple[tuple[int, ...], np.dtype]], sharding: Any = None
) -> dict[str, jax.ShapeDtypeStruct]:
  """`jax.ShapeDtypeStruct`s of `{key: (shape, dtype)}` (a layout's `shapes`, `host_shapes` or
  `index_shapes`), each with `sharding`: what `jit(...).lower` takes in place of arrays."""
  return {
      k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
      for k, (shape, dtype) in shapes.items()
  }


def encode_positions(positions: Any) -> np.ndarray:
  """[B] stream positions (non-negative integers) -> [B, 2] uint32 (high, low) halves."""
  p = np.asarray(positions, np.int64)
  if p.ndim != 1 or (p < 0).any():
    raise ValueError(f'stream positions must be a [B] array of non-negative integers, got {p}')
  return np.stack([p >> 32, p & 0xFFFFFFFF], axis=1).astype(np.uint32)


def decode_positions(halves: Any) -> np.ndarray:
  """[B, 2] uint32 (high, low) halves -> [B] int64 stream positions (`encode_positions`)."""
  h = np.asarray(halves).astype(np.int64)
  return (h[:, 0] << 32) | h[:, 1]


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
  """The model's inputs of a batch (`MODEL_INPUTS`), without targets or anything else."""
  return {k: batch[k] for k in MODEL_INPUTS}


def validate_model_inputs(batch: Mapping[str, Any], cfg: ml_collections.ConfigDict) -> None:
  """Checks ranks and sizes of the model inputs against the `model` config.

  Raises ValueError saying what was expected and what was given.
  """
  missing = [k for k in MODEL_INPUTS if k not in batch]
  if missing:
    raise ValueError(f'batch is missing {missing}; the model takes {list(MODEL_INPUTS)}')

  def shape(key: str, rank: int, what: str) -> tuple[int, ...]:
    s = tuple(np.shape(batch[key]))
    if len(s) != rank:
      raise ValueError(f'{key} must have rank {rank} ({what}), got shape {s}')
    return s

  b, t = shape('input_ids', 2, '[B, T]')
  for key in ('input_mask', 'segment_ids'):
    if shape(key, 2, '[B, T]') != (b, t):
      raise ValueError(f'{key} must have shape {(b, t)} like input_ids, got {np.shape(batch[key])}')
  fb, r1, f = shape('image_feat', 3, '[B, R+1, F]')
  if fb != b:
    raise ValueError(f'image_feat has batch {fb} but input_ids has batch {b}')
  if f != cfg.v_feature_size:
    raise ValueError(f'image_feat width must be model.v_feature_size={cfg.v_feature_size}, got {f}')
  if shape('image_loc', 3, f'[B, R+1, {LOC_DIM}]') != (b, r1, LOC_DIM):
    raise ValueError(
        f'image_loc must have shape {(b, r1, LOC_DIM)}, got {np.shape(batch["image_loc"])}'
    )
  if shape('image_mask', 2, '[B, R+1]') != (b, r1):
    raise ValueError(
        f'image_mask must have shape {(b, r1)} like image_feat, got {np.shape(batch["image_mask"])}'
    )
  if t > cfg.max_position_embeddings:
    raise ValueError(
        f'text length {t} exceeds model.max_position_embeddings={cfg.max_position_embeddings}'
    )
  if cfg.cross_num_layers:
    if t > cfg.max_text_len:
      raise ValueError(f'text length {t} exceeds model.max_text_len={cfg.max_text_len}')
    if cfg.max_text_len + r1 > cfg.cross_max_position_embeddings:
      raise ValueError(
          f'model.max_text_len + regions = {cfg.max_text_len} + {r1} exceeds '
          f'model.cross_max_position_embeddings={cfg.cross_max_position_embeddings}'
      )
