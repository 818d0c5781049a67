"""CAPTURE's pretraining losses: MLM, MRM and cross-modal contrastive.

Everything is computed in float32 whatever the model's compute dtype. The
contrastive losses here see a whole (local) batch; the sharded trainer computes
the same quantities over the global batch with `capture_jax.training.contrastive`,
which reuses the per-row terms defined here.

Learnable parameters of a loss (the CLIP temperature, the SigLIP temperature and
bias) live outside the model, in a small tree from `init_loss_params`, so the
model's parameter tree stays exactly the released one.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
from jax import lax
import ml_collections
import numpy as np

Array = jax.Array

CONTRASTIVE_KINDS = ('ntxent', 'clip', 'siglip')


def mlm_loss(logits: Array, labels: Array) -> Array:
  """Token cross entropy, mean over positions whose label is not -1.

  Args:
    logits: `[B, T, V]`; labels: `[B, T]` int, -1 where no token is predicted.
  """
  logits = logits.astype(jnp.float32)
  valid = labels != -1
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
  return jnp.sum(nll * valid) / jnp.maximum(jnp.sum(valid), 1)


def mlm_prediction_budget(num_positions: int, fraction: float) -> int:
  """Static number of positions `mlm_loss_at_labels` decodes for `num_positions` text positions.

  `fraction` <= 0 or >= 1 means every position (no budget).
  """
  if fraction <= 0 or fraction >= 1:
    return num_positions
  return min(num_positions, int(np.ceil(fraction * num_positions)))


def mlm_loss_at_labels(
    hidden: Array, decoder: Array, decoder_bias: Array, labels: Array, budget: int
) -> Array:
  """`mlm_loss` of the logits `hidden @ decoder.T + decoder_bias`, decoding labelled positions only.

  The same loss as `mlm_loss(hidden @ decoder.T + decoder_bias, labels)`
  (up to float summation order) without the `[B, T, V]` logits: the labelled
  positions are gathered into a fixed budget of `budget` rows (as BERT's
  `max_predictions_per_seq`, but per batch), decoded, and their cross entropy
  summed. Nothing is dropped: a batch with more labels than the budget (the
  masking recipe does not cap them) is decoded at every position instead, in
  the other branch of a `lax.cond`, so its loss is exact too.

  Args:
    hidden: `[B, T, W]` the MLM head's output before the decoder.
    decoder: `[V, W]` (the tied word embeddings); decoder_bias: `[V]`.
    labels: `[B, T]` int, -1 where no token is predicted.
    budget: static number of rows decoded (`mlm_prediction_budget`).
  """
  b, t, w = hidden.shape
  n = b * t
  h = hidden.reshape(n, w).astype(jnp.float32)
  labels = labels.reshape(n)
  valid = labels != -1
  count = jnp.sum(valid)

  def nll_sum(x, y, keep):
    logits = jnp.dot(x, decoder.T.astype(jnp.float32)) + decoder_bias
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(keep, y, 0)[:, None], axis=-1)[:, 0]
    return jnp.sum(nll * keep)

  def decode_all(_):
    return nll_sum(h, labels, valid)

  if budget >= n:
    total = decode_all(None)
  else:

    def decode_budget(_):
      (idx,) = jnp.nonzero(valid, size=budget, fill_value=0)
      return nll_sum(h[idx], labels[idx], jnp.arange(budget) < count)

    total = lax.cond(count <= budget, decode_budget, decode_all, None)
  return total / jnp.maximum(count, 1)


def mrm_feature_loss(pred: Array, target: Array, image_label: Array) -> Array:
  """Masked-region feature regression as released.

  Squared error summed over chosen regions (`image_label == 1`) and all
  feature dims, divided by (number of chosen regions x feature dim), at least 1.

  Args:
    pred, target: `[B, R, F]`; image_label: `[B, R]` (1 chosen, -1 otherwise).
  """
  chosen = (image_label == 1).astype(jnp.float32)[..., None]
  sq = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
  denom = jnp.maximum(jnp.sum(chosen) * pred.shape[-1], 1.0)
  return jnp.sum(sq * chosen) / denom


def mrm_class_loss(logits: Array, target_probs: Array, image_label: Array) -> Array:
  """KL(target || softmax(logits)) summed over chosen regions, divided by their count.

  Args:
    logits: `[B, R, C]`; target_probs: `[B, R, C]` detector class distribution;
    image_label: `[B, R]`.
  """
  chosen = (image_label == 1).astype(jnp.float32)[..., None]
  logq = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  p = target_probs.astype(jnp.float32)
  kl = jax.scipy.special.xlogy(p, p) - p * logq  # 0 where p == 0, as torch's KLDivLoss
  return jnp.sum(kl * chosen) / jnp.maximum(jnp.sum(chosen), 1.0)


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  """Rows of `[N, D]` to unit norm (F.normalize semantics: divide by max(norm, eps)).

  Written with the squared norm so that an all-zero row (a ReLU pooler whose
  units are all off for that sample) has the finite gradient `g / eps` that
  F.normalize gives, instead of the NaN of differentiating `jnp.linalg.norm`
  at 0 (which would make the trainer skip the whole update).
  """
  x = x.astype(jnp.float32)
  return x * lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def ntxent_loss(text: Array, visual: Array, temperature: float) -> Array:
  """The released cross-modal NT-Xent over 2B vectors.

  `z = [normalize(visual) ; normalize(text)]` (`[2B, D]`); row i's positive is
  its pair in the other modality, its negatives the other 2B - 2 vectors of both
  modalities (itself excluded). Mean cross entropy over the 2B rows.
  """
  z = jnp.concatenate([l2_normalize(visual), l2_normalize(text)], axis=0)
  n = z.shape[0]
  b = n // 2
  logits = z @ z.T / temperature
  logits = jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, logits)
  positive = jnp.concatenate([jnp.arange(b, n), jnp.arange(0, b)])
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(logp[jnp.arange(n), positive])


def clip_logit_scale(log_inv_temperature: Array) -> Array:
  """CLIP's logit scale: exp of the learnable log inverse temperature, clipped at 100 (CLIP's
  own bound, which keeps the learnable temperature from collapsing the softmax)."""
  return jnp.exp(jnp.minimum(log_inv_temperature, jnp.log(100.0)))


def clip_loss(text: Array, visual: Array, log_inv_temperature: Array) -> Array:
  """Symmetric InfoNCE (CLIP): mean of text->visual and visual->text cross entropy.

  `log_inv_temperature` is the learnable log of the logit scale (clipped at
  log(100) as in CLIP).
  """
  t, v = l2_normalize(text), l2_normalize(visual)
  scale = clip_logit_scale(log_inv_temperature)
  logits = scale * t @ v.T
  idx = jnp.arange(t.shape[0])
  t2v = -jnp.mean(jax.nn.log_softmax(logits, axis=1)[idx, idx])
  v2t = -jnp.mean(jax.nn.log_softmax(logits, axis=0)[idx, idx])
  return 0.5 * (t2v + v2t)


def siglip_loss(text: Array, visual: Array, log_inv_temperature: Array, bias: Array) -> Array:
  """Sigmoid loss (SigLIP): every pair is a binary problem, +1 on the diagonal.

  Sum over the `B x B` pairs of `-log sigmoid(z_ij * (s t_i.v_j + b))`,
  divided by B (as in the SigLIP paper).
  """
  t, v = l2_normalize(text), l2_normalize(visual)
  logits = jnp.exp(log_inv_temperature) * t @ v.T + bias
  signs = 2.0 * jnp.eye(t.shape[0]) - 1.0
  return -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / t.shape[0]


def init_loss_params(cfg: ml_collections.ConfigDict) -> dict[str, Array]:
  """Learnable parameters of the configured contrastive loss (`loss` section)."""
  if cfg.contrastive not in CONTRASTIVE_KINDS:
    raise ValueError(
        f'loss.contrastive must be one of {CONTRASTIVE_KINDS}, got {cfg.contrastive!r}'
    )
  if cfg.contrastive == 'clip':
    return {'log_inv_temperature': jnp.asarray(np.log(1.0 / cfg.temperature), jnp.float32)}
  if cfg.contrastive == 'siglip':
    return {
        'log_inv_temperature': jnp.asarray(np.log(1.0 / cfg.siglip_init_temperature), jnp.float32),
        'bias': jnp.asarray(cfg.siglip_init_bias, jnp.float32),
    }
  return {}


def contrastive_loss(
    text: Array, visual: Array, cfg: ml_collections.ConfigDict, loss_params: Mapping[str, Array]
) -> Array:
  """The configured contrastive loss over a batch of `[B, D]` text and visual vectors."""
  if cfg.contrastive == 'ntxent':
    return ntxent_loss(text, visual, cfg.temperature)
  if cfg.contrastive == 'clip':
    return clip_loss(text, visual, loss_params['log_inv_temperature'])
  if cfg.contrastive == 'siglip':
    return siglip_loss(text, visual, loss_params['log_inv_temperature'], loss_params['bias'])
  raise ValueError(f'loss.contrastive must be one of {CONTRASTIVE_KINDS}, got {cfg.contrastive!r}')


def mrm_loss(outputs: Mapping[str, Array], batch: Mapping[str, Array], mrm_target: str) -> Array:
  if mrm_target == 'feature':
    return mrm_feature_loss(outputs['mrm_pred'], batch['image_target'], batch['image_label'])
  if mrm_target == 'class':
    return mrm_class_loss(outputs['mrm_pred'], batch['image_target'], batch['image_label'])
  raise ValueError(f"model.mrm_target must be 'feature' or 'class', got {mrm_target!r}")


def pretraining_losses(
    outputs: Mapping[str, Array],
    batch: Mapping[str, Array],
    config: ml_collections.ConfigDict,
    loss_params: Mapping[str, Array] | None = None,
    contrastive: Array | None = None,
) -> dict[str, Array]:
  """Every loss term and the weighted total.

  Args:
    outputs: the model's output dict: with `mlm_logits`, or with `mlm_hidden`,
      `mlm_decoder` and `mlm_decoder_bias` (`mlm_logits=False`), decoded at the
      labelled positions within `loss.mlm_prediction_budget`.
    batch: the batch dict with `lm_label_ids [B, T]`, `image_label [B, R]`,
      `image_target [B, R, F]` (or class distributions `[B, R, C]`).
    config: the full run config (reads `loss.*` and `model.mrm_target`).
    loss_params: from `init_loss_params`.
    contrastive: a precomputed contrastive term (the sharded trainer passes the
      global-batch value); computed from this batch's poolers when None.
  Returns:
    `{'mlm', 'mrm', 'contrastive', 'total'}` float32 scalars.
  """
  lc = config.loss
  if 'mlm_logits' in outputs:
    mlm = mlm_loss(outputs['mlm_logits'], batch['lm_label_ids'])
  else:  # the model ran with mlm_logits=False: decode the labelled positions only
    labels = batch['lm_label_ids']
    mlm = mlm_loss_at_labels(
        outputs['mlm_hidden'],
        outputs['mlm_decoder'],
        outputs['mlm_decoder_bias'],
        labels,
        mlm_prediction_budget(labels.size, lc.get('mlm_prediction_budget', 0.0)),
    )
  terms = {
      'mlm': mlm,
      'mrm': mrm_loss(outputs, batch, config.model.mrm_target),
  }
  if contrastive is None:
    contrastive = contrastive_loss(
        outputs['enc_pooled_text'], outputs['enc_pooled_visual'], lc, loss_params or {}
    )
  terms['contrastive'] = contrastive
  terms['total'] = (
      lc.mlm_weight * terms['mlm']
      + lc.mrm_weight * terms['mrm']
      + lc.contrastive_weight * terms['contrastive']
  )
  return terms
