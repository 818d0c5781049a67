"""The PyTorch benchmark peer (`capture_jax.bench.torch_peer`) computes what the release computes.

Fed the release fixture's weights, it matches every stored output and loss to
1e-5 (as our model does in test_release_fixture.py), and its training step runs.
"""

from __future__ import annotations


import numpy as np
import pytest

torch = pytest.importorskip('torch')

from capture_jax import batch as batch_lib  # noqa: E402
from capture_jax import config as config_lib  # noqa: E402
from capture_jax.bench import torch_peer  # noqa: E402
from tests import helpers  # noqa: E402

OUTPUT_KEYS = helpers.RELEASE_OUTPUT_KEYS
INPUT_KEYS = batch_lib.TRAIN_KEYS


@pytest.mark.parametrize('case', ['case_full', 'case_shared_padding'])
def test_peer_matches_release_outputs(shared, case):
  fixture_dir = shared / 'reference' / 'release_fixture'
  state_dict = dict(np.load(fixture_dir / 'state_dict.npz'))
  cfg = helpers.release_run_config(fixture_dir, state_dict)
  model = torch_peer.CapturePeer(cfg.model)
  torch_peer.load_release_state_dict(model, state_dict)
  model.eval()
  data = dict(np.load(fixture_dir / f'{case}.npz'))
  batch = torch_peer.to_torch_batch({k: data[k] for k in INPUT_KEYS})
  with torch.no_grad():
    out = model(batch)
    terms = torch_peer.losses(out, batch, cfg.loss)
  for key in OUTPUT_KEYS:
    assert tuple(out[key].shape) == data[key].shape, key
    assert helpers.rel_err(out[key].numpy(), data[key]) < 1e-5, key
  for theirs, ours in {'mlm': 'mlm', 'mrm': 'mrm', 'clr': 'contrastive'}.items():
    assert helpers.rel_err(terms[ours].numpy(), data[theirs][0]) < 1e-5, theirs


def test_peer_train_step_lowers_the_loss():
  cfg = config_lib.base_config()
  m = cfg.model
  m.update(vocab_size=50, hidden_size=32, num_attention_heads=2, intermediate_size=64)
  m.update(num_hidden_layers=1, v_feature_size=16, v_target_size=16, v_hidden_size=32)
  m.update(v_num_attention_heads=2, v_intermediate_size=48, v_num_hidden_layers=1)
  m.update(bi_hidden_size=16, bi_num_attention_heads=2, co_num_layers=1, cross_hidden_size=32)
  m.update(cross_num_attention_heads=2, cross_num_layers=1, cross_max_position_embeddings=32)
  m.update(max_position_embeddings=32, max_text_len=8)
  cfg.train.learning_rate = 1e-3
  rng = np.random.default_rng(0)
  b, t, r = 4, 8, 5
  batch = torch_peer.to_torch_batch(
      {
          'input_ids': rng.integers(1, 50, (b, t)),
          'input_mask': np.ones((b, t)),
          'segment_ids': np.zeros((b, t)),
          'image_feat': rng.normal(size=(b, r + 1, 16)),
          'image_loc': rng.uniform(size=(b, r + 1, 5)),
          'image_mask': np.ones((b, r + 1)),
          'lm_label_ids': np.where(rng.uniform(size=(b, t)) < 0.3, rng.integers(1, 50, (b, t)), -1),
          'image_label': np.where(rng.uniform(size=(b, r)) < 0.3, 1, -1),
          'image_target': rng.normal(size=(b, r, 16)),
      }
  )
  _, step = torch_peer.make_train_step(cfg)
  first = step(batch)
  for _ in range(10):
    last = step(batch)
  assert np.isfinite(first) and last < first
