"""Synthetic-world calibration: single-modality baselines read straight from a Product1M folder.

A thin layer over the evaluation package, so that the project's baselines are
computed one way only:

* embeddings: `capture_jax.retrieval.baselines` (TF-IDF over titles with idf
  fitted on the gallery; the L2-normalised mean region feature);
* ranking: `capture_jax.retrieval.search.exact_topk` (cosine, ties to the
  lower gallery index);
* metric: the official mAP@R, `capture_jax.retrieval.metrics.evaluate_ranked_lists`.

What this module adds is reading a split straight from a Product1M folder
(annotation file + region features, as `capture_jax.data.formats` reads
them), a random ranking, and the fusion of the two modalities. The numbers
calibrate the synthetic world (both single-modality baselines must be clearly
above random and clearly below perfect) and are the bars a trained model must
clear.

Command line::

    python -m capture_jax.retrieval.calibration --data_dir=DIR [--split=dev]
"""

from __future__ import annotations

import dataclasses
import os
import numpy as np
from absl import flags

from capture_jax import cli
from capture_jax.data import formats
from capture_jax.retrieval import baselines as eval_baselines
from capture_jax.retrieval import metrics
from capture_jax.retrieval import search


@dataclasses.dataclass
class SplitData:
  """What the baselines need from one split, in annotation-file order."""

  item_ids: list[str]
  titles: list[str]
  labels: list[tuple[str, ...]]
  mean_region: np.ndarray  # [N, F] float32, `eval_baselines.mean_region_embedding`


def load_split(
    data_dir: str, split: str, *, max_regions: int = 36, features: str | None = None
) -> SplitData:
  """Reads a split's annotation file and its images' mean-region embeddings.

  Args:
    data_dir: a Product1M folder (official annotation files + `features/`).
    split: 'gallery', 'dev', 'test' or 'train'.
    max_regions: the first `max_regions` regions of each image are averaged.
    features: the region-feature store (default `data_dir/features`).
  """
  path = os.path.join(data_dir, formats.annotation_filename(split))
  anns = [ann for _, ann in formats.read_annotations(path)]
  if not anns:
    raise ValueError(f'{path} holds no annotations')

  with formats.FeatureStore(features or os.path.join(data_dir, 'features')) as store:

    def regions(item_id: str) -> np.ndarray:
      rf, source = store.get(item_id)
      rf, _ = formats.validate_regions(rf, feature_dim=None, max_regions=max_regions, source=source)
      return rf.features

    mean_region = eval_baselines.mean_region_embeddings((regions(a.item_id), None) for a in anns)
  return SplitData(
      [a.item_id for a in anns], [a.title for a in anns], [a.labels for a in anns], mean_region
  )


