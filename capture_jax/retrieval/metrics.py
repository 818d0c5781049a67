"""The official Product1M retrieval metrics, vectorised over queries.

Ground truth is the annotation files of the official release in one folder
(``product1m_gallery_ossurl_v2.txt`` and ``product1m_dev_ossurl_v2.txt`` and/or
``product1m_test_ossurl_v2.txt``), read by the one annotation reader,
``capture_jax.data.formats.read_annotations``; ranked lists are the official
``retrieval_id_list.txt`` (``query_id,gid_1,...,gid_100`` per line).

The numbers are those of ``CAPTURE/evaluate_suit.py`` in zhanxlin/Product1M
(after the ``label_ap +=`` fix of its issue #3), restated in
``tests/official_eval.py`` (the test oracle). For a query with label list ``L``
(repeats kept) and ranked list ``rank``:

* ``n_pos``: sum over the entries of ``L`` of that label's gallery size;
  ``k = min(R, n_pos, len(rank))``;
* ``Prec@R`` = hits in ``rank[:k]`` / k;
* ``AP@R`` = (sum over hits i in ``rank[:k]`` of hits_so_far / (i + 1)) / hits;
* ``AR@R`` over ``rank[:R]``: per label, expected = occurrences * (R // len(L))
  capped at the label's gallery size, retrieved = count capped at expected;
  sum of retrieved / expected over labels retrieved at least once, divided by
  the number of distinct labels.

Agreement "to every printed digit" means agreement of float64 bits, so the
order of every floating-point addition is the official one: per-query sums
and the means over queries are sequential (``np.cumsum``, never ``np.sum``,
whose pairwise summation rounds differently), and the AR terms are added in
the order in which their labels first appear in the ranked list (the official
code iterates a dict filled in that order).

Where the official script swallows an exception, the query keeps whatever it
had already added (see ``score_queries``): a label absent from the gallery
scores 0 everywhere; a ranked id absent from the gallery among the first R
zeroes AR@R only.

Input the official script takes silently, and what happens here instead
(the command's choices; ``--strict`` turns every warning into a refusal):

* a ranked query id absent from the ground truth: the official script prints
  it and scores it 0 in the means; the command does the same and warns with
  the count and the first ids and lines. The library (``score_queries``)
  refuses it unless ``unknown_queries='zero'``.
* a ranked list longer than 100 ids: the official script ignores the ids after
  the 100th (no R reaches them); the command does the same and warns.
* a gallery id that appears twice in one ranked list: the official script
  counts each copy as a hit, which inflates Prec and AP; ``read_ranked_lists``
  refuses the file, naming the line and the id.
* a ranked id absent from the gallery: a miss, as upstream, with a warning.
* a blank line in ``retrieval_id_list.txt``: the official script scores it as
  one more zero query; refused, naming the line. (Blank lines in annotation
  files are skipped: the official script crashes on them, so no official
  number depends on them; see ``formats.read_annotations``.)
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from absl import flags
import numpy as np

from capture_jax import cli
from capture_jax import storage
from capture_jax.data import formats

DEFAULT_RANKS: tuple[int, ...] = (10, 50, 100)
GALLERY_FILE = formats.annotation_filename('gallery')
DEV_FILE = formats.annotation_filename('dev')
TEST_FILE = formats.annotation_filename('test')
RANKED_FILE = 'retrieval_id_list.txt'
MAX_RANKED = 100
# How many example ids a warning or an error names.
_EXAMPLES = 5


# ----------------------------------------------------------------------------
# Reading and writing the official files.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GroundTruth:
  """Labels of the queries and of the gallery.

  Attributes:
    query_labels: query id -> label list, repeats kept, file order.
    gallery_labels: gallery id -> its (first) label.
    titles: item id -> title, for queries and gallery items.
    query_files: the query annotation files read (for messages).
  """

  query_labels: dict[str, list[str]]
  gallery_labels: dict[str, str]
  titles: dict[str, str]
  query_files: tuple[str, ...] = ()


def read_annotations(path: str | Path) -> list[formats.Annotation]:
  """The samples of an annotation file: ``formats.read_annotations``, as a list.

  A convenience for callers that need no line numbers; the parsing, and what
  is accepted or refused (BOM, blank lines, encoding), is that of the one
  annotation reader in ``capture_jax.data.formats``.
  """
  return [a for _, a in formats.read_annotations(str(path))]


def read_ground_truth(
    gt_dir: str | Path,
    split: str | None = None,
    *,
    counter: formats.BadInputCounter | None = None,
) -> GroundTruth:
  """Reads the gallery and the query annotations from one folder.

  Args:
    gt_dir: folder with the official ``product1m_{split}_ossurl_v2.txt`` files.
    split: 'dev' or 'test' reads the gallery and that query file only (the
      other may be absent); None reads the gallery, test and dev, all three
      required, as the official script does.
    counter: as in ``formats.read_annotations``: raise on the first bad line
      (default), or skip and count bad lines (``BadInputCounter(True)``, as a
      ``skip_bad`` build did).

  Returns:
    The labels. With ``split=None`` dev and test queries are looked up
    together; as in the official script the test file is read first and the
    dev file second, so on a query id in both the dev line wins. A gallery
    line with several labels keeps its first one.

  Raises:
    FileNotFoundError: a needed file is missing (all missing ones are named).
    ValueError: the gallery or the requested query split holds no sample.
    formats.BadInputError: a bad line (file and line named).
  """
  if split is not None and split not in formats.QUERY_SPLITS:
    raise ValueError(f'split must be one of {formats.QUERY_SPLITS} or None, got {split!r}')
  gt_dir = Path(gt_dir)
  query_names = (TEST_FILE, DEV_FILE) if split is None else (formats.annotation_filename(split),)
  paths = {name: gt_dir / name for name in (GALLERY_FILE, *query_names)}
  missing = [str(p) for p in paths.values() if not p.is_file()]
  if missing:
    needed = ', '.join(paths)
    raise FileNotFoundError(
        f'ground-truth folder {gt_dir} must hold {needed}'
        + (' (an empty file is fine for an unused split)' if split is None else '')
        + '; missing: '
        + ', '.join(missing)
    )
  titles: dict[str, str] = {}
  gallery_labels: dict[str, str] = {}
  for _, a in formats.read_annotations(str(paths[GALLERY_FILE]), counter=counter):
    gallery_labels[a.item_id] = a.labels[0]
    titles[a.item_id] = a.title
  if not gallery_labels:
    raise ValueError(f'the gallery file {paths[GALLERY_FILE]} holds no sample')
  query_labels: dict[str, list[str]] = {}
  for name in query_names:
    for _, a in formats.read_annotations(str(paths[name]), counter=counter):
      query_labels[a.item_id] = list(a.labels)
      titles[a.item_id] = a.title
  if split is not None and not query_labels:
    raise ValueError(f'the {split} query file {paths[query_names[0]]} holds no sample')
  return GroundTruth(
      query_labels, gallery_labels, titles, tuple(str(paths[n]) for n in query_names)
  )


def read_ranked_lists(path: str | Path) -> dict[str, list[str]]:
  """Reads ``retrieval_id_list.txt`` into query id -> ranked gallery ids.

  File order is kept (the means are sums in that order), so the query at
  position i is on line i + 1. A UTF-8 byte-order mark is dropped. Refused,
  naming the file and line (the official script would score these silently,
  never as meant):

  * a blank line (it would be one more zero query);
  * an empty id (``q,,g`` or a trailing comma);
  * a repeated query id (it would be scored twice);
  * a gallery id repeated within a list (each copy would count as a hit).

  Raises:
    formats.BadInputError (a ValueError): as above, or a line that is not
      UTF-8.
  """
  path = storage.as_path(path)
  ranked: dict[str, list[str]] = {}
  with path.open('rb') as f:
    for lineno, raw in enumerate(f, start=1):
      line = formats.decode_line(raw, path=str(path), lineno=lineno).strip()
      where = f'{path}:{lineno}'
      parts = line.split(',')
      if not parts[0]:
        raise formats.BadInputError(
            'malformed_line',
            f'{where}: malformed ranked-list line (no query id; a blank line would count as '
            f'one more query scoring 0): {line[:80]!r}',
        )
      if any(not p for p in parts[1:]):
        raise formats.BadInputError(
            'malformed_line',
            f'{where}: malformed ranked-list line (empty gallery id): {line[:80]!r}',
        )
      if parts[0] in ranked:
        raise formats.BadInputError('duplicate_id', f'{where}: query id {parts[0]!r} appears twice')
      ids = parts[1:]
      if len(set(ids)) != len(ids):
        first: dict[str, int] = {}
        for pos, g in enumerate(ids, start=1):
          if g in first:
            raise formats.BadInputError(
                'duplicate_id',
                f'{where}: query {parts[0]!r} ranks gallery id {g!r} twice (positions '
                f'{first[g]} and {pos}); each copy would count as a hit, expected distinct ids',
            )
          first[g] = pos
      ranked[parts[0]] = ids
  return ranked


def check_ranked_lists(ranked: Mapping[str, Sequence[str]], gt: GroundTruth) -> list[str]:
  """What the official script would take silently; one message per problem.

  Each message gives a count and the first few ids with their lines (query i
  of ``ranked`` is on line i + 1 of its file, see ``read_ranked_lists``):
  query ids absent from the ground truth, lists longer than 100 ids, ranked
  ids absent from the gallery. Nothing here changes a number the official
  script would compute from the same files.
  """
  messages = []
  unknown = [(i + 1, q) for i, q in enumerate(ranked) if q not in gt.query_labels]
  if unknown:
    files = ', '.join(Path(f).name for f in gt.query_files) or 'the query annotations'
    messages.append(
        f'{len(unknown)} of {len(ranked)} query id(s) are absent from {files}, e.g. '
        + ', '.join(f'{q!r} (line {n})' for n, q in unknown[:_EXAMPLES])
        + '; each scores 0 and counts in the means, as the official evaluator does'
    )
  long = [
      (i + 1, q, len(ids)) for i, (q, ids) in enumerate(ranked.items()) if len(ids) > MAX_RANKED
  ]
  if long:
    messages.append(
        f'{len(long)} ranked list(s) hold more than {MAX_RANKED} ids, e.g. '
        + ', '.join(f'{q!r} ({n} ids, line {line})' for line, q, n in long[:_EXAMPLES])
        + f'; ids after the {MAX_RANKED}th are ignored, as the official evaluator does'
    )
  n_unknown = sum(g not in gt.gallery_labels for ids in ranked.values() for g in ids[:MAX_RANKED])
  if n_unknown:
    messages.append(
        f'{n_unknown} ranked id(s) are not gallery ids; as upstream they count as misses and '
        'zero AR@R where they fall in the first R'
    )
  return messages


def write_ranked_lists(path: storage.PathLike, ranked: Mapping[str, Sequence[str]]) -> None:
  """Writes ``query_id,gid_1,...`` lines (at most 100 distinct ids each), in dict order."""
  lines = []
  for qid, ids in ranked.items():
    ids = [str(i) for i in ids]
    if len(ids) > MAX_RANKED:
      raise ValueError(
          f'query {qid!r}: {len(ids)} ranked ids, the format allows at most {MAX_RANKED}'
      )
    if len(set(ids)) != len(ids):
      raise ValueError(f'query {qid!r}: a gallery id is ranked twice; expected distinct ids')
    for item in [str(qid), *ids]:
      if not item or ',' in item or '\n' in item or item != item.strip():
        raise ValueError(
            f'query {qid!r}: id {item!r} cannot be written '
            '(empty, or holds a comma, newline or edge space)'
        )
    lines.append(','.join([str(qid), *ids]) + '\n')
  storage.write_text(path, ''.join(lines))


# ----------------------------------------------------------------------------
# Scoring.
# ----------------------------------------------------------------------------

_PAD = -1  # padding after the end of a ranked list
_UNKNOWN = -2  # a ranked id that is not in the gallery
_NO_LABEL = -3  # padding of a query's distinct-label table


def _seq_sum(x: np.ndarray, axis: int = -1) -> np.ndarray:
  """Left-to-right float64 sum along ``axis`` (the official loop's rounding)."""
  if x.shape[axis] == 0:
    return np.zeros(np.delete(x.shape, axis), np.float64)
  return np.take(np.cumsum(x, axis=axis, dtype=np.float64), -1, axis=axis)


@dataclasses.dataclass(frozen=True)
class _Encoded:
  """Ranked lists and labels as integer arrays.

  Q queries, P = max rank, J = most distinct labels of a query.
  """

  rank_labels: np.ndarray  # [Q, P] int: label of each ranked id, or _PAD/_UNKNOWN
  rank_len: np.ndarray  # [Q] int: list length, capped at P
  ulabels: np.ndarray  # [Q, J] int: distinct query labels, _NO_LABEL padded
  uocc: np.ndarray  # [Q, J] int: occurrences of each in L
  ugallery: np.ndarray  # [Q, J] int: gallery size of each
  n_labels: np.ndarray  # [Q] int: len(L), repeats counted
  n_distinct: np.ndarray  # [Q] int: distinct labels
  n_pos: np.ndarray  # [Q] int: sum over L of gallery sizes
  label_missing: np.ndarray  # [Q] bool: some label of L has no gallery item


def _encode(
    ranked: Mapping[str, Sequence[str]],
    query_labels: Mapping[str, Sequence[str]],
    gallery_labels: Mapping[str, str],
    max_rank: int,
) -> _Encoded:
  label_index: dict[str, int] = {}
  gallery_label_int = {
      g: label_index.setdefault(lab, len(label_index)) for g, lab in gallery_labels.items()
  }
  gallery_size = np.bincount(
      np.fromiter(gallery_label_int.values(), np.int64), minlength=len(label_index)
  )
  q = len(ranked)
  rank_labels = np.full((q, max_rank), _PAD, np.int64)
  rank_len = np.zeros(q, np.int64)
  per_query = []
  for row, (qid, ids) in enumerate(ranked.items()):
    ids = list(ids)[:max_rank]
    rank_len[row] = len(ids)
    rank_labels[row, : len(ids)] = [gallery_label_int.get(g, _UNKNOWN) for g in ids]
    # An unknown query (allowed by `unknown_queries='zero'`) has no label; it
    # is marked missing below and scores 0, as upstream's KeyError did.
    labels = list(query_labels.get(qid, ()))
    distinct = list(dict.fromkeys(labels))
    per_query.append((labels, distinct))
  n_j = max([len(d) for _, d in per_query] + [1])
  ulabels = np.full((q, n_j), _NO_LABEL, np.int64)
  uocc = np.zeros((q, n_j), np.int64)
  ugallery = np.zeros((q, n_j), np.int64)
  n_labels = np.zeros(q, np.int64)
  n_distinct = np.zeros(q, np.int64)
  n_pos = np.zeros(q, np.int64)
  label_missing = np.zeros(q, bool)
  for row, (labels, distinct) in enumerate(per_query):
    n_labels[row] = len(labels)
    n_distinct[row] = len(distinct)
    label_missing[row] = not labels or any(lab not in label_index for lab in distinct)
    for j, lab in enumerate(distinct):
      ulabels[row, j] = label_index.get(lab, _NO_LABEL)
      uocc[row, j] = labels.count(lab)
      ugallery[row, j] = gallery_size[label_index[lab]] if lab in label_index else 0
    n_pos[row] = int((uocc[row] * ugallery[row]).sum())
  return _Encoded(
      rank_labels, rank_len, ulabels, uocc, ugallery, n_labels, n_distinct, n_pos, label_missing
  )


def _ap_prec(enc: _Encoded, hit: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
  """AP@r and Prec@r per query, [Q] each; ``hit`` is [Q, P] bool."""
  k = np.minimum(np.minimum(r, enc.n_pos), enc.rank_len)  # [Q]
  pos = np.arange(hit.shape[1])
  in_k = hit & (pos[None, :] < k[:, None])  # [Q, P]
  hits_so_far = np.cumsum(in_k, axis=1)
  # Non-hits contribute exact zeros, so the sequential sum equals the
  # official running sum over hits only.
  terms = np.where(in_k, hits_so_far / (pos[None, :] + 1), 0.0)
  n_hits = hits_so_far[:, -1] if hit.shape[1] else np.zeros(len(k), np.int64)
  ap = np.where(n_hits > 0, _seq_sum(terms) / np.maximum(n_hits, 1), 0.0)
  # k == 0 (an empty list) raised ZeroDivisionError upstream: a zero query.
  prec = np.where(k > 0, n_hits / np.maximum(k, 1), 0.0)
  return ap, prec


def _ar(enc: _Encoded, r: int) -> tuple[np.ndarray, np.ndarray]:
  """AR@r per query [Q], and [Q] bool where the official AR raised."""
  window = enc.rank_labels[:, :r]  # [Q, r]
  match = window[:, :, None] == enc.ulabels[:, None, :]  # [Q, r, J]
  count = match.sum(axis=1)  # [Q, J]
  share = r // np.maximum(enc.n_labels, 1)  # [Q]
  expected = np.minimum(enc.uocc * share[:, None], enc.ugallery)  # [Q, J]
  retrieved = np.minimum(count, expected)
  seen = count > 0
  # Upstream: a ranked id missing from the gallery (KeyError), or a label
  # seen with expected 0 (ZeroDivisionError; needs len(L) > R) abort AR.
  failed = (window == _UNKNOWN).any(axis=1) | (seen & (expected == 0)).any(axis=1)
  ratio = np.where(seen, retrieved / np.maximum(expected, 1), 0.0)
  # Add terms in order of the label's first appearance in the list.
  first = np.where(seen, match.argmax(axis=1), r + np.arange(match.shape[2])[None, :])
  ordered = np.take_along_axis(ratio, np.argsort(first, axis=1, kind='stable'), axis=1)
  ar = _seq_sum(ordered) / np.maximum(enc.n_distinct, 1)
  return np.where(failed, 0.0, ar), failed


def _check_inputs(
    ranked: Mapping[str, Sequence[str]],
    query_labels: Mapping[str, Sequence[str]],
    gallery_labels: Mapping[str, str],
    ranks: Sequence[int],
    unknown_queries: str,
) -> None:
  if unknown_queries not in ('error', 'zero'):
    raise ValueError(f"unknown_queries must be 'error' or 'zero', got {unknown_queries!r}")
  if not gallery_labels:
    raise ValueError('the gallery is empty: no gallery labels were given')
  if not ranked:
    raise ValueError('no ranked lists were given')
  if not ranks or any(int(r) < 1 for r in ranks):
    raise ValueError(f'ranks must be positive integers, got {tuple(ranks)}')
  missing = [q for q in ranked if q not in query_labels]
  if missing and unknown_queries == 'error':
    raise KeyError(
        f'{len(missing)} query id(s) of the ranked lists are absent from the '
        f'annotations (dev and test files), e.g. {missing[:_EXAMPLES]}'
    )


def score_queries(
    ranked: Mapping[str, Sequence[str]],
    query_labels: Mapping[str, Sequence[str]],
    gallery_labels: Mapping[str, str],
    ranks: Sequence[int] = DEFAULT_RANKS,
    *,
    unknown_queries: str = 'error',
) -> dict[str, np.ndarray]:
  """Per-query metrics, in the order of ``ranked``.

  Args:
    ranked: query id -> ranked gallery ids (the first max(ranks) are used).
    query_labels: query id -> label list (repeats kept).
    gallery_labels: gallery id -> label.
    ranks: the cut-offs R.
    unknown_queries: a query id absent from ``query_labels`` raises KeyError
      ('error'), or scores 0 and counts in the means ('zero', the official
      script's behaviour).

  Returns:
    ``{"AP@R", "Prec@R", "AR@R": float64 [Q]}`` for each R, and
    ``"failed@R": bool [Q]``: the queries for which the official script
    caught an exception at R (and printed the query id).
  """
  _check_inputs(ranked, query_labels, gallery_labels, ranks, unknown_queries)
  enc = _encode(ranked, query_labels, gallery_labels, max(int(r) for r in ranks))
  hit = (enc.rank_labels[:, :, None] == enc.ulabels[:, None, :]).any(axis=2)  # [Q, P]
  out: dict[str, np.ndarray] = {}
  for r in ranks:
    r = int(r)
    ap, prec = _ap_prec(enc, hit, r)
    ar, ar_failed = _ar(enc, r)
    # A label absent from the gallery raised before anything was added.
    zero = enc.label_missing
    out[f'AP@{r}'] = np.where(zero, 0.0, ap)
    out[f'Prec@{r}'] = np.where(zero, 0.0, prec)
    out[f'AR@{r}'] = np.where(zero | (enc.rank_len == 0), 0.0, ar)
    out[f'failed@{r}'] = zero | ar_failed | (enc.rank_len == 0)
  return out


def mean_metrics(
    per_query: Mapping[str, np.ndarray], ranks: Sequence[int] = DEFAULT_RANKS
) -> dict[str, float]:
  """Means over queries, summed left to right: ``{"mAP@R", "Prec@R", "mAR@R"}``."""
  out = {}
  for r in ranks:
    for name, key in (('mAP', 'AP'), ('Prec', 'Prec'), ('mAR', 'AR')):
      values = per_query[f'{key}@{r}']
      out[f'{name}@{r}'] = float(_seq_sum(values)) / len(values)
  return out


def evaluate_ranked_lists(
    ranked: Mapping[str, Sequence[str]],
    query_labels: Mapping[str, Sequence[str]],
    gallery_labels: Mapping[str, str],
    ranks: Sequence[int] = DEFAULT_RANKS,
) -> dict[str, float]:
  """The official mAP@R, Prec@R and mAR@R of ranked lists: ``mean_metrics`` of
  ``score_queries`` (the arguments are its own; a query id absent from ``query_labels`` is
  refused: the official script's leniency is ``score_queries(..., unknown_queries='zero')``).

  Returns:
    ``{"mAP@10": ..., "Prec@10": ..., "mAR@10": ..., ...}`` as fractions in
    [0, 1], bit-identical to the official evaluator's.

  Raises:
    KeyError: a query id is absent from ``query_labels``.
    ValueError: the gallery or the ranked lists are empty.
  """
  per_query = score_queries(ranked, query_labels, gallery_labels, ranks)
  return mean_metrics(per_query, ranks)


def official_lines(
    ranked: Mapping[str, Sequence[str]],
    per_query: Mapping[str, np.ndarray],
    metrics: Mapping[str, float],
    ranks: Sequence[int] = DEFAULT_RANKS,
) -> list[str]:
  """The lines the official script prints: per R, the ids of queries it
  caught an exception for, then ``topk: R  mAP: <repr> ``."""
  qids = list(ranked)
  lines = []
  for r in ranks:
    lines += [qids[i] for i in np.flatnonzero(per_query[f'failed@{r}'])]
    lines.append(f'topk: {r}  mAP: {metrics[f"mAP@{r}"]} ')
  return lines


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------


def define_flags() -> dict[str, flags.FlagHolder]:
  """The command's flags (defined when the command runs, not on import)."""
  return {
      'gt_dir': flags.DEFINE_string(
          'gt_dir',
          None,
          f'Folder with {GALLERY_FILE} and the query files ({DEV_FILE}, {TEST_FILE}).',
      ),
      'ranked': flags.DEFINE_string('ranked', None, f'A {RANKED_FILE}.'),
      'split': flags.DEFINE_enum(
          'split',
          None,
          list(formats.QUERY_SPLITS),
          'Read only the gallery and this query file; default: dev and test together, all '
          'three files required, as the official evaluator does.',
      ),
      'strict': flags.DEFINE_bool(
          'strict',
          False,
          'Refuse (exit 1) what is otherwise a warning: unknown query ids, lists over '
          f'{MAX_RANKED} ids, ranked ids absent from the gallery.',
      ),
      'output_json': flags.DEFINE_string('output_json', None, 'Write the metrics here.'),
  }


def run(
    gt_dir: str,
    ranked_path: str,
    *,
    split: str | None = None,
    strict: bool = False,
    output_json: str | None = None,
) -> int:
  """Scores a ranked-list file; prints the official lines and a table.

  Returns:
    The exit status: 0, or 1 when the input is refused (the reason goes to
    stderr as one ``error:`` line naming the file and line or id, no
    traceback).
  """
  try:
    gt = read_ground_truth(gt_dir, split)
    ranked = read_ranked_lists(ranked_path)
    if not ranked:
      raise ValueError(f'{ranked_path} holds no ranked list')
    warnings = check_ranked_lists(ranked, gt)
    if warnings and strict:
      raise ValueError(f'{ranked_path} refused (--strict): ' + '; '.join(warnings))
    per_query = score_queries(ranked, gt.query_labels, gt.gallery_labels, unknown_queries='zero')
  except (OSError, ValueError, KeyError) as err:  # BadInputError is a ValueError
    print(f'error: {err}', file=sys.stderr)
    return 1
  for message in warnings:
    print(f'warning: {ranked_path}: {message}', file=sys.stderr)
  metrics = mean_metrics(per_query)
  print('\n'.join(official_lines(ranked, per_query, metrics)))
  for r in DEFAULT_RANKS:
    print(
        f'R={r:<3d} mAP {100 * metrics[f"mAP@{r}"]:6.2f}  '
        f'Prec {100 * metrics[f"Prec@{r}"]:6.2f}  mAR {100 * metrics[f"mAR@{r}"]:6.2f}'
    )
  if output_json:
    storage.write_text(output_json, json.dumps(metrics, indent=2) + '\n')
  return 0


def main(args: dict[str, flags.FlagHolder]) -> int:
  """Returns the exit status: 0, or 1 when the input is refused (see ``run``)."""
  return run(
      args['gt_dir'].value,
      args['ranked'].value,
      split=args['split'].value,
      strict=args['strict'].value,
      output_json=args['output_json'].value,
  )


def console_main() -> None:
  """``python -m capture_jax.retrieval.metrics --gt_dir DIR --ranked FILE`` and
  ``capture-metrics``."""
  args = define_flags()
  flags.mark_flags_as_required(['gt_dir', 'ranked'])
  cli.run(lambda argv: main(args))


if __name__ == '__main__':
  console_main()
