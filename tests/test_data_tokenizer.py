"""WordPiece vocab training and BERT tokenisation of captions."""

from __future__ import annotations

import numpy as np
import pytest

from capture_jax.data import formats
from capture_jax.data import tokenizer

TITLES = [
    '韩国AHC黄金面霜正品',
    'AHC 玻尿酸爽肤水 补水保湿',
    'Lumiva黄金眼霜 套装',
    'lumiva 面霜 正品 包邮',
    '雅诗兰黛小棕瓶精华液',
    'Lumiva Lumiva AHC',
] * 5


@pytest.fixture(scope='module')
def vocab(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('vocab') / 'vocab.txt')
  tokenizer.train_vocab(TITLES, vocab_size=200, out_path=path, min_frequency=1)
  return path


def test_trained_vocab_has_bert_special_tokens_first(vocab):
  lines = open(vocab, encoding='utf-8').read().splitlines()
  assert lines[:5] == ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']
  assert 'lumiva' in lines and 'ahc' in lines  # frequent words become whole tokens
  assert '黄' in lines and '黄金' not in lines  # CJK characters stay single tokens


def test_tokenizer_splits_chinese_characters(vocab):
  tok = tokenizer.load_tokenizer(vocab)
  assert tok.tokenize('AHC黄金面霜') == ['ahc', '黄', '金', '面', '霜']
  assert (
      tok.pad_token_id,
      tok.unk_token_id,
      tok.cls_token_id,
      tok.sep_token_id,
      tok.mask_token_id,
  ) == (0, 1, 2, 3, 4)
  assert tok.tokenize('鑫') == ['[UNK]']  # a character never seen


def test_text_encoder_pads_and_truncates(vocab):
  enc = tokenizer.TextEncoder(vocab, max_len=8)
  ids, mask = enc(['AHC黄金', 'AHC黄金面霜正品 套装 lumiva'])
  assert ids.dtype == np.int32 and ids.shape == (2, 8) and mask.shape == (2, 8)
  tok = enc.tokenizer
  assert ids[0].tolist() == [2] + tok.convert_tokens_to_ids(['ahc', '黄', '金']) + [3, 0, 0, 0]
  assert mask[0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
  assert ids[1, 0] == 2 and ids[1, -1] == 3 and mask[1].all()  # truncated, still ends in [SEP]
  # Same ids as the transformers tokenizer itself.
  ref = tok(
      ['AHC黄金', 'AHC黄金面霜正品 套装 lumiva'],
      max_length=8,
      padding='max_length',
      truncation=True,
  )
  assert ids.tolist() == ref['input_ids'] and mask.tolist() == ref['attention_mask']


def test_bad_vocab_files(tmp_path):
  path = tmp_path / 'v.txt'
  path.write_text('[UNK]\n[PAD]\n[CLS]\n[SEP]\n[MASK]\n', encoding='utf-8')
  with pytest.raises(ValueError, match='must be the first line'):
    tokenizer.load_tokenizer(str(path))
  path.write_text('[PAD]\n[UNK]\n[CLS]\n[SEP]\n', encoding='utf-8')
  with pytest.raises(ValueError, match=r"missing special token\(s\) \['\[MASK\]'\]"):
    tokenizer.load_tokenizer(str(path))


def test_cli_trains_on_a_data_folder(tmp_path):
  ann = [formats.Annotation(str(i), t) for i, t in enumerate(TITLES)]
  formats.write_annotations(str(tmp_path / formats.annotation_filename('train')), ann)
  out = tmp_path / 'out' / 'vocab.txt'
  tokenizer.main(['train', '--data_dir', str(tmp_path), '--vocab_size', '100', '--out', str(out)])
  vocab = tokenizer.read_vocab(str(out))
  assert 5 < len(vocab) <= 100 and vocab['[PAD]'] == 0
