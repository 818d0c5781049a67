"""BERT WordPiece tokenisation of captions, and training a vocab with no download.

`load_tokenizer` builds transformers' fast BERT tokenizer from a `vocab.txt`
(one token per line, id = line number) with bert-base-chinese's behaviour:
lower-casing, every CJK character its own token, WordPiece on the rest,
`[CLS] caption [SEP]`, padding with `[PAD]` = id 0. `TextEncoder` turns a
batch of captions into `input_ids [B, T]` and `input_mask [B, T]` with the
Rust backend in one call.

Command line (train a WordPiece vocab on the captions of a Product1M folder)::

    python -m capture_jax.data.tokenizer train --data_dir DIR --vocab_size 2000 --out vocab.txt \
        [--min_frequency 2 --splits train,gallery --overwrite]

The vocab is a deterministic function of the titles and the settings (same
data, same file, byte for byte: see `build_vocab`). `--out` is written with
a manifest beside it (`vocab.txt.manifest.json`); an existing `--out` is
replaced only when that manifest shows this trainer wrote it from the same
titles and settings (the result is then identical), otherwise the command
refuses (exit 1, naming the file) unless `--overwrite`.

Note: with transformers 5, `BertTokenizerFast(vocab_file=...)` silently
ignores the file and yields a 5-token vocabulary; the vocab must be passed as
`vocab=` (a dict), which `load_tokenizer` does and checks.
"""

from __future__ import annotations

import collections
import hashlib
import io
import heapq
import json
import os
import sys
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np
import tokenizers
from absl import flags

from capture_jax import cli
from capture_jax import config as config_lib
from capture_jax import storage
from capture_jax.data import formats

if TYPE_CHECKING:
  import transformers

# Special tokens in BERT's spelling; a vocab we train puts them first, so
# [PAD] = 0 (the model pads with 0), [UNK] = 1, [CLS] = 2, [SEP] = 3, [MASK] = 4.
SPECIAL_TOKENS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')


def read_vocab(vocab_file: str) -> dict[str, int]:
  """token -> id (the line number), checking BERT's special tokens are present."""
  if storage.is_remote(vocab_file):  # in a bucket: read whole, the same universal newlines
    f = io.StringIO(storage.read_bytes(vocab_file).decode('utf-8'), newline=None)
  else:
    f = open(vocab_file, encoding='utf-8')
  with f:
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


def vocab_fingerprint(vocab_file: str) -> str:
  """The identity of a vocab by content: SHA-256 of its tokens in id order, one per line.

  The one fingerprint of a vocab everywhere it travels (a built dataset's
  token ids, a checkpoint, an export): two files with the same tokens in the
  same order have the same fingerprint whether or not the file ends with a
  newline; any other order or size has another.
  """
  vocab = read_vocab(vocab_file)
  tokens = sorted(vocab, key=vocab.__getitem__)
  return hashlib.sha256('\n'.join(tokens).encode('utf-8')).hexdigest()


def load_tokenizer(vocab_file: str, do_lower_case: bool = True) -> transformers.BertTokenizerFast:
  """transformers' fast BERT WordPiece tokenizer over `vocab_file`."""
  # Imported here: it takes ~0.6 s, and most commands (train, export, evaluate) never tokenise
  # (the records carry token ids).
  import transformers  # pylint: disable=import-outside-toplevel

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

  def pack(self, token_ids: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """What `__call__` gives for the texts whose `TitleTokenizer.ids` are `token_ids`.

    `[CLS] ids[:max_len - 2] [SEP]`, padded with [PAD]: the ids a dataset
    stores (tokenised once at build time) packed without tokenising again.

    Args:
      token_ids: B int arrays [L_i] (no [CLS]/[SEP], untruncated).
    Returns:
      input_ids [B, max_len] int32 and input_mask [B, max_len] int32.
    """
    b, t = len(token_ids), self.max_len
    ids = np.full((b, t), self.pad_id, np.int32)
    lengths = np.empty(b, np.int64)
    for i, x in enumerate(token_ids):
      n = min(len(x), t - 2)
      ids[i, 1 : n + 1] = x[:n]
      lengths[i] = n + 2
    ids[:, 0] = self.cls_id
    ids[np.arange(b), lengths - 1] = self.sep_id
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int32)
    return ids, mask


