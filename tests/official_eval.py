"""A standalone restatement of the official Product1M evaluator.

Source: ``CAPTURE/evaluate_suit.py`` in github.com/zhanxlin/Product1M (the
version after issue #3, 2022-04-20, where the per-label AR terms are summed
with ``+=``; the first release overwrote them with ``=``). This module keeps
its inputs, its arithmetic, its control flow and its output, written as small
functions so tests can run it next to the vectorised
``capture_jax.retrieval.metrics``:

* inputs: ``--GT_dir`` holding ``product1m_gallery_ossurl_v2.txt``,
  ``product1m_test_ossurl_v2.txt`` and ``product1m_dev_ossurl_v2.txt``;
  ``--retrieval_result_dir`` holding ``retrieval_id_list.txt``;
  ``--output_metric_dir`` for ``metric_results.json``;
* output: for each R in (10, 50, 100), the id of every query whose scoring
  raised, then ``topk: R  mAP: <str(float)> `` (two spaces, trailing space);
  only mAP is printed, Prec and mAR go to ``metric_results.json``
  (``{"top10": {"mAP", "Prec", "mAR"}, ...}``, indent 2, fractions);
* arithmetic: plain Python floats, sums left to right starting from int 0.

Deliberate differences, none of which changes a number: files are opened as
UTF-8 (upstream uses the locale's encoding), and the bare ``except:`` is
``except Exception`` (so Ctrl-C still stops it). Do not "fix" anything here:
its purpose is to be the reference the fast implementation is checked against.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

TOPK_LIST = (10, 50, 100)


def _read_lines(path: str) -> list[str]:
  with open(path, encoding='utf-8') as f:
    return f.readlines()


def parse_id_labels(lines: Sequence[str], into: dict[str, dict]) -> dict[str, dict]:
  """``item_id -> {"label": [labels]}``; field 4 split on ``#;#``.

  A line with fewer than five fields raises IndexError, as upstream.
  """
  for line in lines:
    fields = line.strip().split('#####')
    into[fields[0]] = {'label': fields[4].split('#;#')}
  return into


def load_ground_truth(gt_dir: str) -> tuple[dict, dict, dict]:
  """Returns (gallery id -> labels, query id -> labels, label -> gallery ids).

  Test queries are read before dev queries into one dict.
  """
  gallery = parse_id_labels(_read_lines(f'{gt_dir}/product1m_gallery_ossurl_v2.txt'), {})
  queries = parse_id_labels(_read_lines(f'{gt_dir}/product1m_test_ossurl_v2.txt'), {})
  parse_id_labels(_read_lines(f'{gt_dir}/product1m_dev_ossurl_v2.txt'), queries)
  label_ids: dict[str, list[str]] = {}
  for item_id, info in gallery.items():
    label_ids.setdefault(info['label'][0], []).append(item_id)
  return gallery, queries, label_ids


def compute_p(rank_list: Sequence[str], pos_set: list[str], topk: int) -> float:
  """Hits among the first ``topk`` / topk (ZeroDivisionError when topk == 0)."""
  intersect_size = 0
  for i in range(topk):
    if rank_list[i] in pos_set:
      intersect_size += 1
  return float(intersect_size / topk)


def compute_ap(rank_list: Sequence[str], pos_set: list[str], topk: int) -> float:
  """Mean over hits i < topk of hits_so_far / (i + 1); 0 without hits."""
  intersect_size = 0
  ap = 0
  for i in range(topk):
    if rank_list[i] in pos_set:
      intersect_size += 1
      ap += intersect_size / (i + 1)
  if intersect_size == 0:
    return 0
  return ap / intersect_size


def compute_ar(
    rank_list: Sequence[str],
    gt_labels: list[str],
    gallery_label_ids: dict,
    gallery_id_label: dict,
    n: int,
) -> float:
  """Label recall over the first ``n`` ids, expected counts shared evenly."""
  rank_list = rank_list[:n]
  n_distinct = len(set(gt_labels))
  expect: dict[str, int] = {}
  for label in gt_labels:
    expect[label] = expect.get(label, 0) + int(n / len(gt_labels))
  for label in expect:
    expect[label] = min(expect[label], len(gallery_label_ids[label]))
  retrieved: dict[str, int] = {}  # insertion order = first appearance in the list
  for item_id in rank_list:
    label = gallery_id_label[item_id]['label'][0]
    if label in expect:
      retrieved[label] = retrieved.get(label, 0) + 1
  for label in retrieved:
    retrieved[label] = min(retrieved[label], expect[label])
  label_ar = 0
  for label in retrieved:
    label_ar += retrieved[label] / expect[label]
  return label_ar / n_distinct


def evaluate(gt_dir: str, ranked_lines: Sequence[str]) -> tuple[dict, list[str]]:
  """Scores ``retrieval_id_list.txt`` lines; returns (results, printed lines)."""
  return score(*load_ground_truth(gt_dir), ranked_lines)


def score(
    gallery: dict,
    queries: dict,
    label_ids: dict,
    ranked_lines: Sequence[str],
    topk_list: Sequence[int] = TOPK_LIST,
) -> tuple[dict, list[str]]:
  """The evaluation loop on loaded ground truth (see ``load_ground_truth``).

  Returns ``{"top10": {"mAP", "Prec", "mAR"}, ...}`` and the printed lines.
  ``topk_list`` is fixed upstream; tests vary it to reach small-R cases.
  """
  results: dict[str, dict[str, float]] = {}
  printed: list[str] = []
  for topk_temp in topk_list:
    m_ap = 0
    m_p = 0
    m_ar = 0
    cnt = 0
    for each in ranked_lines:
      each_split = each.strip().split(',')
      query_id = each_split[0]
      rank_id_list = each_split[1:]
      pos_set: list[str] = []
      try:
        cnt += 1
        query_labels = queries[query_id]['label']
        for label in query_labels:
          pos_set += label_ids[label]
        topk = min(topk_temp, len(pos_set), len(rank_id_list))
        ap = compute_ap(rank_id_list, pos_set, topk)
        p = compute_p(rank_id_list, pos_set, topk)
        m_ap += ap
        m_p += p
        m_ar += compute_ar(rank_id_list, query_labels, label_ids, gallery, topk_temp)
      except Exception:  # upstream: bare except, prints the id, query counts as 0
        printed.append(query_id)
    m_ap /= cnt
    m_p /= cnt
    m_ar /= cnt
    printed.append('topk: {}  mAP: {} '.format(topk_temp, m_ap))
    results['top{}'.format(topk_temp)] = {'mAP': m_ap, 'Prec': m_p, 'mAR': m_ar}
  return results, printed


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description='Product1M official evaluator (restated)')
  parser.add_argument('--output_metric_dir', type=str, required=True)
  parser.add_argument('--retrieval_result_dir', type=str, required=True)
  parser.add_argument('--GT_dir', type=str, required=True)
  args = parser.parse_args(argv)
  os.makedirs(args.output_metric_dir, exist_ok=True)
  ranked_lines = _read_lines(f'{args.retrieval_result_dir}/retrieval_id_list.txt')
  results, printed = evaluate(args.GT_dir, ranked_lines)
  for line in printed:
    print(line)
  with open(f'{args.output_metric_dir}/metric_results.json', 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=2, ensure_ascii=False)
  return 0


if __name__ == '__main__':
  sys.exit(main())
