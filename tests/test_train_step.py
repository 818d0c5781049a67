"""The train step on one device: gradient accumulation, the non-finite guard, the optimizer groups."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from capture_jax import batch as batch_lib
from capture_jax import param_paths
from capture_jax.data import masking as masking_lib
from capture_jax.training import state as state_lib
from capture_jax.training import optimizer as optimizer_lib
from capture_jax.training import sharding
from capture_jax.training import train_step as train_step_lib
from tests.helpers import tiny_config

ONE_LAYER = dict(num_hidden_layers=1, v_num_hidden_layers=1, co_num_layers=1, cross_num_layers=1)


def setup(microbatches=1, **loss):
  cfg = tiny_config(**ONE_LAYER)
  cfg.model.hidden_dropout_prob = cfg.model.attention_probs_dropout_prob = 0.0
  cfg.data.max_regions, cfg.data.max_text_len = 6, 10
  cfg.data.feature_dim = cfg.model.v_feature_size
  cfg.train.microbatches = microbatches
  cfg.train.warmup_fraction = 0.0  # a non-zero learning rate at step 0
  cfg.loss.update(loss)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  params = jax.jit(lambda k: state_lib.initial_params(cfg, k))(jax.random.PRNGKey(0))
  optimizer = optimizer_lib.make_optimizer(cfg.train, params)
  state = train_step_lib.init_train_state(params, optimizer, seed=0)
  masking = masking_lib.MaskingSpec.from_config(cfg)
  step = jax.jit(train_step_lib.make_train_step(cfg, mesh, optimizer, masking))
  return cfg, state, step


def host_batch(cfg, key):
  """A host batch (storage dtype, unmasked, positions 3 * key + range(B)) of `cfg`'s sizes."""
  layout = batch_lib.BatchLayout.from_config(cfg)
  host = layout.host_random(3, cfg.model.vocab_size, seed=key, first_position=3 * key)
  return {k: jnp.asarray(v) for k, v in host.items()}


def test_two_microbatches_of_the_same_rows_equal_one_batch():
  """Micro-batch m takes rows m, m+M, ...: a batch whose rows come in identical pairs gives
  micro-batches equal to the half batch, so the update equals the half batch's."""
  cfg, state, step_one = setup(microbatches=1)
  half = host_batch(cfg, key=11)  # a row's masks follow its position: pairs mask alike
  doubled = {k: jnp.repeat(v, 2, axis=0) for k, v in half.items()}
  _, state_m, step_two = setup(microbatches=2)
  one, metrics_one = step_one(state, half)
  two, metrics_two = step_two(state_m, doubled)
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(metrics_one['loss/total'], metrics_two['loss/total'], rtol=1e-5)


def test_non_finite_updates_are_skipped_and_counted():
  cfg, state, step = setup(mrm_weight=float('nan'))
  batch = host_batch(cfg, key=12)
  new, metrics = step(state, batch)
  assert int(new.skipped) == 1 and int(metrics['skipped_updates']) == 1
  assert int(new.step) == 1
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, b)


def test_a_finite_step_changes_parameters_and_reports_metrics():
  cfg, state, step = setup()
  new, metrics = step(state, host_batch(cfg, key=13))
  assert int(new.skipped) == 0
  assert set(metrics) == {
      'loss/mlm',
      'loss/mrm',
      'loss/contrastive',
      'loss/total',
      'grad_norm',
      'learning_rate',
      'skipped_updates',
  }
  changed = [
      not np.array_equal(a, b)
      for a, b in zip(jax.tree.leaves(new.params['model']), jax.tree.leaves(state.params['model']))
  ]
  assert all(changed)


def test_weight_decay_groups_and_learning_rate_schedule():
  assert optimizer_lib.is_decayed('model/text_stream/layer_0/query/dense/kernel')
  assert optimizer_lib.is_decayed('model/word_embeddings/embedding')
  assert not optimizer_lib.is_decayed('model/text_stream/layer_0/query/dense/bias')
  assert not optimizer_lib.is_decayed('model/text_stream/layer_0/attention_layer_norm/scale')
  assert not optimizer_lib.is_decayed('model/mlm_bias')
  assert not optimizer_lib.is_decayed('loss/log_inv_temperature')
  cfg = tiny_config().train
  cfg.update(num_steps=100, warmup_fraction=0.1, learning_rate=1e-4)
  schedule = optimizer_lib.learning_rate_schedule(cfg)
  np.testing.assert_allclose(
      [schedule(0), schedule(5), schedule(10), schedule(55), schedule(100)],
      [0.0, 5e-5, 1e-4, 5e-5, 0.0],
      atol=1e-12,
  )


def test_bert_initialised_parameters_take_the_lr_multiplier():
  cfg = tiny_config(**ONE_LAYER)
  cfg.data.max_regions = 6
  params = jax.jit(lambda k: state_lib.initial_params(cfg, k))(jax.random.PRNGKey(0))
  grads = jax.tree.map(jnp.ones_like, params)
  plain = optimizer_lib.make_optimizer(cfg.train, params)
  scaled = optimizer_lib.make_optimizer(cfg.train, params, optimizer_lib.BERT_INITIALISED)
  first_update = lambda tx: jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])(grads, params)
  u_plain, u_scaled = first_update(plain), first_update(scaled)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(u_plain), jax.tree.leaves(u_scaled)):
    name = param_paths.path_str(path)
    expected = 0.1 if name.startswith(('model/text_stream/', 'model/word_embeddings/')) else 1.0
    if np.any(np.asarray(a) != 0):
      np.testing.assert_allclose(b, expected * np.asarray(a), rtol=1e-6, err_msg=name)