class TitleTokenizer:
  """A title -> its WordPiece ids (int32 [L], no [CLS]/[SEP], untruncated): what a dataset stores.

  The same tokenisation as `TextEncoder` (one vocab file, the same
  lower-casing), so `TextEncoder.pack` of these ids equals `TextEncoder` of
  the titles.
  """

  def __init__(self, vocab_file: str, do_lower_case: bool = True):
    self.vocab_file = vocab_file
    self._backend = load_tokenizer(vocab_file, do_lower_case).backend_tokenizer

  def ids(self, title: str) -> np.ndarray:
    return np.asarray(self._backend.encode(title, add_special_tokens=False).ids, np.int32)


def iter_titles(data_dir: str, splits: Sequence[str] = formats.SPLITS) -> Iterator[str]:
  """Titles of the given splits whose annotation files exist."""
  for split in splits:
    path = os.path.join(data_dir, formats.annotation_filename(split))
    if os.path.exists(path):
      for _, ann in formats.read_annotations(path, require_labels=False):
        yield ann.title


def vocab_splits(data_config) -> list[str]:
  """`data.vocab_splits` ('train,gallery') as a list of split names."""
  return [s.strip() for s in data_config.vocab_splits.split(',') if s.strip()]


def vocab_titles(data_config) -> list[str]:
  """The only text the vocab is trained on: the titles of `data.vocab_splits` in `data.data_dir`.

  Raises:
    FileNotFoundError: none of those splits has an annotation file with a line.
  """
  splits = vocab_splits(data_config)
  titles = list(iter_titles(data_config.data_dir, splits))
  if not titles:
    raise FileNotFoundError(
        f'{data_config.data_dir}: no titles to train the vocab on: none of '
        f'{[formats.annotation_filename(s) for s in splits]} (data.vocab_splits) exists or has a line'
    )
  return titles


def ensure_vocab(data_config) -> int | None:
  """Trains `data.vocab_file` on `vocab_titles` unless it already is exactly that vocab.

  Returns:
    The number of tokens written, or None when the existing file was reused.

  Raises:
    VocabExistsError: the file is a vocab of other titles or settings, or not this
      trainer's (`train_vocab`): replacing it would change the token ids of models trained on it.
  """
  titles = vocab_titles(data_config)
  if is_up_to_date(data_config.vocab_file, titles, data_config.vocab_size):
    return None
  return train_vocab(titles, data_config.vocab_size, data_config.vocab_file)


# Bumped whenever `build_vocab` would give different tokens for the same input,
# so a manifest written by an older builder never passes for this one.
BUILDER = 'capture_jax.data.tokenizer/wordpiece-v2'
MANIFEST_SUFFIX = '.manifest.json'


class VocabExistsError(FileExistsError):
  """The vocab target holds a file this trainer did not write with the same data and settings."""


def _bert_splitter(do_lower_case: bool):
  """text -> words, exactly as `load_tokenizer`'s tokenizer splits text before WordPiece.

  The same `tokenizers` normaliser (clean-up, lower-casing and accent
  stripping, a space around every CJK character) and pre-tokeniser
  (whitespace, then each punctuation character alone) as `BertTokenizerFast`,
  so the words counted here are the words the vocab will be applied to.
  """
  normalizer = tokenizers.normalizers.BertNormalizer(
      clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=do_lower_case
  )
  pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()

  def split(text: str) -> list[str]:
    return [w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))]

  return split


def count_words(texts: Iterable[str], do_lower_case: bool = True) -> collections.Counter:
  """word -> number of occurrences over `texts` (BERT's normalisation and splitting)."""
  split = _bert_splitter(do_lower_case)
  counts: collections.Counter = collections.Counter()
  for text in texts:
    counts.update(split(text))
  return counts


