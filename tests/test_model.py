"""Shapes, padding, dtype and layout options, gradients and input validation of CaptureModel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capture_jax import config as config_lib
from capture_jax import convert, losses
from capture_jax import batch as batch_lib
from capture_jax.models import CaptureModel

from tests.helpers import B, R, T, random_batch, tiny_config


class Jitted:
  """`init`/`apply` of a CaptureModel under jit (eager Flax compiles every op separately: slow)."""

  def __init__(self, model_cfg):
    self.module = CaptureModel(model_cfg)
    self._apply = jax.jit(self.module.apply, static_argnames=('train',))
    self._init = jax.jit(lambda key, batch: self.module.init({'params': key}, batch)['params'])

  def init(self, batch, seed=0):
    return self._init(jax.random.key(seed), batch)

  def apply(self, params, batch, train=False, rng=None):
    rngs = {'dropout': rng} if rng is not None else None
    return self._apply({'params': params}, batch, train=train, rngs=rngs)


@pytest.fixture(scope='module')
def model_and_params():
  cfg = tiny_config()
  model = Jitted(cfg.model)
  params = model.init(random_batch(cfg))
  return cfg, model, params


def test_output_shapes(model_and_params):
  cfg, model, params = model_and_params
  out = model.apply(params, random_batch(cfg))
  m = cfg.model
  expected = {
      'mlm_logits': (B, T, m.vocab_size),
      'mrm_pred': (B, R, m.v_target_size),
      'pooled_text': (B, m.bi_hidden_size),
      'pooled_visual': (B, m.bi_hidden_size),
      'enc_pooled_text': (B, m.bi_hidden_size),
      'enc_pooled_visual': (B, m.bi_hidden_size),
      'sequence_text': (B, T, m.bi_hidden_size),
      'sequence_visual': (B, R + 1, m.bi_hidden_size),
      'text_after_coattention': (B, T, m.hidden_size),
      'visual_after_coattention': (B, R + 1, m.v_hidden_size),
  }
  assert {k: v.shape for k, v in out.items()} == expected
  assert all(v.dtype == jnp.float32 for v in out.values())


def test_paper_parameter_count():
  """148,192,136: the release's 151,936,136 minus its unused q_dense1/2 and cross_encoder.pooler."""
  cfg = config_lib.base_config().model
  shapes = jax.eval_shape(
      lambda: CaptureModel(cfg).init(
          {'params': jax.random.key(0)}, batch_lib.BatchLayout.for_model(cfg, 36, 36).dummy(1)
      )['params']
  )
  assert sum(x.size for x in jax.tree.leaves(shapes)) == 148_192_136