def _standardised_queries(
    queries: np.ndarray, gallery: np.ndarray, max_block: int = 1 << 24
) -> np.ndarray:
  """Queries divided by the standard deviation over the gallery of their scores.

  For one query q, z_i = (q.g_i - mean_i q.g_i) / std_i(q.g_i). The mean is
  the same for every gallery item, so ranking by a sum of such z-scores over
  modalities is ranking by the dot product of the concatenated
  `q / std(q)` with the concatenated gallery rows. A query whose scores do
  not vary over the gallery carries no ranking information and gets weight 0.
  The [N, chunk] score blocks are kept below `max_block` entries.
  """
  out = np.zeros(queries.shape, np.float32)
  step = max(1, max_block // len(gallery))
  for start in range(0, len(queries), step):
    q = queries[start : start + step]
    std = np.asarray(gallery @ q.T, np.float64).std(axis=0)  # [chunk]
    scale = np.where(std > 1e-6, 1.0 / np.maximum(std, 1e-6), 0.0)
    out[start : start + step] = q * scale[:, None]
  return out


def evaluate_baselines(
    data_dir: str,
    split: str = 'dev',
    r: int = 10,
    max_regions: int = 36,
    *,
    tfidf_max_features: int | None = 8192,
    random_trials: int = 5,
    seed: int = 0,
) -> dict[str, float]:
  """Official mAP@R on a query split against the gallery of:

  * 'random': random rankings (i.i.d. Gaussian embeddings, so each query's
    gallery scores are i.i.d. and its ranking a uniform permutation), mean
    over `random_trials` draws;
  * 'tfidf': TF-IDF over titles;
  * 'mean_region': the mean region feature;
  * 'fusion': the sum of the two cosine similarities, each standardised per
    query over the gallery (raw cosines of non-negative features are all
    close to 1, TF-IDF cosines spread over [0, 1]): what a model that combines
    both modalities should at least reach.

  Every ranking is `search.exact_topk` (top `r`), every number
  `metrics.evaluate_ranked_lists` (a fraction in [0, 1]).
  """
  gal = load_split(data_dir, 'gallery', max_regions=max_regions)
  qry = load_split(data_dir, split, max_regions=max_regions)
  query_labels = {q: list(labels) for q, labels in zip(qry.item_ids, qry.labels)}
  gallery_labels = {g: labels[0] for g, labels in zip(gal.item_ids, gal.labels)}

  def map_at_r(queries: np.ndarray, gallery: np.ndarray, normalize: bool = True) -> float:
    _, indices = search.exact_topk(queries, gallery, r, normalize=normalize)
    ranked = search.indices_to_ranked_lists(qry.item_ids, gal.item_ids, indices)
    return metrics.evaluate_ranked_lists(ranked, query_labels, gallery_labels, ranks=(r,))[
        f'mAP@{r}'
    ]

  rng = np.random.default_rng(seed)
  gaussian = lambda n: rng.standard_normal((n, 64), np.float32)
  draws = [
      map_at_r(gaussian(len(qry.item_ids)), gaussian(len(gal.item_ids)))
      for _ in range(random_trials)
  ]
  out = {'random': float(np.mean(draws))}
  text_q, text_g = eval_baselines.tfidf_embeddings(
      qry.titles, gal.titles, max_features=tfidf_max_features
  )
  out['tfidf'] = map_at_r(text_q, text_g)
  out['mean_region'] = map_at_r(qry.mean_region, gal.mean_region)
  fused_q = np.concatenate(
      [
          _standardised_queries(text_q, text_g),
          _standardised_queries(qry.mean_region, gal.mean_region),
      ],
      axis=1,
  )
  fused_g = np.concatenate([text_g, gal.mean_region], axis=1)
  out['fusion'] = map_at_r(fused_q, fused_g, normalize=False)
  return out


def define_flags() -> dict[str, flags.FlagHolder]:
  """The command's flags (defined when the command runs, not on import)."""
  return {
      'data_dir': flags.DEFINE_string(
          'data_dir', None, 'A Product1M folder (e.g. a synthetic world).'
      ),
      'split': flags.DEFINE_enum('split', 'dev', list(formats.QUERY_SPLITS), 'Query split.'),
      'r': flags.DEFINE_integer('r', 10, 'The R of mAP@R (ranked lists of R items).'),
      'max_regions': flags.DEFINE_integer('max_regions', 36, 'Regions averaged per image.'),
      'tfidf_max_features': flags.DEFINE_integer(
          'tfidf_max_features', 8192, 'TF-IDF vocabulary cap (0: no cap).'
      ),
  }


def main(args: dict[str, flags.FlagHolder]) -> None:
  split, r = args['split'].value, args['r'].value
  res = evaluate_baselines(
      args['data_dir'].value,
      split,
      r,
      args['max_regions'].value,
      tfidf_max_features=args['tfidf_max_features'].value or None,
  )
  for name, v in res.items():
    print(f'{split} mAP@{r} {name:12s} {100 * v:6.2f}')


def console_main() -> None:
  """`python -m capture_jax.retrieval.calibration`."""
  args = define_flags()
  flags.mark_flags_as_required(['data_dir'])
  cli.run(lambda argv: main(args))


if __name__ == '__main__':
  console_main()
