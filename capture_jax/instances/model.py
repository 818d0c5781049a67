"""The learned proposer: pairwise same-instance affinity and objectness over one sample's regions.

`ProposerModel` embeds each region (its feature and box), lets the regions of
a sample attend to each other (context: which regions look alike *in this
image*, under its lighting), then scores every pair of regions (same product
instance or not, from both embeddings and the pair's box geometry) and every
region (part of a product or background). `group_regions` turns those
scores into proposals with a documented rule.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from capture_jax.instances import proposals as proposals_lib

# `config.instances` fields that determine the parameter tree.
ARCHITECTURE_FIELDS = ('hidden_size', 'num_layers', 'num_heads')


def box_encoding(boxes: jax.Array) -> jax.Array:
  """[..., R, 9] per-region encoding of [..., R, 4] boxes given as fractions of the image:
  corners, width, height, centre and log area."""
  x1, y1, x2, y2 = (boxes[..., i] for i in range(4))
  w, h = jnp.maximum(x2 - x1, 1e-4), jnp.maximum(y2 - y1, 1e-4)
  return jnp.stack([x1, y1, x2, y2, w, h, (x1 + x2) / 2, (y1 + y2) / 2, jnp.log(w * h)], axis=-1)


def pair_geometry(boxes: jax.Array) -> jax.Array:
  """[..., R, R, 8] geometry of every pair of [..., R, 4] boxes (fractions of the image):
  IoU, containment of i in j and of j in i, log area ratio, centre offsets in
  units of the pair's mean size (signed and absolute), and the gap between them."""
  x1, y1, x2, y2 = (boxes[..., i] for i in range(4))
  w, h = jnp.maximum(x2 - x1, 1e-4), jnp.maximum(y2 - y1, 1e-4)
  area = w * h
  iw = jnp.maximum(
      jnp.minimum(x2[..., :, None], x2[..., None, :])
      - jnp.maximum(x1[..., :, None], x1[..., None, :]),
      0,
  )
  ih = jnp.maximum(
      jnp.minimum(y2[..., :, None], y2[..., None, :])
      - jnp.maximum(y1[..., :, None], y1[..., None, :]),
      0,
  )
  inter = iw * ih
  union = area[..., :, None] + area[..., None, :] - inter
  cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
  sw = (w[..., :, None] + w[..., None, :]) / 2
  sh = (h[..., :, None] + h[..., None, :]) / 2
  dx = (cx[..., None, :] - cx[..., :, None]) / sw
  dy = (cy[..., None, :] - cy[..., :, None]) / sh
  gap = jnp.maximum(jnp.abs(dx) - 1, 0) + jnp.maximum(jnp.abs(dy) - 1, 0)
  return jnp.stack(
      [
          inter / union,
          inter / area[..., :, None],
          inter / area[..., None, :],
          jnp.log(area[..., :, None] / area[..., None, :]),
          dx,
          dy,
          jnp.abs(dx) + jnp.abs(dy),
          gap,
      ],
      axis=-1,
  )


class _Block(nn.Module):
  """Pre-LN self-attention + MLP over the regions of a sample."""

  hidden_size: int
  num_heads: int

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    attn_mask = nn.make_attention_mask(mask, mask)
    y = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads)(y, y, mask=attn_mask)
    y = nn.LayerNorm()(x)
    y = nn.Dense(2 * self.hidden_size)(y)
    return x + nn.Dense(self.hidden_size)(nn.gelu(y))


class ProposerModel(nn.Module):
  """Affinity and objectness logits of the regions of a batch of samples.

  Attributes:
    hidden_size: width of the region embeddings.
    num_layers: self-attention blocks over a sample's regions.
    num_heads: attention heads.
  """

  hidden_size: int = 128
  num_layers: int = 2
  num_heads: int = 4

  @nn.compact
  def __call__(
      self, features: jax.Array, boxes: jax.Array, mask: jax.Array
  ) -> tuple[jax.Array, jax.Array]:
    """Scores regions and pairs of regions.

    Args:
      features: [B, R, F] region features (any non-negative scale: log1p and
        LayerNorm make the model indifferent to the extractor's scale).
      boxes: [B, R, 4] boxes as fractions of the image size.
      mask: [B, R] bool, True for real regions.
    Returns:
      affinity [B, R, R] symmetric logits that regions i and j are one instance;
      objectness [B, R] logits that a region belongs to some instance.
    """
    f = nn.LayerNorm()(jnp.log1p(jnp.maximum(features, 0.0)))
    x = nn.Dense(self.hidden_size)(f) + nn.Dense(self.hidden_size)(box_encoding(boxes))
    x = nn.gelu(x)
    for _ in range(self.num_layers):
      x = _Block(self.hidden_size, self.num_heads)(x, mask)
    x = nn.LayerNorm()(x)
    objectness = nn.Dense(1)(nn.gelu(nn.Dense(self.hidden_size)(x)))[..., 0]
    e = nn.Dense(self.hidden_size)(x)
    geo = nn.gelu(nn.Dense(self.hidden_size)(pair_geometry(boxes)))
    pair = jnp.concatenate(
        [e[:, :, None] * e[:, None, :], jnp.abs(e[:, :, None] - e[:, None, :]), geo], axis=-1
    )
    logits = nn.Dense(1)(nn.gelu(nn.Dense(self.hidden_size)(pair)))[..., 0]
    return (logits + jnp.swapaxes(logits, 1, 2)) / 2, objectness