def test_padding_does_not_leak(model_and_params):
  """Outputs at valid positions are unchanged when padding (with garbage in it) is added."""
  cfg, model, params = model_and_params
  short = random_batch(cfg, key=1)
  pad_t, pad_r = 5, 3
  rng = np.random.default_rng(7)
  padded = {
      'input_ids': jnp.concatenate(
          [short['input_ids'], jnp.asarray(rng.integers(1, 97, (B, pad_t)))], 1
      ),
      'input_mask': jnp.pad(short['input_mask'], ((0, 0), (0, pad_t))),
      'segment_ids': jnp.pad(short['segment_ids'], ((0, 0), (0, pad_t))),
      'image_feat': jnp.concatenate(
          [
              short['image_feat'],
              jnp.asarray(rng.normal(size=(B, pad_r, cfg.model.v_feature_size)), jnp.float32),
          ],
          1,
      ),
      'image_loc': jnp.concatenate(
          [short['image_loc'], jnp.asarray(rng.uniform(size=(B, pad_r, 5)), jnp.float32)], 1
      ),
      'image_mask': jnp.pad(short['image_mask'], ((0, 0), (0, pad_r))),
  }
  a = model.apply(params, short)
  b = model.apply(params, padded)
  for key in ('pooled_text', 'pooled_visual', 'enc_pooled_text', 'enc_pooled_visual'):
    np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
  np.testing.assert_allclose(a['sequence_text'], b['sequence_text'][:, :T], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      a['sequence_visual'], b['sequence_visual'][:, : R + 1], rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(a['mlm_logits'], b['mlm_logits'][:, :T], rtol=1e-5, atol=1e-5)


def test_each_sample_is_masked_with_its_own_mask(model_and_params):
  """A batch with different padding per sample equals running each sample alone (the release's
  co-transformer mixes masks up across samples; we do not)."""
  cfg, model, params = model_and_params
  batch = random_batch(cfg, key=2, text_valid=[T, 4, 7], regions_valid=[R, 2, 4])
  together = model.apply(params, batch)
  for i in range(B):
    alone = model.apply(params, {k: v[i : i + 1] for k, v in batch.items()})
    np.testing.assert_allclose(
        together['pooled_text'][i], alone['pooled_text'][0], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        together['pooled_visual'][i], alone['pooled_visual'][0], rtol=1e-5, atol=1e-6
    )


def test_bfloat16_compute_is_close_to_float32(model_and_params):
  cfg, model, params = model_and_params
  batch = random_batch(cfg, key=3)
  f32 = model.apply(params, batch)
  bf16_cfg = cfg.model.copy_and_resolve_references()
  bf16_cfg.dtype = 'bfloat16'
  bf16 = Jitted(bf16_cfg).apply(params, batch)
  for key in ('pooled_text', 'pooled_visual', 'enc_pooled_text', 'mrm_pred'):
    assert bf16[key].dtype == jnp.float32
    err = np.linalg.norm(bf16[key] - f32[key]) / np.linalg.norm(f32[key])
    assert err < 1e-2, (key, err)
  # bf16 really computes in bf16: the outputs are not bitwise equal to float32.
  assert not np.array_equal(np.asarray(bf16['pooled_text']), np.asarray(f32['pooled_text']))


@pytest.mark.parametrize(
    'option',
    [
        dict(scan_layers=True),
        dict(remat=True),
        dict(scan_layers=True, remat=True),
        dict(attention_impl='dot_product_attention'),
    ],
)
def test_performance_options_keep_the_numerics(model_and_params, option):
  cfg, model, params = model_and_params
  batch = random_batch(cfg, key=4, text_valid=[T, 5, 8], regions_valid=[R, 3, 1])
  reference = model.apply(params, batch)
  other_cfg = cfg.model.copy_and_resolve_references()
  other_cfg.update(option)
  other_params = convert.scan_layout(params) if other_cfg.scan_layers else params
  out = Jitted(other_cfg).apply(other_params, batch)
  for key in ('pooled_text', 'pooled_visual', 'mlm_logits', 'mrm_pred'):
    np.testing.assert_allclose(out[key], reference[key], rtol=2e-5, atol=2e-5, err_msg=key)


def test_scanned_init_has_stacked_layers():
  cfg = tiny_config(scan_layers=True)
  params = Jitted(cfg.model).init(random_batch(cfg))
  kernel = params['text_stream']['scanned']['query']['dense']['kernel']
  assert kernel.shape == (cfg.model.num_hidden_layers, 32, 32)
  round_trip = convert.scan_layout(convert.unscan_layout(params))
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), round_trip, params))


def test_dropout_is_active_only_in_training(model_and_params):
  cfg, model, params = model_and_params
  batch = random_batch(cfg, key=5)
  eval_a = model.apply(params, batch, train=False)
  eval_b = model.apply(params, batch, train=False)
  train_a = model.apply(params, batch, train=True, rng=jax.random.key(1))
  train_b = model.apply(params, batch, train=True, rng=jax.random.key(2))
  np.testing.assert_array_equal(eval_a['pooled_text'], eval_b['pooled_text'])
  assert not np.allclose(train_a['pooled_text'], train_b['pooled_text'])


