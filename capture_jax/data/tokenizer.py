"""BERT WordPiece tokenisation of captions, and training a vocab with no download.

`load_tokenizer` builds transformers' fast BERT tokenizer from a `vocab.txt`
(one token per line, id = line number) with bert-base-chinese's behaviour:
lower-casing, every CJK character its own token, WordPiece on the rest,
`[CLS] caption [SEP]`, padding with `[PAD]` = id 0. `TextEncoder` turns a
batch of captions into `input_ids [B, T]` and `input_mask [B, T]` with the
Rust backend in one call.

Command line (train a WordPiece vocab on the captions of a Product1M folder)::

    python -m capture_jax.data.tokenizer train --data_dir DIR --vocab_size 2000 --out vocab.txt

Note: with transformers 5, `BertTokenizerFast(vocab_file=...)` silently
ignores the file and yields a 5-token vocabulary; the vocab must be passed as
`vocab=` (a dict), which `load_tokenizer` does and checks.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Iterable, Iterator, Sequence

import numpy as np
import tokenizers
import transformers

from capture_jax.data import formats

# Special tokens in BERT's spelling; a vocab we train puts them first, so
# [PAD] = 0 (the model pads with 0), [UNK] = 1, [CLS] = 2, [SEP] = 3, [MASK] = 4.
SPECIAL_TOKENS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')


def read_vocab(vocab_file: str) -> dict[str, int]:
  """token -> id (the line number), checking BERT's special tokens are present."""
  with open(vocab_file, encoding='utf-8') as f:
    tokens = [line.rstrip('\n') for line in f]
  vocab: dict[str, int] = {}
  for i, tok in enumerate(tokens):
    if tok in vocab:
      raise ValueError(f'{vocab_file}:{i + 1}: token {tok!r} repeats line {vocab[tok] + 1}')
    vocab[tok] = i
  missing = [t for t in SPECIAL_TOKENS if t not in vocab]
  if missing:
    raise ValueError(f'{vocab_file}: missing special token(s) {missing}')
  if vocab['[PAD]'] != 0:
    raise ValueError(
        f'{vocab_file}: [PAD] must be the first line (id 0), found at line {vocab["[PAD]"] + 1}'
    )
  return vocab


def load_tokenizer(vocab_file: str, do_lower_case: bool = True) -> transformers.BertTokenizerFast:
  """transformers' fast BERT WordPiece tokenizer over `vocab_file`."""
  vocab = read_vocab(vocab_file)
  tok = transformers.BertTokenizerFast(
      vocab=vocab, do_lower_case=do_lower_case, tokenize_chinese_chars=True
  )
  if len(tok) != len(vocab):
    raise RuntimeError(f'{vocab_file}: tokenizer has {len(tok)} tokens, file {len(vocab)}')
  return tok


class TextEncoder:
  """Batch captions -> padded ids; a thin, fast wrapper over the Rust backend.

  The transformers tokenizer is kept (`.tokenizer`) for anything else; batch
  encoding goes through a copy of its backend with truncation and padding
  fixed to `max_len`, which avoids per-call Python overhead.
  """

  def __init__(self, vocab_file: str, max_len: int, do_lower_case: bool = True):
    if max_len < 2:
      raise ValueError(f'max_len must leave room for [CLS] and [SEP], got {max_len}')
    self.tokenizer = load_tokenizer(vocab_file, do_lower_case)
    self.max_len = max_len
    self.vocab_size = len(self.tokenizer)
    self.pad_id = self.tokenizer.pad_token_id
    self.cls_id = self.tokenizer.cls_token_id
    self.sep_id = self.tokenizer.sep_token_id
    self.mask_id = self.tokenizer.mask_token_id
    self.unk_id = self.tokenizer.unk_token_id
    backend = tokenizers.Tokenizer.from_str(self.tokenizer.backend_tokenizer.to_str())
    backend.enable_truncation(max_length=max_len)
    backend.enable_padding(length=max_len, pad_id=self.pad_id, pad_token='[PAD]')
    self._backend = backend

  def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Encodes `[CLS] text [SEP]`, truncated and padded.

    Returns:
      input_ids [B, max_len] int32 and input_mask [B, max_len] int32.
    """
    if not texts:
      z = np.zeros((0, self.max_len), np.int32)
      return z, z.copy()
    encs = self._backend.encode_batch(list(texts))
    ids = np.array([e.ids for e in encs], np.int32)
    mask = np.array([e.attention_mask for e in encs], np.int32)
    return ids, mask


def iter_titles(data_dir: str, splits: Sequence[str] = formats.SPLITS) -> Iterator[str]:
  """Titles of the given splits whose annotation files exist."""
  for split in splits:
    path = os.path.join(data_dir, formats.annotation_filename(split))
    if os.path.exists(path):
      for _, ann in formats.read_annotations(path, require_labels=False):
        yield ann.title


def train_vocab(
    texts: Iterable[str],
    vocab_size: int,
    out_path: str,
    min_frequency: int = 2,
    do_lower_case: bool = True,
) -> int:
  """Trains a BERT WordPiece vocab with `tokenizers` and writes `vocab.txt`.

  Every character seen is kept (no alphabet limit), so no caption character
  of the training text becomes [UNK]; CJK characters are split one per token
  before WordPiece, as bert-base-chinese does. Returns the vocab size.
  """
  wp = tokenizers.BertWordPieceTokenizer(
      clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=do_lower_case
  )
  wp.train_from_iterator(
      texts,
      vocab_size=vocab_size,
      min_frequency=min_frequency,
      limit_alphabet=1_000_000,
      special_tokens=list(SPECIAL_TOKENS),
      show_progress=False,
      wordpieces_prefix='##',
  )
  vocab = wp.get_vocab()
  tokens = sorted(vocab, key=vocab.get)
  if tokens[: len(SPECIAL_TOKENS)] != list(SPECIAL_TOKENS):
    raise RuntimeError(f'special tokens not first: {tokens[: len(SPECIAL_TOKENS)]}')
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  with open(out_path, 'w', encoding='utf-8') as f:
    f.write('\n'.join(tokens) + '\n')
  return len(tokens)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  sub = parser.add_subparsers(dest='command', required=True)
  train = sub.add_parser('train', help='train a WordPiece vocab on the captions')
  train.add_argument('--data_dir', required=True, help='folder with product1m_*_ossurl_v2.txt')
  train.add_argument('--vocab_size', type=int, default=2000)
  train.add_argument('--out', required=True, help='vocab.txt to write')
  train.add_argument('--min_frequency', type=int, default=2)
  # Titles are model inputs, not labels: including the query titles only
  # avoids [UNK] for characters that appear in queries alone.
  train.add_argument('--splits', default=','.join(formats.SPLITS))
  args = parser.parse_args(argv)
  n = train_vocab(
      iter_titles(args.data_dir, args.splits.split(',')),
      args.vocab_size,
      args.out,
      args.min_frequency,
  )
  print(f'wrote {args.out}: {n} tokens', file=sys.stderr)


if __name__ == '__main__':
  main()