def _pairs(symbols: Sequence[str]) -> Iterator[tuple[str, str]]:
  return zip(symbols, symbols[1:])


def _count_pairs(
    pieces: Sequence[Sequence[str]], counts: Sequence[int]
) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], set[int]]]:
  """Pair of adjacent pieces -> occurrences (weighted by the word counts), and -> the words
  (indices into `pieces`) holding it."""
  pair_count: dict[tuple[str, str], int] = collections.defaultdict(int)
  pair_words: dict[tuple[str, str], set[int]] = collections.defaultdict(set)
  for i, symbols in enumerate(pieces):
    for pair in _pairs(symbols):
      pair_count[pair] += counts[i]
      pair_words[pair].add(i)
  return pair_count, pair_words


def _merge_in(symbols: Sequence[str], left: str, right: str, merged: str) -> list[str]:
  """`symbols` with every `left, right` pair (left to right, not overlapping) as `merged`."""
  new, j = [], 0
  while j < len(symbols):
    if j + 1 < len(symbols) and symbols[j] == left and symbols[j + 1] == right:
      new.append(merged)
      j += 2
    else:
      new.append(symbols[j])
      j += 1
  return new


def build_vocab(word_counts: dict[str, int], vocab_size: int, min_frequency: int = 2) -> list[str]:
  """A WordPiece vocab (tokens in id order) that is a pure function of its arguments.

  bert-base-chinese's convention: the special tokens, then every character seen
  as a token of its own (a CJK character is always a word of one character, so
  it is never merged), then `##c` for every character seen inside a longer word
  (so any word made of seen characters tokenises without [UNK], also in text
  the vocab was not trained on), then WordPiece pieces learnt by BPE merges
  over the words of Latin letters and digits. That is the algorithm of the
  `tokenizers` WordPiece trainer, which breaks ties between equally frequent
  pairs in hash order (a different vocab on every run); here the next merge
  is always the pair with the highest count, then the smallest (left, right)
  in code-point order.

  Merging stops at `vocab_size` tokens or when no pair occurs `min_frequency`
  times; characters are always kept, so a data set with more distinct
  characters than `vocab_size` gives a larger vocab.

  Args:
    word_counts: word -> occurrences, from `count_words`.
    vocab_size: the largest number of tokens wanted, special tokens included.
    min_frequency: a merged piece must occur at least this often.

  Returns:
    The tokens, [PAD] first (id = position).
  """
  words = sorted(w for w in word_counts if w and w not in SPECIAL_TOKENS)
  chars = sorted({c for w in words for c in w})
  inner = sorted({c for w in words if len(w) > 1 for c in w})
  tokens = list(SPECIAL_TOKENS) + [c for c in chars if c not in SPECIAL_TOKENS]
  tokens += ['##' + c for c in inner]
  seen = set(tokens)

  # Each word as its current pieces; pair -> occurrences and pair -> words
  # holding it (a superset: a word that lost the pair is skipped on merge).
  pieces = [[w[0]] + ['##' + c for c in w[1:]] for w in words if len(w) > 1]
  counts = [word_counts[w] for w in words if len(w) > 1]
  pair_count, pair_words = _count_pairs(pieces, counts)
  # A max-heap on (count, smallest pair): entries go stale when a count
  # changes and are dropped when popped (the current count is pushed anew).
  heap = [(-n, pair) for pair, n in pair_count.items()]
  heapq.heapify(heap)
  while len(tokens) < vocab_size and heap:
    neg, pair = heapq.heappop(heap)
    if -neg != pair_count.get(pair, 0):
      continue
    if -neg < min_frequency:
      break
    left, right = pair
    merged = left + right[2:]  # `right` is never word-initial, so it has the ## prefix
    if merged not in seen:
      tokens.append(merged)
      seen.add(merged)
    touched = set()
    for i in sorted(pair_words.pop(pair)):
      old = pieces[i]
      new = _merge_in(old, left, right, merged)
      if len(new) == len(old):
        continue
      for p in _pairs(old):
        pair_count[p] -= counts[i]
        touched.add(p)
      for p in _pairs(new):
        pair_count[p] += counts[i]
        pair_words[p].add(i)
        touched.add(p)
      pieces[i] = new
    for p in sorted(touched):
      n = pair_count[p]
      if n > 0:
        heapq.heappush(heap, (-n, p))
      else:
        del pair_count[p]
  return tokens


