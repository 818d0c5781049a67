"""Error messages and layout helpers of the weight importer (no ../shared needed)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import traverse_util

from capture_jax import convert
from tests.helpers import release_state_dict, tiny_config


@pytest.fixture
def cfg():
  return tiny_config().model


def test_round_trip_places_every_tensor(cfg):
  sd = release_state_dict(cfg)
  params, report = convert.from_release_state_dict(sd, cfg)
  flat = traverse_util.flatten_dict(params)
  np.testing.assert_array_equal(
      flat[('text_stream', 'layer_1', 'query', 'dense', 'kernel')],
      sd['bert.encoder.layer.1.attention.self.query.weight'].T,
  )
  w = cfg.cross_hidden_size
  np.testing.assert_array_equal(
      flat[('co_transformer', 'layer_0', 'value', 'dense', 'kernel')],
      sd['bert.cross_encoder.transformer.resblocks.0.attn.in_proj_weight'][2 * w :].T,
  )
  np.testing.assert_array_equal(
      flat[('co_transformer', 'layer_0', 'key', 'dense', 'bias')],
      sd['bert.cross_encoder.transformer.resblocks.0.attn.in_proj_bias'][w : 2 * w],
  )
  assert report.unused == ['cls.predictions.decoder.weight']
  assert set(flat) == set(convert.param_shapes(cfg))


def test_torch_module_prefix_and_tensors_are_accepted(cfg):
  torch = pytest.importorskip('torch')
  sd = {'module.' + k: torch.from_numpy(v) for k, v in release_state_dict(cfg).items()}
  params, _ = convert.from_release_state_dict(sd, cfg)
  assert jax.tree.leaves(params)


def test_missing_tensors_are_named(cfg):
  sd = release_state_dict(cfg)
  del sd['bert.encoder.c_layer.1.biattention.key2.weight']
  with pytest.raises(
      convert.ConversionError,
      match='lacks 1 tensors the model config needs: bert.encoder.c_layer.1.biattention.key2.weight',
  ):
    convert.from_release_state_dict(sd, cfg)


def test_wrong_shapes_are_named(cfg):
  sd = release_state_dict(cfg)
  sd['bert.v_embeddings.image_embeddings.weight'] = np.zeros((32, 2048), np.float32)
  with pytest.raises(
      convert.ConversionError,
      match=r'bert.v_embeddings.image_embeddings.weight gives \(2048, 32\) '
      r'for visual_embeddings/image_embeddings/kernel, expected \(24, 32\)',
  ):
    convert.from_release_state_dict(sd, cfg)


def test_unknown_tensor_names_are_an_error_unless_not_strict(cfg):
  sd = release_state_dict(cfg)
  sd['bert.encoder.layer.0.attention.self.rotary.weight'] = np.zeros(3, np.float32)
  sd['bert.encoder.c_layer.0.biOutput.q_dense1.weight'] = np.zeros((32, 16), np.float32)
  with pytest.raises(
      convert.ConversionError, match='1 tensors that the model config does not use.*rotary'
  ):
    convert.from_release_state_dict(sd, cfg)
  _, report = convert.from_release_state_dict(sd, cfg, strict=False)
  assert 'bert.encoder.layer.0.attention.self.rotary.weight' in report.unused
  assert 'bert.encoder.c_layer.0.biOutput.q_dense1.weight' in report.unused


def test_an_untied_decoder_is_rejected(cfg):
  sd = release_state_dict(cfg)
  sd['cls.predictions.decoder.weight'] = sd['cls.predictions.decoder.weight'] + 1
  with pytest.raises(
      convert.ConversionError, match='decoder.weight differs from bert.embeddings.word_embeddings'
  ):
    convert.from_release_state_dict(sd, cfg)


def test_file_formats_round_trip(cfg, tmp_path):
  sd = release_state_dict(cfg)
  np.savez(tmp_path / 'sd.npz', **sd)
  torch = pytest.importorskip('torch')
  torch.save({'state_dict': {k: torch.from_numpy(v) for k, v in sd.items()}}, tmp_path / 'ckpt.pt')
  a, _ = convert.from_release_state_dict(tmp_path / 'sd.npz', cfg)
  b, _ = convert.from_release_state_dict(tmp_path / 'ckpt.pt', cfg)
  assert jax.tree.all(jax.tree.map(np.array_equal, a, b))
  with pytest.raises(FileNotFoundError, match='does-not-exist.bin does not exist'):
    convert.load_tensor_file(tmp_path / 'does-not-exist.bin')


def test_merge_params_names_unknown_paths(cfg):
  params, _ = convert.from_release_state_dict(release_state_dict(cfg), cfg)
  with pytest.raises(convert.ConversionError, match='text_stream/layer_9/query is not a parameter'):
    convert.merge_params(params, {'text_stream': {'layer_9': {'query': np.zeros(2)}}})
