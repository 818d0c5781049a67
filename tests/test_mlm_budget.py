"""MLM logits at the labelled positions only: the same loss and gradients as every position.

`losses.mlm_loss_at_labels` decodes a fixed budget of gathered rows; a batch
with more labels than the budget falls back to decoding every position. Both
branches must give `mlm_loss` of the full logits, and so must the train step's
model outputs (`mlm_logits=False`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capture_jax import losses
from capture_jax.models import CaptureModel
from tests.test_model import tiny_config


@pytest.mark.parametrize('label_probability', [0.0, 0.1, 0.3, 1.0])
@pytest.mark.parametrize('budget', [1, 5, 12, 36])
def test_budgeted_loss_and_gradients_equal_full_logits(label_probability, budget):
  rng = np.random.default_rng(0)
  b, t, w, v = 4, 9, 16, 50
  hidden = jnp.asarray(rng.normal(size=(b, t, w)), jnp.float32)
  decoder = jnp.asarray(rng.normal(size=(v, w)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=(v,)), jnp.float32)
  labels = jnp.asarray(
      np.where(rng.uniform(size=(b, t)) < label_probability, rng.integers(0, v, (b, t)), -1)
  )

  def full(h, d, c):
    return losses.mlm_loss(h @ d.T + c, labels)

  def budgeted(h, d, c):
    return losses.mlm_loss_at_labels(h, d, c, labels, budget)

  want, want_grads = jax.value_and_grad(full, argnums=(0, 1, 2))(hidden, decoder, bias)
  got, got_grads = jax.jit(jax.value_and_grad(budgeted, argnums=(0, 1, 2)))(hidden, decoder, bias)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  for g, w_ in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w_, rtol=1e-5, atol=1e-6)


def test_prediction_budget():
  assert losses.mlm_prediction_budget(288, 0.25) == 72
  assert losses.mlm_prediction_budget(288, 0.0) == 288
  assert losses.mlm_prediction_budget(288, 1.0) == 288
  assert losses.mlm_prediction_budget(10, 0.01) == 1


def test_model_without_logits_gives_the_same_mlm_loss():
  cfg = tiny_config()
  model = CaptureModel(cfg.model)
  rng = np.random.default_rng(1)
  b, t, r = 3, 8, 5
  batch = {
      'input_ids': jnp.asarray(rng.integers(1, cfg.model.vocab_size, (b, t)), jnp.int32),
      'input_mask': jnp.ones((b, t), jnp.int32),
      'segment_ids': jnp.zeros((b, t), jnp.int32),
      'image_feat': jnp.asarray(rng.normal(size=(b, r + 1, cfg.model.v_feature_size)), jnp.float32),
      'image_loc': jnp.asarray(rng.uniform(size=(b, r + 1, 5)), jnp.float32),
      'image_mask': jnp.ones((b, r + 1), jnp.int32),
  }
  params = model.init({'params': jax.random.PRNGKey(0)}, batch)['params']
  labels = jnp.asarray(
      np.where(rng.uniform(size=(b, t)) < 0.3, rng.integers(0, cfg.model.vocab_size, (b, t)), -1)
  )
  full = model.apply({'params': params}, batch)
  parts = model.apply({'params': params}, batch, mlm_logits=False)
  assert 'mlm_logits' not in parts
  want = losses.mlm_loss(full['mlm_logits'], labels)
  for budget in (2, 24):
    got = losses.mlm_loss_at_labels(
        parts['mlm_hidden'], parts['mlm_decoder'], parts['mlm_decoder_bias'], labels, budget
    )
    np.testing.assert_allclose(got, want, rtol=1e-6)
