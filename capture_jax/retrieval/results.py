"""An evaluation's results on disk, built from its `Method` rows.

In the output folder: `retrieval_id_list.txt` (the model in
`eval.query_mode`, the official format), `ranked_lists/{slug}.txt` (every
row), `report.md`, `metrics.json` and `metrics.png` (`report.write_report`),
and `evaluation.json` (what was evaluated, and how long each stage took).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import ml_collections

from capture_jax import instances as instances_lib
from capture_jax import storage
from capture_jax.retrieval import export_format
from capture_jax.retrieval import keys
from capture_jax.retrieval import metrics as metrics_lib
from capture_jax.retrieval import plan as plan_lib
from capture_jax.retrieval import ranking
from capture_jax.retrieval import report as report_lib

EVALUATION_FILE = 'evaluation.json'
Metrics = Mapping[keys.Method, Mapping[str, float]]  # method -> {'mAP@10': fraction, ...}


@dataclasses.dataclass
class EvalResult:
  out_dir: storage.Path
  metrics: dict[str, dict[str, float]]  # method label -> {'mAP@10': fraction, ...}
  table: str  # markdown
  best_query_mode: str
  summary: dict[str, Any]  # what `evaluation.json` holds


@dataclasses.dataclass
class Evaluated:
  """What the stages of an evaluation produced, for its results."""

  plan: plan_lib.EvalPlan
  exports: dict[keys.ExportKey, export_format.Embeddings]
  ranked: dict[keys.Method, ranking.RankedLists]
  metrics: dict[keys.Method, dict[str, float]]
  gt: metrics_lib.GroundTruth
  searcher: ranking.Searcher
  rates: dict[str, float]  # export label -> rows/s of the exports computed now
  quality: dict[str, dict[str, float]]  # proposer -> quality against the sidecar
  seconds: dict[str, float]  # stage -> wall seconds


def main_method(config: ml_collections.ConfigDict, plan: plan_lib.EvalPlan) -> keys.Method:
  """The row of `retrieval_id_list.txt`: the model in `eval.query_mode` (whole without
  instance queries)."""
  mode = config.eval.query_mode
  return plan.model_method(mode if mode in plan.modes else 'whole')


def best_mode(run: Evaluated) -> str:
  """The model's query mode with the best mAP@10 (ties: the first of `plan.modes`)."""
  scores = {m: run.metrics[run.plan.model_method(m)]['mAP@10'] for m in run.plan.modes}
  return max(scores, key=scores.get)


def write_results(
    config: ml_collections.ConfigDict,
    out_dir: storage.Path,
    workdir: storage.Path,
    run: Evaluated,
) -> EvalResult:
  """Ranked lists, `report.md`, `metrics.json`, the plot and `evaluation.json` in `out_dir`."""
  plan, main = run.plan, main_method(config, run.plan)
  storage.makedirs(out_dir / 'ranked_lists')
  metrics_lib.write_ranked_lists(out_dir / metrics_lib.RANKED_FILE, run.ranked[main])
  for method, lists in run.ranked.items():
    metrics_lib.write_ranked_lists(out_dir / 'ranked_lists' / f'{method.slug}.txt', lists)
  gt = run.gt
  listings = {
      main.label: [
          report_lib.build_listing(
              q, gt.query_labels[q], run.ranked[main][q], gt.gallery_labels, gt.titles
          )
          for q in plan.query_ids[: config.eval.num_listings]
      ]
  }
  by_label = {m.label: v for m, v in run.metrics.items()}
  report_lib.write_report(out_dir, by_label, listings, notes=notes(config, workdir, run))
  summary = evaluation_summary(config, workdir, run)
  storage.write_text(
      out_dir / EVALUATION_FILE, json.dumps(summary, indent=2, ensure_ascii=False) + '\n'
  )
  return EvalResult(
      out_dir, by_label, report_lib.metrics_table(by_label), summary['best_query_mode'], summary
  )