def _sha256_file(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def _texts_sha256(texts: Sequence[str]) -> str:
  """A digest of the training text, in order (titles joined by newlines)."""
  h = hashlib.sha256()
  for t in texts:
    h.update(t.encode('utf-8'))
    h.update(b'\n')
  return h.hexdigest()


def manifest_path(vocab_path: str) -> str:
  """Where `train_vocab` records what it wrote: `vocab.txt` -> `vocab.txt.manifest.json`."""
  return vocab_path + MANIFEST_SUFFIX


def _own_unchanged_vocab(out_path: str) -> dict | None:
  """The manifest of `out_path` when this trainer wrote it and nobody edited it since, else None."""
  try:
    with open(manifest_path(out_path), encoding='utf-8') as f:
      manifest = json.load(f)
  except (OSError, ValueError):
    return None
  if not isinstance(manifest, dict) or manifest.get('vocab_sha256') != _sha256_file(out_path):
    return None
  return manifest


def _write_atomically(path: str, text: str) -> None:
  """Writes via a temporary file and a rename: an interrupted run never leaves half a vocab."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write(text)
  os.replace(tmp, path)


# What a vocab is a function of: manifest key -> what an error message calls it.
_INPUTS = {'builder': 'builder version', 'settings': 'settings', 'texts_sha256': 'titles'}


def _manifest(texts: Sequence[str], vocab_size: int, min_frequency: int, do_lower_case: bool):
  """The inputs of a vocab, as recorded beside it (the vocab's own digest is added on write)."""
  return {
      'builder': BUILDER,
      'settings': {
          'vocab_size': vocab_size,
          'min_frequency': min_frequency,
          'do_lower_case': do_lower_case,
      },
      'texts': len(texts),
      'texts_sha256': _texts_sha256(texts),
  }


def is_up_to_date(
    vocab_path: str,
    texts: Iterable[str],
    vocab_size: int,
    min_frequency: int = 2,
    do_lower_case: bool = True,
) -> bool:
  """Whether `vocab_path` is exactly what `train_vocab` would write for these arguments.

  True only for an unedited file this trainer wrote from the same titles and
  settings with the current builder: a caller may then reuse it instead of
  rebuilding. A vocab from an older builder (such as the hash-ordered one
  before v2), from other data, or from elsewhere gives False.
  """
  if not os.path.isfile(vocab_path):
    return False
  own = _own_unchanged_vocab(vocab_path)
  if own is None:
    return False
  expected = _manifest(list(texts), vocab_size, min_frequency, do_lower_case)
  return all(own.get(k) == expected[k] for k in _INPUTS)


def train_vocab(
    texts: Iterable[str],
    vocab_size: int,
    out_path: str,
    min_frequency: int = 2,
    do_lower_case: bool = True,
    overwrite: bool = False,
) -> int:
  """Builds a BERT WordPiece vocab from `texts` and writes `out_path` (`vocab.txt`).

  The file is a deterministic function of the texts (in order) and the
  settings: see `build_vocab`. Beside it goes `out_path + '.manifest.json'`
  (builder, settings, digests of the text and of the vocab), which is how a
  later call knows the file is its own.

  An existing `out_path` is replaced only when this trainer wrote it (its
  manifest matches the file's bytes): with the same text and settings the
  new file is byte-identical, so rewriting it is harmless; with other text or
  settings it would silently change every token id of the models trained on
  it, so that needs `overwrite=True`, as does any file with no (or a
  mismatching) manifest.

  Returns:
    The number of tokens written.

  Raises:
    VocabExistsError: `out_path` exists and may not be replaced (see above).
  """
  texts = list(texts)
  manifest = _manifest(texts, vocab_size, min_frequency, do_lower_case)
  if os.path.isdir(out_path):
    raise VocabExistsError(f'{out_path}: is a folder; expected the path of a vocab.txt file')
  if os.path.lexists(out_path) and not overwrite:
    own = _own_unchanged_vocab(out_path)
    if own is None:
      raise VocabExistsError(
          f'{out_path}: already exists and was not written by this trainer (no matching '
          f'{os.path.basename(manifest_path(out_path))}); refusing to replace it: pass '
          '--overwrite to replace it, or choose another --out'
      )
    differ = [name for key, name in _INPUTS.items() if own.get(key) != manifest[key]]
    if differ:
      raise VocabExistsError(
          f'{out_path}: holds a vocab this trainer wrote with different {" and ".join(differ)} '
          f'(recorded in {manifest_path(out_path)}); replacing it would change the token ids of '
          'models trained on it: pass --overwrite to replace it, or choose another --out'
      )
  tokens = build_vocab(count_words(texts, do_lower_case), vocab_size, min_frequency)
  text = '\n'.join(tokens) + '\n'
  _write_atomically(out_path, text)
  manifest['vocab_sha256'] = hashlib.sha256(text.encode('utf-8')).hexdigest()
  manifest['tokens'] = len(tokens)
  _write_atomically(manifest_path(out_path), json.dumps(manifest, indent=1, sort_keys=True) + '\n')
  return len(tokens)


def define_flags() -> dict[str, flags.FlagHolder]:
  """The command's flags (defined when the command runs, not on import)."""
  return {
      'data_dir': flags.DEFINE_string(
          'data_dir', None, 'Folder with the product1m_{split}_ossurl_v2.txt annotation files.'
      ),
      'out': flags.DEFINE_string('out', None, 'The vocab.txt to write.'),
      'vocab_size': flags.DEFINE_integer(
          'vocab_size', 2000, 'Largest vocab wanted (every character seen is kept).'
      ),
      'min_frequency': flags.DEFINE_integer(
          'min_frequency', 2, 'A merged WordPiece piece must occur this often.'
      ),
      # The config's default (data.vocab_splits): the splits a user has before any query.
      'splits': flags.DEFINE_list(
          'splits',
          vocab_splits(config_lib.data_config()),
          'Splits whose titles to use. Query splits (dev, test) make the vocab transductive.',
      ),
      'overwrite': flags.DEFINE_bool(
          'overwrite',
          False,
          'Replace an existing --out that this trainer did not write from the same titles '
          'and settings.',
      ),
  }


def main(args: dict[str, flags.FlagHolder], words: list[str]) -> int:
  """`train`: the vocab of the titles of `--data_dir` into `--out`. Returns the exit status: 0,
  or 1 with one `error:` line (another command, or bad input)."""
  if words != ['train']:
    print(f'error: expected the command `train`, got {words}', file=sys.stderr)
    return 1
  data_dir, out = args['data_dir'].value, args['out'].value
  splits = args['splits'].value
  try:
    unknown = sorted(set(splits) - set(formats.SPLITS))
    if unknown:
      raise ValueError(f'--splits: unknown split(s) {unknown}, expected some of {formats.SPLITS}')
    titles = list(iter_titles(data_dir, splits))
    if not titles:
      raise FileNotFoundError(
          f'{data_dir}: no titles: none of '
          f'{[formats.annotation_filename(s) for s in splits]} exists or has a line'
      )
    n = train_vocab(
        titles,
        args['vocab_size'].value,
        out,
        args['min_frequency'].value,
        overwrite=args['overwrite'].value,
    )
  except (FileExistsError, FileNotFoundError, ValueError) as e:  # one clear line, no traceback
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'wrote {out}: {n} tokens from {len(titles)} titles', file=sys.stderr)
  return 0


def console_main() -> None:
  """`python -m capture_jax.data.tokenizer train` and the `capture-tokenizer` console script."""
  args = define_flags()
  flags.mark_flags_as_required(['data_dir', 'out'])
  cli.run(lambda argv: main(args, argv[1:]), accepts_arguments=True)


if __name__ == '__main__':
  console_main()
