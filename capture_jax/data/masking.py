"""The device stage: a host (storage) batch -> the model's masked float32 batch, inside `jit`.

The masking recipe of the release: MLM 15% with 80/10/10 [MASK]/random/kept,
never [CLS], [SEP] or [PAD]; MRM 15% with the chosen regions zeroed with
`data.mrm_zero_probability`. The MRM target is the features before masking
(or the detector's class distribution), and the global visual token is the
mean of the regions after masking, as released.

Every draw is `jax.random` (threefry, named explicitly, so no global PRNG
setting changes it) under a key folded from `data.shuffle_seed` and the
record's position in the global training stream (both 32-bit halves), then
folded with a stream id per draw kind. A record's masks are therefore a pure
function of (seed, position): not of the batch size, the number of processes,
the prefetch depth, or whether the run was resumed. `model_batch` takes only
the host batch's arrays (positions included), so a batch gathered on the
devices gets the same masks as one read on the host.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections

from capture_jax import batch as batch_lib
from capture_jax.data import formats
from capture_jax.data import tokenizer as tokenizer_lib

# One independent stream per draw kind (folded into the record's key).
_STREAM_MLM_CHOOSE, _STREAM_MLM_ACTION, _STREAM_MLM_TOKEN = 1, 2, 3
_STREAM_MRM_CHOOSE, _STREAM_MRM_ZERO = 4, 5
_PRNG_IMPL = 'threefry2x32'


@dataclasses.dataclass(frozen=True)
class MaskingSpec:
  """MLM/MRM probabilities, the tokenizer's special ids and the seed (hashable: a static
  argument of `jit`)."""

  mlm_probability: float
  mask_probability: float  # chosen token -> [MASK]
  random_probability: float  # chosen token -> random token; otherwise kept
  mrm_probability: float
  zero_probability: float  # chosen region -> zero feature; otherwise kept
  vocab_size: int  # random tokens are drawn from [0, vocab_size)
  mask_id: int
  special_ids: tuple[int, ...]  # never chosen: [CLS], [SEP], [PAD]
  seed: int  # data.shuffle_seed

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> 'MaskingSpec':
    """The recipe of `config.data`, with the ids of `data.vocab_file`.

    Without a vocab file (compiling ahead of time, benchmarks on random batches: the ids do not
    change the program) the ids are those of the vocabs this project trains
    (`tokenizer.SPECIAL_TOKENS` first) and the size is model.vocab_size; training itself refuses
    an empty `data.vocab_file` (`collate.make_batch_spec`).
    """
    d = config.data
    if d.vocab_file:
      vocab = tokenizer_lib.read_vocab(d.vocab_file)
      size = len(vocab)
    else:
      vocab = {t: i for i, t in enumerate(tokenizer_lib.SPECIAL_TOKENS)}
      size = config.model.vocab_size
    return cls(
        d.mlm_probability,
        d.mlm_mask_probability,
        d.mlm_random_probability,
        d.mrm_probability,
        d.mrm_zero_probability,
        size,
        vocab['[MASK]'],
        (vocab['[CLS]'], vocab['[SEP]'], vocab['[PAD]']),
        d.shuffle_seed,
    )


def record_keys(seed: int, positions: jax.Array) -> jax.Array:
  """[B] typed keys of records from the seed and their [B, 2] uint32 (high, low) positions."""
  base = jax.random.key(seed, impl=_PRNG_IMPL)
  fold = lambda p: jax.random.fold_in(jax.random.fold_in(base, p[0]), p[1])
  return jax.vmap(fold)(jnp.asarray(positions, jnp.uint32))


def uniforms(keys: jax.Array, stream: int, n: int) -> jax.Array:
  """[B, n] float32 uniforms in [0, 1) for [B] record keys, one independent stream each."""
  return jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, stream), (n,)))(keys)


def mask_tokens(
    input_ids: jax.Array, input_mask: jax.Array, keys: jax.Array, spec: MaskingSpec
) -> tuple[jax.Array, jax.Array]:
  """MLM: each caption token is chosen with p; 80/10/10 [MASK]/random/kept.

  Args:
    input_ids, input_mask: [B, T] int32.
    keys: [B] record keys (`record_keys`).
  Returns:
    masked input_ids [B, T] int32 and lm_label_ids [B, T] int32 (the original
    id where chosen, -1 elsewhere, including [CLS], [SEP] and padding).
  """
  t = input_ids.shape[1]
  special = jnp.isin(input_ids, jnp.array(spec.special_ids, jnp.int32)) | (input_mask == 0)
  chosen = (uniforms(keys, _STREAM_MLM_CHOOSE, t) < spec.mlm_probability) & ~special
  action = uniforms(keys, _STREAM_MLM_ACTION, t)
  to_mask = chosen & (action < spec.mask_probability)
  to_random = chosen & ~to_mask & (action < spec.mask_probability + spec.random_probability)
  random_ids = jax.vmap(
      lambda k: jax.random.randint(
          jax.random.fold_in(k, _STREAM_MLM_TOKEN), (t,), 0, spec.vocab_size, jnp.int32
      )
  )(keys)
  out = jnp.where(to_mask, jnp.int32(spec.mask_id), jnp.where(to_random, random_ids, input_ids))
  labels = jnp.where(chosen, input_ids, jnp.int32(-1))
  return out.astype(jnp.int32), labels.astype(jnp.int32)


def choose_regions(
    region_mask: jax.Array, keys: jax.Array, spec: MaskingSpec
) -> tuple[jax.Array, jax.Array]:
  """[B, R] regions to zero (bool) and image_label [B, R] int32 (1 chosen, -1 not)."""
  r = region_mask.shape[1]
  chosen = (uniforms(keys, _STREAM_MRM_CHOOSE, r) < spec.mrm_probability) & (region_mask > 0)
  zero = chosen & (uniforms(keys, _STREAM_MRM_ZERO, r) < spec.zero_probability)
  return zero, jnp.where(chosen, jnp.int32(1), jnp.int32(-1))


def model_batch(host: Mapping[str, jax.Array], spec: MaskingSpec) -> dict[str, jax.Array]:
  """The device stage: a host batch (`BatchLayout.host_keys`) -> the model batch (`TRAIN_KEYS`,
  float32), masked by (spec.seed, host['positions']). Pure and jittable; elementwise over the
  batch, so it keeps the batch's sharding.
  """
  keys = record_keys(spec.seed, host['positions'])
  ids, lm_label_ids = mask_tokens(host['input_ids'], host['input_mask'], keys, spec)
  region_mask = host['region_mask']
  zero, image_label = choose_regions(region_mask, keys, spec)
  feat = host['region_feat'].astype(jnp.float32)
  target = feat
  if batch_lib.CLASS_TARGET_KEY in host:
    target = host[batch_lib.CLASS_TARGET_KEY].astype(jnp.float32)
  regions = jnp.where(zero[..., None], jnp.float32(0), feat)
  # The global token is the mean of the regions *after* masking, as released. A sum, not a
  # matmul: a float32 dot may run at reduced precision on accelerators.
  m = region_mask.astype(jnp.float32)
  mean = (regions * m[..., None]).sum(1) / jnp.maximum(m.sum(1), 1.0)[:, None]
  b = regions.shape[0]
  global_loc = jnp.broadcast_to(jnp.asarray(formats.GLOBAL_LOC, jnp.float32), (b, 1, 5))
  ones = jnp.ones((b, 1), jnp.int32)
  return {
      'input_ids': ids,
      'input_mask': host['input_mask'],
      'segment_ids': jnp.zeros_like(ids),
      'image_feat': jnp.concatenate([mean[:, None], regions], axis=1),
      'image_loc': jnp.concatenate([global_loc, host['region_loc'].astype(jnp.float32)], axis=1),
      'image_mask': jnp.concatenate([ones, region_mask.astype(jnp.int32)], axis=1),
      'lm_label_ids': lm_label_ids,
      'image_label': image_label,
      'image_target': target,
  }