def make_model(cfg: ml_collections.ConfigDict | dict) -> ProposerModel:
  """The model of an `instances` config block (or its saved dict)."""
  return ProposerModel(
      hidden_size=int(cfg['hidden_size']),
      num_layers=int(cfg['num_layers']),
      num_heads=int(cfg['num_heads']),
  )


def loss_fn(
    model: ProposerModel, params: Any, batch: dict[str, jax.Array]
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Balanced binary cross-entropies: pairs (same pseudo-instance) and regions (in one).

  Positive and negative pairs are averaged separately and then together, as
  negatives outnumber positives several times over.
  """
  aff, obj = model.apply({'params': params}, batch['features'], batch['boxes'], batch['mask'])
  g, m = batch['group'], batch['mask']
  r = g.shape[1]
  valid = m[:, :, None] & m[:, None, :] & ~jnp.eye(r, dtype=bool)[None]
  same = (g[:, :, None] == g[:, None, :]) & (g[:, :, None] >= 0)
  pair_loss = optax.sigmoid_binary_cross_entropy(aff, same.astype(jnp.float32))
  pos, neg = valid & same, valid & ~same
  pos_loss = jnp.sum(pair_loss * pos) / jnp.maximum(pos.sum(), 1)
  neg_loss = jnp.sum(pair_loss * neg) / jnp.maximum(neg.sum(), 1)
  fg = (g >= 0).astype(jnp.float32)
  obj_loss = jnp.sum(optax.sigmoid_binary_cross_entropy(obj, fg) * m) / jnp.maximum(m.sum(), 1)
  pred_same = aff > 0
  pair_acc = jnp.sum((pred_same == same) & valid) / jnp.maximum(valid.sum(), 1)
  obj_acc = jnp.sum(((obj > 0) == (g >= 0)) & m) / jnp.maximum(m.sum(), 1)
  loss = 0.5 * (pos_loss + neg_loss) + obj_loss
  return loss, {
      'loss': loss,
      'pair_loss': 0.5 * (pos_loss + neg_loss),
      'objectness_loss': obj_loss,
      'pair_accuracy': pair_acc,
      'objectness_accuracy': obj_acc,
  }


def group_regions(
    affinity: np.ndarray,
    objectness: np.ndarray,
    objectness_threshold: float,
    affinity_threshold: float,
) -> list[proposals_lib.Proposal]:
  """The grouping rule of the learned proposer.

  1. Regions with objectness probability below `objectness_threshold` are
     background.
  2. The others are clustered by average linkage on the affinity
     probabilities: the two groups of highest mean pairwise affinity merge
     while that mean is at least `affinity_threshold`.
  3. A group's score is the mean objectness of its regions.

  Args:
    affinity: [n, n] same-instance probabilities (symmetric).
    objectness: [n] probabilities of belonging to an instance.
  Returns:
    Disjoint proposals by decreasing score.
  """
  fg = [int(i) for i in np.flatnonzero(objectness >= objectness_threshold)]
  groups = [[i] for i in fg]
  while len(groups) > 1:
    best, pair = -1.0, None
    for a in range(len(groups)):
      for b in range(a + 1, len(groups)):
        v = float(affinity[np.ix_(groups[a], groups[b])].mean())
        if v > best:
          best, pair = v, (a, b)
    if best < affinity_threshold:
      break
    a, b = pair
    groups[a] = sorted(groups[a] + groups[b])
    del groups[b]
  return proposals_lib.sort_proposals(
      [proposals_lib.Proposal(tuple(g), float(objectness[g].mean())) for g in groups]
  )
