"""The masking recipe of the release (MLM 15% with 80/10/10, MRM 15% with zeroing), seeded by position.

Every draw is a counter-based hash of (seed, the record's position in the
global training stream, a stream id, an index), so a record's masks depend
only on the seed and its position: not on the batch size, the thread that
built the batch, the number of processes, or whether the run was resumed.
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from capture_jax.data import tokenizer as tokenizer_lib

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


def choose_regions(
    region_mask: np.ndarray, keys: np.ndarray, spec: MaskingSpec
) -> tuple[np.ndarray, np.ndarray]:
  """[B, R] regions to zero (bool) and image_label (1 chosen, -1 not)."""
  r = region_mask.shape[1]
  chosen = (uniforms(keys, _STREAM_MRM_CHOOSE, r) < spec.mrm_probability) & (region_mask > 0)
  zero = chosen & (uniforms(keys, _STREAM_MRM_ZERO, r) < spec.zero_probability)
  return zero, np.where(chosen, np.int32(1), np.int32(-1))
