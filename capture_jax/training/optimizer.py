"""The released optimiser (BERT Adam) as an optax chain, with the intended parameter groups.

* AdamW with linear warm-up over `warmup_fraction` of the steps, then linear
  decay to 0.
* Weight decay on kernels and embeddings only: biases, LayerNorm parameters and
  the contrastive loss's own parameters are not decayed (the release swaps the
  two groups when starting from BERT; we use the intended grouping).
* Parameters initialised from pretrained BERT take `pretrained_lr_multiplier`
  times the update (0.1 as released).
* Global-norm gradient clipping before Adam (BERT Adam's `max_grad_norm`).

The trainable tree is `{'model': model params, 'loss': loss params}`.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from capture_jax.param_paths import path_str

Params = Any

# What a BERT checkpoint initialises (see `convert.from_hf_bert`).
BERT_INITIALISED = (
    r'^model/word_embeddings/',
    r'^model/text_embeddings/',
    r'^model/text_stream/',
    r'^model/mlm_head/(transform|layer_norm)/',
    r'^model/mlm_bias$',
)


def learning_rate_schedule(t: ml_collections.ConfigDict) -> optax.Schedule:
  warmup = int(round(t.warmup_fraction * t.num_steps))
  return optax.join_schedules(
      [
          optax.linear_schedule(0.0, t.learning_rate, max(warmup, 1)),
          optax.linear_schedule(t.learning_rate, 0.0, max(t.num_steps - warmup, 1)),
      ],
      [warmup],
  )


def is_decayed(path: str) -> bool:
  """Kernels and embeddings decay; biases, LayerNorm scales and loss parameters do not."""
  leaf = path.rsplit('/', 1)[-1]
  return path.startswith('model/') and leaf in ('kernel', 'embedding')


def scale_by_tree(multipliers: Params) -> optax.GradientTransformation:
  """Multiplies each update by a per-leaf constant."""

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u * m, updates, multipliers), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(
    t: ml_collections.ConfigDict, params: Params, pretrained_patterns: Sequence[str] = ()
) -> optax.GradientTransformation:
  """The optax chain for the trainable tree `params` (arrays or ShapeDtypeStructs)."""
  decay_mask = jax.tree_util.tree_map_with_path(lambda p, _: is_decayed(path_str(p)), params)
  chain = [
      optax.clip_by_global_norm(t.grad_clip_norm) if t.grad_clip_norm > 0 else optax.identity(),
      optax.adamw(
          learning_rate_schedule(t),
          b1=t.adam_b1,
          b2=t.adam_b2,
          eps=t.adam_eps,
          weight_decay=t.weight_decay,
          mask=decay_mask,
      ),
  ]
  if pretrained_patterns and t.pretrained_lr_multiplier != 1.0:
    compiled = [re.compile(p) for p in pretrained_patterns]
    multipliers = jax.tree_util.tree_map_with_path(
        lambda p, _: (
            t.pretrained_lr_multiplier if any(c.search(path_str(p)) for c in compiled) else 1.0
        ),
        params,
    )
    chain.append(scale_by_tree(multipliers))
  return optax.chain(*chain)


def global_norm(tree: Params) -> jax.Array:
  return optax.global_norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))
