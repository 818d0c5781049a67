"""The losses against independent implementations (PyTorch where the release uses it, NumPy otherwise)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capture_jax import config as config_lib
from capture_jax import losses

torch = pytest.importorskip('torch')
F = torch.nn.functional


def rng(seed=0):
  return np.random.default_rng(seed)


def test_mlm_matches_torch_cross_entropy_with_ignore_index():
  r = rng()
  logits = r.normal(size=(3, 7, 11)).astype(np.float32)
  labels = np.where(r.uniform(size=(3, 7)) < 0.4, r.integers(0, 11, (3, 7)), -1)
  expected = F.cross_entropy(
      torch.from_numpy(logits).reshape(-1, 11),
      torch.from_numpy(labels).reshape(-1),
      ignore_index=-1,
  )
  np.testing.assert_allclose(
      losses.mlm_loss(jnp.asarray(logits), jnp.asarray(labels)), expected.item(), rtol=1e-6
  )


def test_mlm_with_no_labelled_token_is_zero_not_nan():
  assert float(losses.mlm_loss(jnp.zeros((2, 3, 5)), -jnp.ones((2, 3), jnp.int32))) == 0.0


def test_mrm_feature_regression_as_released():
  r = rng(1)
  pred, target = (
      r.normal(size=(2, 5, 8)).astype(np.float32),
      r.normal(size=(2, 5, 8)).astype(np.float32),
  )
  label = np.array([[1, -1, 1, -1, -1], [-1, -1, -1, 1, -1]])
  chosen = label == 1
  expected = np.sum((pred - target) ** 2 * chosen[..., None]) / (chosen.sum() * 8)
  np.testing.assert_allclose(losses.mrm_feature_loss(pred, target, label), expected, rtol=1e-6)
  assert float(losses.mrm_feature_loss(pred, target, -np.ones_like(label))) == 0.0


def test_mrm_class_kl_matches_torch_kl_div():
  r = rng(2)
  logits = r.normal(size=(2, 4, 6)).astype(np.float32)
  target = r.dirichlet(np.ones(6) * 0.3, size=(2, 4)).astype(np.float32)
  target[0, 0, :3] = 0  # zeros in the detector distribution contribute 0
  target[0, 0] /= target[0, 0].sum()
  label = np.array([[1, -1, 1, 1], [-1, 1, -1, -1]])
  kl = F.kl_div(
      F.log_softmax(torch.from_numpy(logits), dim=2), torch.from_numpy(target), reduction='none'
  )
  expected = (kl * torch.from_numpy(label == 1).unsqueeze(2).float()).sum() / (label == 1).sum()
  np.testing.assert_allclose(
      losses.mrm_class_loss(logits, target, label), expected.item(), rtol=1e-5
  )


def ntxent_reference(text, visual, temperature):
  """SimCLR NT-Xent written plainly in torch: drop the diagonal, positive at i +- B."""
  z = F.normalize(torch.cat([torch.from_numpy(visual), torch.from_numpy(text)]), dim=1)
  n, b = z.shape[0], z.shape[0] // 2
  sim = z @ z.T / temperature
  off_diag = ~torch.eye(n, dtype=torch.bool)
  logits = sim[off_diag].reshape(n, n - 1)
  positive = torch.cat([torch.arange(b, n), torch.arange(0, b)])
  target = torch.where(
      positive > torch.arange(n), positive - 1, positive
  )  # index after dropping the diagonal
  return F.cross_entropy(logits, target).item()


def test_ntxent_matches_a_plain_torch_implementation():
  r = rng(3)
  text, visual = (
      r.normal(size=(5, 16)).astype(np.float32),
      r.normal(size=(5, 16)).astype(np.float32),
  )
  np.testing.assert_allclose(
      losses.ntxent_loss(text, visual, 0.07), ntxent_reference(text, visual, 0.07), rtol=1e-5
  )


def test_an_all_zero_pooler_row_has_the_finite_gradient_of_torch():
  # A ReLU pooler can switch off every unit for one sample; jnp.linalg.norm's
  # gradient at 0 is NaN, which would make the trainer skip the update.
  r = rng(5)
  text, visual = r.normal(size=(4, 8)).astype(np.float32), r.normal(size=(4, 8)).astype(np.float32)
  visual[2] = 0.0
  grads = jax.grad(lambda t, v: losses.ntxent_loss(t, v, 0.07), argnums=(0, 1))(text, visual)
  t, v = (torch.tensor(x, requires_grad=True) for x in (text, visual))
  z = torch.cat([F.normalize(v, dim=-1), F.normalize(t, dim=-1)])
  sim = (z @ z.T / 0.07).masked_fill(torch.eye(8, dtype=torch.bool), float('-inf'))
  F.cross_entropy(sim, torch.cat([torch.arange(4, 8), torch.arange(0, 4)])).backward()
  for ours, theirs in zip(grads, (t.grad, v.grad)):
    assert np.isfinite(np.asarray(ours)).all()
    np.testing.assert_allclose(
        np.asarray(ours), theirs.numpy(), rtol=1e-4, atol=1e-6 * np.abs(theirs.numpy()).max()
    )


def test_clip_loss_matches_numpy():
  r = rng(4)
  text, visual = r.normal(size=(6, 8)), r.normal(size=(6, 8))
  t = text / np.linalg.norm(text, axis=1, keepdims=True)
  v = visual / np.linalg.norm(visual, axis=1, keepdims=True)
  logits = (t @ v.T) / 0.07
  log_softmax = lambda x, axis: x - np.log(np.exp(x).sum(axis=axis, keepdims=True))
  expected = -0.5 * (
      np.mean(np.diag(log_softmax(logits, 1))) + np.mean(np.diag(log_softmax(logits, 0)))
  )
  got = losses.clip_loss(text.astype(np.float32), visual.astype(np.float32), jnp.log(1 / 0.07))
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_siglip_loss_matches_numpy():
  r = rng(5)
  text, visual = r.normal(size=(4, 8)), r.normal(size=(4, 8))
  t = text / np.linalg.norm(text, axis=1, keepdims=True)
  v = visual / np.linalg.norm(visual, axis=1, keepdims=True)
  logits = 10.0 * t @ v.T - 10.0
  labels = 2 * np.eye(4) - 1
  expected = np.sum(np.log1p(np.exp(-labels * logits))) / 4
  got = losses.siglip_loss(
      text.astype(np.float32), visual.astype(np.float32), jnp.log(10.0), jnp.asarray(-10.0)
  )
  np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize('kind', ['clip', 'siglip'])
def test_learnable_loss_parameters_get_finite_gradients(kind):
  cfg = config_lib.loss_config()
  cfg.contrastive = kind
  params = losses.init_loss_params(cfg)
  text, visual = jnp.asarray(rng(6).normal(size=(4, 8))), jnp.asarray(rng(7).normal(size=(4, 8)))
  grads = jax.grad(lambda p, t, v: losses.contrastive_loss(t, v, cfg, p), argnums=(0, 1, 2))(
      params, text, visual
  )
  for g in jax.tree.leaves(grads):
    assert bool(jnp.all(jnp.isfinite(g))) and bool(jnp.any(g != 0))


def test_weighted_total_uses_the_config_weights():
  cfg = config_lib.base_config()
  cfg.loss.update(mlm_weight=0.5, mrm_weight=2.0, contrastive_weight=3.0)
  r = rng(8)
  outputs = {
      'mlm_logits': jnp.asarray(r.normal(size=(2, 3, 5))),
      'mrm_pred': jnp.asarray(r.normal(size=(2, 4, 6))),
      'enc_pooled_text': jnp.asarray(r.normal(size=(2, 6))),
      'enc_pooled_visual': jnp.asarray(r.normal(size=(2, 6))),
  }
  batch = {
      'lm_label_ids': jnp.asarray([[1, -1, 2], [-1, 4, -1]]),
      'image_label': jnp.asarray([[1, -1, -1, 1]] * 2),
      'image_target': jnp.asarray(r.normal(size=(2, 4, 6))),
  }
  terms = losses.pretraining_losses(outputs, batch, cfg)
  np.testing.assert_allclose(
      terms['total'],
      0.5 * terms['mlm'] + 2.0 * terms['mrm'] + 3.0 * terms['contrastive'],
      rtol=1e-6,
  )
  assert set(terms) == {'mlm', 'mrm', 'contrastive', 'total'}


def test_unknown_contrastive_kind_is_rejected():
  cfg = config_lib.loss_config()
  cfg.contrastive = 'triplet'
  with pytest.raises(
      ValueError,
      match=r"loss.contrastive must be one of \('ntxent', 'clip', 'siglip'\), got 'triplet'",
  ):
    losses.init_loss_params(cfg)
