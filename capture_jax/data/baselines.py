"""Single-modality retrieval baselines, read straight from a Product1M folder.

* TF-IDF over titles: NFKC-normalised, lower-cased; runs of CJK characters
  give character unigrams and bigrams, runs of Latin letters/digits give
  words; smoothed idf fitted on the gallery; cosine similarity.
* Mean region feature: the cosine similarity of the images' mean region
  features.

Both follow the definitions of `capture_jax.evaluation.baselines` (the
project's reported baselines), re-implemented here so the data checks do not
depend on the evaluation package.

They calibrate the synthetic world (both must be clearly above random and
clearly below perfect) and are the bars a trained model must clear. The
metric here (`map_at_r`) is a small re-implementation of the official mAP@R
for these checks; the project's evaluator is `capture_jax.evaluation`.

Command line::

    python -m capture_jax.data.baselines --data_dir DIR [--split dev]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import os
import re
import unicodedata
from typing import Sequence

import numpy as np

from capture_jax.data import formats

_TOKEN_RE = re.compile(r'([\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+)|([0-9a-z]+)')


def title_terms(title: str) -> list[str]:
  """TF-IDF terms: CJK character unigrams + bigrams, lower-cased Latin/digit words."""
  terms: list[str] = []
  for cjk, word in _TOKEN_RE.findall(unicodedata.normalize('NFKC', title).lower()):
    if word:
      terms.append(word)
    else:
      terms.extend(cjk)
      terms.extend(cjk[i:i + 2] for i in range(len(cjk) - 1))
  return terms


@dataclasses.dataclass
class SplitData:
  """What the baselines need from one split."""
  item_ids: list[str]
  titles: list[str]
  labels: list[tuple[str, ...]]
  mean_features: np.ndarray  # [N, F] mean of the valid region features


def load_split(data_dir: str, split: str, *, max_regions: int = 36,
               features: str | None = None) -> SplitData:
  """Reads a split's annotation file and its images' mean region features."""
  path = os.path.join(data_dir, formats.annotation_filename(split))
  ids, titles, labels, means = [], [], [], []
  with formats.FeatureStore(features or os.path.join(data_dir, 'features')) as store:
    for _, ann in formats.read_annotations(path):
      rf, source = store.get(ann.item_id)
      rf, _ = formats.validate_regions(rf, feature_dim=None, max_regions=max_regions,
                                       source=source)
      ids.append(ann.item_id)
      titles.append(ann.title)
      labels.append(ann.labels)
      means.append(np.asarray(rf.features, np.float32).mean(axis=0))
  return SplitData(ids, titles, labels, np.stack(means))


def tfidf_scores(queries: Sequence[str], gallery: Sequence[str]) -> np.ndarray:
  """[Q, G] cosine similarities of TF-IDF vectors; idf fitted on the gallery,
  `ln((1 + n) / (1 + df)) + 1`; query terms unseen in the gallery are dropped."""
  docs = [collections.Counter(title_terms(t)) for t in [*queries, *gallery]]
  df = collections.Counter(term for d in docs[len(queries):] for term in d)
  vocab = {term: i for i, term in enumerate(df)}
  n = len(gallery)
  idf = np.array([math.log((1 + n) / (1 + df[t])) + 1.0 for t in vocab], np.float32)
  mat = np.zeros((len(docs), len(vocab)), np.float32)
  for row, d in enumerate(docs):
    for term, c in d.items():
      if term in vocab:
        mat[row, vocab[term]] = c
  mat *= idf
  mat /= np.maximum(np.linalg.norm(mat, axis=1, keepdims=True), 1e-12)
  return mat[:len(queries)] @ mat[len(queries):].T


def cosine_scores(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
  """[Q, G] cosine similarities of row vectors."""
  q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
  g = gallery / np.maximum(np.linalg.norm(gallery, axis=1, keepdims=True), 1e-12)
  return q @ g.T


def rank(scores: np.ndarray, top: int = 100) -> np.ndarray:
  """[Q, top] gallery indices by decreasing score (ties: lower index first)."""
  top = min(top, scores.shape[1])
  return np.argsort(-scores, axis=1, kind='stable')[:, :top]


def map_at_r(query_labels: Sequence[Sequence[str]], ranked: np.ndarray,
             gallery_labels: Sequence[Sequence[str]], r: int = 10) -> float:
  """mAP@R exactly as the official Product1M evaluator computes it.

  `pos` = gallery samples whose label is in the query's label list; `n_pos`
  sums the gallery size of each label occurrence (repeats counted);
  `k = min(r, n_pos, len(rank))`; AP sums hits_so_far / (i + 1) over hits in
  the first k and divides by the number of hits.
  """
  gallery_label = [l[0] for l in gallery_labels]
  size = collections.Counter(gallery_label)
  aps = []
  for labels, row in zip(query_labels, ranked):
    wanted = set(labels)
    n_pos = sum(size[l] for l in labels)
    k = min(r, n_pos, len(row))
    hits, total = 0, 0.0
    for i, g in enumerate(row[:k]):
      if gallery_label[g] in wanted:
        hits += 1
        total += hits / (i + 1)
    aps.append(total / hits if hits else 0.0)
  return float(np.mean(aps))


def random_map_at_r(query_labels: Sequence[Sequence[str]],
                    gallery_labels: Sequence[Sequence[str]], r: int = 10,
                    trials: int = 5, seed: int = 0) -> float:
  """Expected mAP@R of random rankings (estimated over a few shuffles)."""
  rng = np.random.default_rng(seed)
  scores = [map_at_r(query_labels, rank(rng.random((len(query_labels), len(gallery_labels)))),
                     gallery_labels, r) for _ in range(trials)]
  return float(np.mean(scores))


def evaluate_baselines(data_dir: str, split: str = 'dev', r: int = 10,
                       max_regions: int = 36) -> dict[str, float]:
  """mAP@R on a query split of: random, TF-IDF, mean region, and their fusion
  (sum of the two cosine similarities: what a model that combines both
  modalities should at least reach)."""
  gal = load_split(data_dir, 'gallery', max_regions=max_regions)
  qry = load_split(data_dir, split, max_regions=max_regions)
  text = tfidf_scores(qry.titles, gal.titles)
  visual = cosine_scores(qry.mean_features, gal.mean_features)
  # Standardise before fusing: raw cosines of non-negative features are all
  # close to 1, TF-IDF cosines spread over [0, 1].
  z = lambda s: (s - s.mean(axis=1, keepdims=True)) / (s.std(axis=1, keepdims=True) + 1e-9)
  out = {'random': random_map_at_r(qry.labels, gal.labels, r)}
  for name, s in (('tfidf', text), ('mean_region', visual), ('fusion', z(text) + z(visual))):
    out[name] = map_at_r(qry.labels, rank(s), gal.labels, r)
  return out


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--data_dir', required=True)
  parser.add_argument('--split', default='dev', choices=formats.QUERY_SPLITS)
  parser.add_argument('--r', type=int, default=10)
  parser.add_argument('--max_regions', type=int, default=36)
  args = parser.parse_args(argv)
  res = evaluate_baselines(args.data_dir, args.split, args.r, args.max_regions)
  for name, v in res.items():
    print(f'{args.split} mAP@{args.r} {name:12s} {100 * v:6.2f}')


if __name__ == '__main__':
  main()
