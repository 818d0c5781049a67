"""Our model, fed the release's own weights, computes what the released PyTorch CAPTURE computes.

`shared/reference/release_fixture/` holds the release's outputs on a small
configuration; we import its `state_dict` (both the torch file and the npz)
through the converter and compare every stored array and loss.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capture_jax import batch as batch_lib
from capture_jax import convert, losses
from capture_jax.models import CaptureModel
from tests import helpers

OUTPUT_KEYS = helpers.RELEASE_OUTPUT_KEYS
LOSS_KEYS = {'mlm': 'mlm', 'mrm': 'mrm', 'clr': 'contrastive'}
INPUT_KEYS = batch_lib.TRAIN_KEYS


@pytest.fixture
def fixture_dir(shared):
  return shared / 'reference' / 'release_fixture'


@pytest.mark.parametrize('weights', ['state_dict.bin', 'state_dict.npz'])
@pytest.mark.parametrize('case', ['case_full', 'case_shared_padding'])
@pytest.mark.parametrize('scan_layers', [False, True])
def test_matches_release_outputs(fixture_dir, weights, case, scan_layers):
  state_dict = convert.load_tensor_file(fixture_dir / weights)
  cfg = helpers.release_run_config(fixture_dir, state_dict)
  cfg.model.scan_layers = scan_layers
  params, report = convert.from_release_state_dict(fixture_dir / weights, cfg.model)
  assert any('q_dense1' in name for name in report.unused)
  assert any(name.startswith('bert.cross_encoder.pooler') for name in report.unused)

  data = dict(np.load(fixture_dir / f'{case}.npz'))
  batch = {k: jnp.asarray(data[k]) for k in INPUT_KEYS}
  out = jax.jit(CaptureModel(cfg.model).apply)({'params': params}, batch)
  for key in OUTPUT_KEYS:
    assert out[key].shape == data[key].shape, key
    assert helpers.rel_err(out[key], data[key]) < 1e-5, key
  terms = losses.pretraining_losses(out, batch, cfg)
  for theirs, ours in LOSS_KEYS.items():
    assert helpers.rel_err(terms[ours], data[theirs][0]) < 1e-5, theirs
  np.testing.assert_allclose(
      terms['total'], data['mlm'][0] + data['mrm'][0] + data['clr'][0], rtol=1e-5
  )


def test_a_swapped_tensor_changes_the_outputs(fixture_dir):
  """The comparison above can fail: perturbing one LayerNorm bias moves the outputs past 1e-5."""
  state_dict = convert.load_tensor_file(fixture_dir / 'state_dict.npz')
  cfg = helpers.release_run_config(fixture_dir, state_dict)
  state_dict['bert.encoder.c_layer.1.biOutput.LayerNorm2.bias'] = state_dict[
      'bert.encoder.c_layer.1.biOutput.LayerNorm1.bias'
  ]
  params, _ = convert.from_release_state_dict(state_dict, cfg.model)
  data = dict(np.load(fixture_dir / 'case_full.npz'))
  out = jax.jit(CaptureModel(cfg.model).apply)(
      {'params': params}, {k: jnp.asarray(data[k]) for k in INPUT_KEYS}
  )
  assert helpers.rel_err(out['pooled_text'], data['pooled_text']) > 1e-4
