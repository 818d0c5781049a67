"""The official Product1M retrieval metrics, vectorised over queries.

Ground truth is the three annotation files of the official release
(``product1m_gallery_ossurl_v2.txt``, ``product1m_dev_ossurl_v2.txt``,
``product1m_test_ossurl_v2.txt``) in one folder; ranked lists are the official
``retrieval_id_list.txt`` (``query_id,gid_1,...,gid_100`` per line).

The numbers are those of ``CAPTURE/evaluate_suit.py`` in zhanxlin/Product1M
(after the ``label_ap +=`` fix of its issue #3), restated in
``capture_jax/evaluation/official_eval.py``. For a query with label list ``L``
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
had already added (see ``_score_queries``): a label absent from the gallery
scores 0 everywhere; a ranked id absent from the gallery among the first R
zeroes AR@R only. Unlike the official script, a query id absent from the
annotations is an error here, not a silent zero.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

DEFAULT_RANKS: tuple[int, ...] = (10, 50, 100)
GALLERY_FILE = 'product1m_gallery_ossurl_v2.txt'
DEV_FILE = 'product1m_dev_ossurl_v2.txt'
TEST_FILE = 'product1m_test_ossurl_v2.txt'
RANKED_FILE = 'retrieval_id_list.txt'
FIELD_SEP = '#####'
LABEL_SEP = '#;#'
MAX_RANKED = 100


# ----------------------------------------------------------------------------
# Reading and writing the official files.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Annotation:
  """One line of an annotation file."""

  item_id: str
  title: str
  labels: list[str]


@dataclasses.dataclass(frozen=True)
class GroundTruth:
  """Labels of the queries (dev and test together) and of the gallery.

  Attributes:
    query_labels: query id -> label list, repeats kept, file order.
    gallery_labels: gallery id -> its (first) label.
    titles: item id -> title, for queries and gallery items.
  """

  query_labels: dict[str, list[str]]
  gallery_labels: dict[str, str]
  titles: dict[str, str]


def read_annotations(path: str | Path) -> list[Annotation]:
  """Parses ``item_id#####title#####url#####url#####l1#;#l2...`` lines.

  Like the official script, each line is stripped, split on ``#####`` and
  field 4 is split on ``#;#`` (so a label may repeat, and fields after the
  fifth are ignored). A line with fewer than five fields, an empty id, or a
  blank line is an error naming the file and the line.
  """
  path = Path(path)
  out = []
  with path.open(encoding='utf-8') as f:
    for lineno, line in enumerate(f, start=1):
      fields = line.strip().split(FIELD_SEP)
      if len(fields) < 5 or not fields[0]:
        raise ValueError(
            f'{path}:{lineno}: malformed annotation line, expected '
            f"'item_id{FIELD_SEP}title{FIELD_SEP}url{FIELD_SEP}url"
            f"{FIELD_SEP}labels' (5 fields), got {len(fields)} field(s): "
            f'{line.strip()[:80]!r}'
        )
      out.append(Annotation(fields[0], fields[1], fields[4].split(LABEL_SEP)))
  return out


def read_ground_truth(gt_dir: str | Path) -> GroundTruth:
  """Reads the three official annotation files from one folder.

  Dev and test queries are looked up together; as in the official script the
  test file is read first and the dev file second, so on a repeated query id
  the dev line wins. A gallery line with several labels keeps its first one;
  a repeated gallery id keeps its last line (dict semantics, as upstream).
  """
  gt_dir = Path(gt_dir)
  paths = {name: gt_dir / name for name in (GALLERY_FILE, TEST_FILE, DEV_FILE)}
  missing = [str(p) for p in paths.values() if not p.is_file()]
  if missing:
    raise FileNotFoundError(
        f'ground-truth folder {gt_dir} must hold {GALLERY_FILE}, {DEV_FILE} and '
        f'{TEST_FILE} (an empty file is fine for an unused split); missing: ' + ', '.join(missing)
    )
  titles: dict[str, str] = {}
  gallery_labels: dict[str, str] = {}
  for a in read_annotations(paths[GALLERY_FILE]):
    gallery_labels[a.item_id] = a.labels[0]
    titles[a.item_id] = a.title
  query_labels: dict[str, list[str]] = {}
  for name in (TEST_FILE, DEV_FILE):
    for a in read_annotations(paths[name]):
      query_labels[a.item_id] = a.labels
      titles[a.item_id] = a.title
  return GroundTruth(query_labels, gallery_labels, titles)


def read_ranked_lists(path: str | Path) -> dict[str, list[str]]:
  """Reads ``retrieval_id_list.txt`` into query id -> ranked gallery ids.

  File order is kept (the means are sums in that order). A blank line, an
  empty id (``q,,g`` or a trailing comma) or a repeated query id is an error
  naming the file and line: the official script would score a blank line as
  a zero query and a repeated query twice, which is never what was meant.
  """
  path = Path(path)
  ranked: dict[str, list[str]] = {}
  with path.open(encoding='utf-8') as f:
    for lineno, line in enumerate(f, start=1):
      parts = line.strip().split(',')
      if not parts[0]:
        raise ValueError(
            f'{path}:{lineno}: malformed ranked-list line (no query id): {line.strip()[:80]!r}'
        )
      if any(not p for p in parts[1:]):
        raise ValueError(
            f'{path}:{lineno}: malformed ranked-list line (empty gallery id): {line.strip()[:80]!r}'
        )
      if parts[0] in ranked:
        raise ValueError(f'{path}:{lineno}: query id {parts[0]!r} appears twice')
      ranked[parts[0]] = parts[1:]
  return ranked


def write_ranked_lists(path: str | Path, ranked: Mapping[str, Sequence[str]]) -> None:
  """Writes ``query_id,gid_1,...`` lines (at most 100 ids each), in dict order."""
  lines = []
  for qid, ids in ranked.items():
    ids = [str(i) for i in ids]
    if len(ids) > MAX_RANKED:
      raise ValueError(
          f'query {qid!r}: {len(ids)} ranked ids, the format allows at most {MAX_RANKED}'
      )
    for item in [str(qid), *ids]:
      if not item or ',' in item or '\n' in item or item != item.strip():
        raise ValueError(
            f'query {qid!r}: id {item!r} cannot be written '
            '(empty, or holds a comma, newline or edge space)'
        )
    lines.append(','.join([str(qid), *ids]) + '\n')
  Path(path).write_text(''.join(lines), encoding='utf-8')


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
    labels = list(query_labels[qid])
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
    label_missing[row] = any(lab not in label_index for lab in distinct)
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
) -> None:
  if not gallery_labels:
    raise ValueError('the gallery is empty: no gallery labels were given')
  if not ranked:
    raise ValueError('no ranked lists were given')
  if not ranks or any(int(r) < 1 for r in ranks):
    raise ValueError(f'ranks must be positive integers, got {tuple(ranks)}')
  missing = [q for q in ranked if q not in query_labels]
  if missing:
    raise KeyError(
        f'{len(missing)} query id(s) of the ranked lists are absent from the '
        f'annotations (dev and test files), e.g. {missing[:5]}'
    )


def score_queries(
    ranked: Mapping[str, Sequence[str]],
    query_labels: Mapping[str, Sequence[str]],
    gallery_labels: Mapping[str, str],
    ranks: Sequence[int] = DEFAULT_RANKS,
) -> dict[str, np.ndarray]:
  """Per-query metrics, in the order of ``ranked``.

  Returns:
    ``{"AP@R", "Prec@R", "AR@R": float64 [Q]}`` for each R, and
    ``"failed@R": bool [Q]``: the queries for which the official script
    caught an exception at R (and printed the query id).
  """
  _check_inputs(ranked, query_labels, gallery_labels, ranks)
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
    ranked: dict[str, list[str]],
    query_labels: dict[str, list[str]],
    gallery_labels: dict[str, str],
    ranks: Sequence[int] = DEFAULT_RANKS,
) -> dict[str, float]:
  """The official mAP@R, Prec@R and mAR@R of ranked lists.

  Args:
    ranked: query id -> ranked gallery ids (up to 100 used), in file order.
    query_labels: query id -> label list (repeats kept).
    gallery_labels: gallery id -> label.
    ranks: the cut-offs R.

  Returns:
    ``{"mAP@10": ..., "Prec@10": ..., "mAR@10": ..., ...}`` as fractions in
    [0, 1], bit-identical to the official evaluator's.

  Raises:
    KeyError: a query id is absent from ``query_labels``.
    ValueError: the gallery or the ranked lists are empty.
  """
  return mean_metrics(score_queries(ranked, query_labels, gallery_labels, ranks), ranks)


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


def main(argv: Sequence[str] | None = None) -> int:
  """CLI: ``python -m capture_jax.evaluation.metrics --gt_dir DIR --ranked FILE``."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument(
      '--gt_dir', required=True, help=f'folder with {GALLERY_FILE}, {DEV_FILE}, {TEST_FILE}'
  )
  parser.add_argument('--ranked', required=True, help=f'a {RANKED_FILE}')
  parser.add_argument('--output_json', default=None, help='write the metrics here')
  args = parser.parse_args(argv)
  gt = read_ground_truth(args.gt_dir)
  ranked = read_ranked_lists(args.ranked)
  unknown = sum(g not in gt.gallery_labels for ids in ranked.values() for g in ids)
  if unknown:
    print(
        f'warning: {unknown} ranked id(s) are not gallery ids; as upstream they '
        'count as misses and zero AR@R where they fall in the first R',
        file=sys.stderr,
    )
  per_query = score_queries(ranked, gt.query_labels, gt.gallery_labels)
  metrics = mean_metrics(per_query)
  print('\n'.join(official_lines(ranked, per_query, metrics)))
  for r in DEFAULT_RANKS:
    print(
        f'R={r:<3d} mAP {100 * metrics[f"mAP@{r}"]:6.2f}  '
        f'Prec {100 * metrics[f"Prec@{r}"]:6.2f}  mAR {100 * metrics[f"mAR@{r}"]:6.2f}'
    )
  if args.output_json:
    import json

    Path(args.output_json).write_text(json.dumps(metrics, indent=2) + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