def notes(config: ml_collections.ConfigDict, workdir: storage.Path, run: Evaluated) -> list[str]:
  """The lines under the report's title: what was evaluated, and how."""
  e, plan = config.eval, run.plan
  gallery = run.exports[keys.ExportKey('gallery')]
  instances = run.exports.get(plan.headline_instances)
  weights = 'random initialisation' if plan.step is None else f'checkpoint step {plan.step}'
  scores = {m: run.metrics[plan.model_method(m)]['mAP@10'] for m in plan.modes}
  out = [
      f'- Queries: {len(plan.query_ids)} of split `{plan.split}`'
      + (f' ({len(instances)} product instances)' if instances is not None else '')
      + f'; gallery: {len(gallery)} items. Ground truth: `{config.data.data_dir}`.',
      f'- CAPTURE: {weights} of `{workdir}`; embedding `{e.embedding}` ({gallery.dimension}-d).',
      '- Search: '
      + (
          'exact top-100 by cosine.'
          if e.search == 'exact'
          else f'FAISS {e.faiss_index} top-100; recall@100 against exact search: '
          + ', '.join(f'{k} {v:.4f}' for k, v in run.searcher.recall.items())
          + '.'
      ),
      '- Query modes: `whole` = the whole-sample query; `instances` = one query per product instance '
      "(caption + that instance's regions), lists merged round-robin with de-duplication; `both` = the "
      'instance lists, then the whole-sample list, in every round.',
      f'- Best query mode on mAP@10: **{best_mode(run)}** ('
      + ', '.join(f'{m} {100 * v:.2f}' for m, v in scores.items())
      + ').',
      f'- `{metrics_lib.RANKED_FILE}`: {main_method(config, plan).label} '
      f"(eval.query_mode={e.query_mode!r}); every method's lists are in `ranked_lists/`.",
  ]
  if e.baselines:
    out.append(
        f'- Baselines on the same queries and gallery: {keys.TFIDF_LABEL}, '
        f'{keys.MEAN_REGION_LABEL}, and the same model with random weights (seed {config.seed}, '
        f'query mode {e.query_mode}).'
    )
  if plan.proposers:
    out.append(
        f'- Instance queries: {", ".join(p.label for p in plan.proposers)} '
        f'(`capture_jax.instances`; headline: {plan.headline.label}, eval.instances='
        f"{e.instances!r}). The oracle is the synthetic world's own grouping: an upper bound that "
        'real data does not have.'
    )
  if run.quality:
    out.append(
        '- Proposal quality against the instance sidecar (a proposal matches an instance when '
        'their region sets overlap with IoU >= 0.5):\n\n'
        + instances_lib.quality_table(run.quality).rstrip()
        + '\n'
    )
  if run.rates:
    out.append(
        '- Export throughput: '
        + ', '.join(f'{k} {v:.1f} samples/s' for k, v in run.rates.items())
        + '.'
    )
  return out


def evaluation_summary(
    config: ml_collections.ConfigDict, workdir: storage.Path, run: Evaluated
) -> dict[str, Any]:
  """What `evaluation.json` holds: what was evaluated, with what, the metrics and the timings."""
  e, plan = config.eval, run.plan
  gallery = run.exports[keys.ExportKey('gallery')]
  instances = run.exports.get(plan.headline_instances)
  return {
      'split': plan.split,
      'checkpoint_step': plan.step,
      'workdir': str(workdir),
      'embedding': e.embedding,
      'dimension': gallery.dimension,
      'query_mode': e.query_mode,
      'main_method': main_method(config, plan).label,
      'best_query_mode': best_mode(run),
      'search': e.search,
      'faiss_recall_at_100': run.searcher.recall or None,
      'search_seconds': run.searcher.seconds,
      'stage_seconds': run.seconds,
      'proposers': [p.name for p in plan.proposers],
      'proposal_quality': run.quality or None,
      'export_samples_per_s': run.rates,
      'counts': {
          'queries': len(plan.query_ids),
          'instances': len(instances) if instances is not None else 0,
          'gallery': len(gallery),
      },
      'exports': {k.label: str(v.path) for k, v in run.exports.items()},
      'metrics': {m.label: v for m, v in run.metrics.items()},
  }