def test_gradients_are_finite_and_reach_every_parameter(model_and_params):
  """Through the whole model with the CLIP loss (its temperature gets a gradient too);
  the other contrastive kinds are checked on the loss alone in test_losses."""
  cfg, model, params = model_and_params
  cfg = cfg.copy_and_resolve_references()
  cfg.loss.contrastive = 'clip'
  batch = random_batch(cfg, key=6, text_valid=[T, 6, 3], regions_valid=[R, 4, 2])
  loss_params = losses.init_loss_params(cfg.loss)

  def total(p, lp):
    out = model.module.apply({'params': p}, batch, train=True, rngs={'dropout': jax.random.key(0)})
    return losses.pretraining_losses(out, batch, cfg, lp)['total']

  grads, loss_grads = jax.jit(jax.grad(total, argnums=(0, 1)))(params, loss_params)
  leaves = jax.tree.leaves(grads) + jax.tree.leaves(loss_grads)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  # Unused rows of the embedding tables get no gradient; every other tensor does.
  dead = [jax.tree_util.keystr(path) for path, g in flat if not bool(jnp.any(g != 0))]
  assert dead == [], dead


@pytest.mark.parametrize('variant', [dict(co_num_layers=0), dict(cross_num_layers=0)])
def test_ablation_variants_run(variant):
  cfg = tiny_config(**variant)
  batch = random_batch(cfg)
  model = Jitted(cfg.model)
  params = model.init(batch)
  out = model.apply(params, batch)
  assert out['pooled_text'].shape == (B, cfg.model.bi_hidden_size)
  assert ('coattention' in params) == bool(cfg.model.co_num_layers)
  assert ('co_transformer' in params) == bool(cfg.model.cross_num_layers)


def _with(batch, **changes):
  return {**batch, **changes}


@pytest.mark.parametrize(
    'change, message',
    [
        (
            lambda b: _with(b, input_ids=b['input_ids'][0]),
            r'input_ids must have rank 2 \(\[B, T\]\), got shape \(10,\)',
        ),
        (
            lambda b: _with(b, input_mask=b['input_mask'][:, :5]),
            r'input_mask must have shape \(3, 10\) like input_ids',
        ),
        (
            lambda b: _with(b, image_mask=b['image_mask'][:, :3]),
            r'image_mask must have shape \(3, 7\) like image_feat',
        ),
        (
            lambda b: _with(b, image_feat=b['image_feat'][..., :5]),
            r'image_feat width must be model.v_feature_size=24, got 5',
        ),
        (
            lambda b: _with(b, image_loc=b['image_loc'][..., :4]),
            r'image_loc must have shape \(3, 7, 5\)',
        ),
        (
            lambda b: {k: v for k, v in b.items() if k != 'segment_ids'},
            r"batch is missing \['segment_ids'\]",
        ),
        (
            lambda b: _with(b, image_feat=b['image_feat'][:2]),
            'image_feat has batch 2 but input_ids has batch 3',
        ),
    ],
)
def test_bad_input_is_named(model_and_params, change, message):
  cfg, model, params = model_and_params
  with pytest.raises(ValueError, match=message):
    model.apply(params, change(random_batch(cfg)))


def test_too_long_inputs_are_rejected(model_and_params):
  cfg, model, params = model_and_params
  rng = np.random.default_rng(0)
  long = {
      'input_ids': jnp.ones((1, 40), jnp.int32),
      'input_mask': jnp.ones((1, 40), jnp.int32),
      'segment_ids': jnp.zeros((1, 40), jnp.int32),
      'image_feat': jnp.asarray(rng.normal(size=(1, 3, 24)), jnp.float32),
      'image_loc': jnp.zeros((1, 3, 5)),
      'image_mask': jnp.ones((1, 3), jnp.int32),
  }
  with pytest.raises(ValueError, match='text length 40 exceeds model.max_position_embeddings=32'):
    model.apply(params, long)
  longer_than_slots = {
      **long,
      **{k: long[k][:, :20] for k in ('input_ids', 'input_mask', 'segment_ids')},
  }
  with pytest.raises(ValueError, match='text length 20 exceeds model.max_text_len=16'):
    model.apply(params, longer_than_slots)


def test_unknown_options_are_rejected(model_and_params):
  cfg, _, params = model_and_params
  for field, value, message in [
      ('dtype', 'float16', "model.dtype must be 'float32' or 'bfloat16'"),
      (
          'attention_impl',
          'flash',
          r"model.attention_impl must be one of \('xla', 'dot_product_attention', 'cudnn'\)",
      ),
  ]:
    bad = cfg.model.copy_and_resolve_references()
    bad[field] = value
    with pytest.raises(ValueError, match=message):
      Jitted(bad).apply(params, random_batch(cfg))
