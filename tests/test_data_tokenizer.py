"""WordPiece vocab training and BERT tokenisation of captions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from capture_jax.data import formats
from capture_jax.data import tokenizer

REPO = Path(__file__).resolve().parents[1]

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


def test_vocab_fingerprint_is_the_token_list(vocab, tmp_path):
  lines = open(vocab, encoding='utf-8').read().splitlines()
  no_final_newline = tmp_path / 'no_final_newline.txt'
  no_final_newline.write_text('\n'.join(lines), encoding='utf-8')
  assert tokenizer.vocab_fingerprint(str(no_final_newline)) == tokenizer.vocab_fingerprint(vocab)
  reordered = tmp_path / 'reordered.txt'  # the same size and tokens, two swapped
  reordered.write_text('\n'.join(lines[:5] + [lines[6], lines[5]] + lines[7:]) + '\n')
  smaller = tmp_path / 'smaller.txt'
  smaller.write_text('\n'.join(lines[:-1]) + '\n')
  fingerprints = {tokenizer.vocab_fingerprint(str(p)) for p in (vocab, reordered, smaller)}
  assert len(fingerprints) == 3


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


def test_vocab_is_a_deterministic_function_of_the_data(tmp_path):
  # The `tokenizers` trainer broke ties in hash order: 3 runs, 3 different files.
  a, b = tmp_path / 'a' / 'vocab.txt', tmp_path / 'b' / 'vocab.txt'
  assert tokenizer.train_vocab(TITLES, 60, str(a), min_frequency=1) == 60
  tokenizer.train_vocab(TITLES, 60, str(b), min_frequency=1)
  assert a.read_bytes() == b.read_bytes()
  # Nor does the order words are first seen in matter (only the counts do).
  counts = tokenizer.count_words(TITLES)
  reordered = dict(sorted(counts.items(), key=lambda kv: kv[0], reverse=True))
  assert tokenizer.build_vocab(reordered, 60, 1) == a.read_text(encoding='utf-8').splitlines()


def test_build_vocab_breaks_ties_by_pair_then_stops_at_min_frequency():
  # ('a', '##b') occurs 4 times, ('x', '##y') 3; with 'ab1' gone both occur 3 times and the
  # smaller pair, ('a', '##b'), still merges first.
  vocab = tokenizer.build_vocab({'xy': 3, 'ab': 3, 'ab1': 1}, vocab_size=100, min_frequency=2)
  specials = list(tokenizer.SPECIAL_TOKENS)
  chars = ['1', 'a', 'b', 'x', 'y', '##1', '##a', '##b', '##x', '##y']
  # 'ab' (3+1 = 4) first, then 'xy' (3); 'ab1' occurs once, under min_frequency.
  assert vocab == specials + chars + ['ab', 'xy']
  assert tokenizer.build_vocab({'xy': 3, 'ab': 3}, vocab_size=5 + 8 + 1)[-1] == 'ab'


def test_every_character_seen_inside_a_word_has_a_continuation_piece(vocab):
  # A new word of seen characters splits into pieces, never a whole-word [UNK].
  tok = tokenizer.load_tokenizer(vocab)
  assert '[UNK]' not in tok.tokenize('mulivaha')


def run_cli(*args):
  return subprocess.run(
      [sys.executable, '-m', 'capture_jax.data.tokenizer', 'train', *map(str, args)],
      capture_output=True,
      text=True,
      cwd=REPO,
      env={**os.environ, 'PYTHONPATH': str(REPO)},
      timeout=120,
  )


@pytest.fixture
def data_dir(tmp_path):
  ann = [formats.Annotation(str(i), t) for i, t in enumerate(TITLES)]
  formats.write_annotations(str(tmp_path / formats.annotation_filename('train')), ann)
  return tmp_path


def test_cli_trains_on_a_data_folder_and_guards_existing_files(data_dir):
  out = data_dir / 'out' / 'vocab.txt'
  proc = run_cli('--data_dir', data_dir, '--vocab_size', 100, '--out', out)
  assert proc.returncode == 0, proc.stderr
  vocab = tokenizer.read_vocab(str(out))
  assert 5 < len(vocab) <= 100 and vocab['[PAD]'] == 0
  first = out.read_bytes()
  manifest = json.loads((data_dir / 'out' / 'vocab.txt.manifest.json').read_text())
  assert manifest['settings']['vocab_size'] == 100 and manifest['tokens'] == len(vocab)

  assert tokenizer.is_up_to_date(str(out), TITLES, vocab_size=100)
  assert not tokenizer.is_up_to_date(str(out), TITLES, vocab_size=50)
  assert not tokenizer.is_up_to_date(str(out), TITLES[1:], vocab_size=100)
  # Its own vocab, same titles and settings: rewritten, byte-identical.
  proc = run_cli('--data_dir', data_dir, '--vocab_size', 100, '--out', out)
  assert proc.returncode == 0, proc.stderr
  assert out.read_bytes() == first

  # Its own vocab but other settings: the token ids would change under trained models.
  proc = run_cli('--data_dir', data_dir, '--vocab_size', 50, '--out', out)
  assert proc.returncode == 1
  assert f'{out}: holds a vocab this trainer wrote with different settings' in proc.stderr
  assert '--overwrite' in proc.stderr and 'Traceback' not in proc.stderr
  assert out.read_bytes() == first

  # A file it did not write (here: its vocab, edited by hand) is never replaced silently...
  out.write_text(out.read_text(encoding='utf-8') + 'extra\n', encoding='utf-8')
  edited = out.read_bytes()
  proc = run_cli('--data_dir', data_dir, '--vocab_size', 100, '--out', out)
  assert proc.returncode == 1
  assert f'{out}: already exists and was not written by this trainer' in proc.stderr
  assert out.read_bytes() == edited
  # ... unless asked to.
  proc = run_cli('--data_dir', data_dir, '--vocab_size', 60, '--out', out, '--overwrite')
  assert proc.returncode == 0, proc.stderr
  assert len(tokenizer.read_vocab(str(out))) == 60


def test_cli_bad_input_names_it(data_dir, tmp_path):
  proc = run_cli('--data_dir', tmp_path / 'nowhere', '--out', tmp_path / 'v.txt')
  assert proc.returncode == 1 and 'nowhere: no titles' in proc.stderr
  proc = run_cli('--data_dir', data_dir, '--out', tmp_path / 'v.txt', '--splits', 'train,val')
  assert proc.returncode == 1 and "unknown split(s) ['val']" in proc.stderr
  proc = run_cli('--data_dir', data_dir, '--out', data_dir)
  assert proc.returncode == 1 and f'{data_dir}: is a folder' in proc.stderr
  with pytest.raises(tokenizer.VocabExistsError, match='v.txt: already exists'):
    (tmp_path / 'v.txt').write_text('[PAD]\n')
    tokenizer.train_vocab(TITLES, 50, str(tmp_path / 'v.txt'))


def test_the_vocab_reads_only_the_configured_splits(tmp_path):
  from capture_jax import config as config_lib  # pylint: disable=import-outside-toplevel

  titles = {
      'train': ['alpha beta gamma', 'alpha beta'] * 3,
      'gallery': ['gamma delta'] * 3,
      'dev': ['zebra queryonly 鷹'] * 3,  # words and a character only a query has
      'test': ['yak testonly 鷲'] * 3,
  }
  for split, texts in titles.items():
    ann = [formats.Annotation(f'{split}{i}', t, labels=('x',)) for i, t in enumerate(texts)]
    formats.write_annotations(str(tmp_path / formats.annotation_filename(split)), ann)
  d = config_lib.data_config()
  d.data_dir, d.vocab_size = str(tmp_path), 200
  assert d.vocab_splits == 'train,gallery'  # the default: what a user has before any query
  assert tokenizer.vocab_titles(d) == titles['train'] + titles['gallery']

  def trained(splits):
    d.vocab_splits, d.vocab_file = splits, str(tmp_path / f'{splits}.txt')
    assert tokenizer.ensure_vocab(d) > 5
    assert tokenizer.ensure_vocab(d) is None  # the same vocab again: reused
    return set(tokenizer.read_vocab(d.vocab_file))

  default = trained('train,gallery')
  assert {'alpha', 'delta'} <= default or {'a', '##l'} <= default
  assert not {'z', '鷹', 'y', '鷲'} & default  # no character of a query title
  with_dev = trained('train,gallery,dev')
  assert {'z', '鷹'} <= with_dev and not {'鷲'} & with_dev
  # The command's default is the config's.
  out = tmp_path / 'cli.txt'
  proc = run_cli('--data_dir', tmp_path, '--vocab_size', 200, '--out', out, '--min_frequency', 2)
  assert proc.returncode == 0, proc.stderr
  assert out.read_text(encoding='utf-8') == (tmp_path / 'train,gallery.txt').read_text(
      encoding='utf-8'
  )
  d.vocab_splits = 'dev'
  (tmp_path / formats.annotation_filename('dev')).unlink()
  with pytest.raises(FileNotFoundError, match='no titles to train the vocab on'):
    tokenizer.vocab_titles(d)
