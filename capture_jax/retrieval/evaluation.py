"""Instance-level retrieval evaluation of a checkpoint: plan -> exports -> rank -> score -> report.

`evaluate` is the `capture_jax.evaluate` command's program, in the order it runs:

1. plan (`plan.plan_evaluation`): the ground truth and every query id checked,
   the proposers (headline first) and their instance rows, the exports to
   make or reuse, the report's rows; before anything compiles;
2. exports (`exporting.ensure_exports`): only those not complete already;
3. ranking (`ranking`): top-100 search by cosine (exact, or FAISS with its
   recall@100 against exact), every row's ranked lists in query order;
4. scoring: the official metrics (`metrics`: mAP, Prec, mAR at R = 10, 50,
   100) of every row, and the proposals' quality against the sidecar
   (synthetic data only);
5. results (`results`): ranked lists, report, metrics, plot, `evaluation.json`.
"""

from __future__ import annotations

import functools
import time

import ml_collections

from capture_jax import config as config_lib
from capture_jax import instances as instances_lib
from capture_jax import storage
from capture_jax.data import eval_input
from capture_jax.data import formats
from capture_jax.data import source as source_lib
from capture_jax.retrieval import baselines
from capture_jax.retrieval import export_format
from capture_jax.retrieval import exporting
from capture_jax.retrieval import keys
from capture_jax.retrieval import metrics as metrics_lib
from capture_jax.retrieval import plan as plan_lib
from capture_jax.retrieval import ranking
from capture_jax.retrieval import results as results_lib
from capture_jax.training import distributed


def evaluate(
    config: ml_collections.ConfigDict,
    workdir: storage.PathLike,
    split: str = 'dev',
    *,
    step: int | None = None,
    out_dir: storage.PathLike | None = None,
    gallery_embeddings: storage.PathLike | None = None,
    query_embeddings: storage.PathLike | None = None,
    instance_embeddings: storage.PathLike | None = None,
    devices=None,
    progress: bool | None = None,
) -> results_lib.EvalResult | None:
  """Evaluates checkpoint `step` (default: the latest) of `workdir` on the queries of `split`,
  writing the results to `out_dir` (default `{workdir}/eval_{split}`).

  `gallery_embeddings`, `query_embeddings` (and `instance_embeddings`): exports to evaluate
  instead of exporting (both or neither of the first two; no checkpoint is read).
  Returns None on processes other than 0.
  """
  workdir = storage.as_path(workdir)
  out_dir = storage.as_path(out_dir) if out_dir else workdir / f'eval_{split}'
  seconds: dict[str, float] = {}
  clock = time.perf_counter()
  gt = check_request(config, split, workdir, out_dir)
  given = {'gallery': gallery_embeddings, 'queries': query_embeddings}
  given['instances'] = instance_embeddings
  given = {role: export_format.read_embeddings(path) for role, path in given.items() if path}
  plan, manager = plan_lib.plan_evaluation(config, workdir, split, gt, step=step, given=given)
  seconds['plan'], clock = _lap(clock)
  exports, rates = _exports(config, plan, manager, devices, progress)
  seconds['export'], clock = _lap(clock)
  if not distributed.is_main_process():
    return None
  check_exports(config, plan, exports, gt)
  searcher = ranking.Searcher(config)
  ranker = ranking.Ranker(
      searcher, plan.query_ids, exports, functools.partial(_baseline, config, plan, exports, gt)
  )
  ranked = ranking.rank(ranker, plan.methods)
  seconds['rank'], clock = _lap(clock)
  metrics = {
      m: metrics_lib.evaluate_ranked_lists(lists, gt.query_labels, gt.gallery_labels)
      for m, lists in ranked.items()
  }
  quality = proposal_quality(config, plan)
  seconds['score'], clock = _lap(clock)
  run = results_lib.Evaluated(plan, exports, ranked, metrics, gt, searcher, rates, quality, seconds)
  result = results_lib.write_results(config, out_dir, workdir, run)
  seconds['results'], _ = _lap(clock)
  return result


def _exports(config, plan: plan_lib.EvalPlan, manager, devices, progress):
  """The plan's exports (made where missing; `manager` closed after) and the given ones."""
  try:
    exports, rates = exporting.ensure_exports(
        config, plan.jobs, manager, devices=devices, progress=progress
    )
  finally:
    if manager is not None:
      manager.close()
  return {**exports, **plan.given}, rates


def check_request(
    config: ml_collections.ConfigDict,
    split: str,
    workdir: storage.Path,
    out_dir: storage.Path,
) -> metrics_lib.GroundTruth:
  """The config, the data's inputs and the output folders; returns the split's ground truth."""
  config_lib.validate(config)
  if split not in formats.QUERY_SPLITS:
    raise ValueError(f'bad evaluation request: split must be one of {formats.QUERY_SPLITS}')
  source_lib.require_local_inputs(config)
  for where in {str(workdir), str(out_dir)}:  # a missing bucket is named before anything compiles
    storage.check_writable(where)
  # Only the gallery and this split's annotations; bad lines are skipped exactly when the
  # dataset build skipped them (data.skip_bad).
  return metrics_lib.read_ground_truth(
      config.data.data_dir, split, counter=formats.BadInputCounter(config.data.skip_bad)
  )


def check_exports(config, plan: plan_lib.EvalPlan, exports, gt: metrics_lib.GroundTruth) -> None:
  """Every query export searches against its gallery and holds only known query ids; a plan of
  given exports takes its checkpoint step from them."""
  for key, export in exports.items():
    if key.role != 'gallery':
      plan_lib.check_pair(export, exports[keys.ExportKey('gallery', weights=key.weights)])
      plan_lib.check_query_ids(export.item_id, gt, str(export.path), config.data.data_dir)
  if plan.step is None:
    plan.step = exports[keys.ExportKey('gallery')].metadata.get('checkpoint_step')


def _baseline(config, plan, exports, gt, method: keys.Method):
  """`baselines.baseline_vectors` of `method` on the plan's queries and the exported gallery."""
  gallery_ids = exports[keys.ExportKey('gallery')].item_id
  return baselines.baseline_vectors(
      method.source,
      config,
      gt.titles,
      (plan.sources[plan.split], plan.query_ids),
      (plan.sources['gallery'], gallery_ids),
  )


def proposal_quality(
    config: ml_collections.ConfigDict, plan: plan_lib.EvalPlan
) -> dict[str, dict[str, float]]:
  """Proposer name -> quality of its instance rows against the sidecar (`instances.sidecar_quality`;
  empty without a sidecar: real data has none)."""
  path = eval_input.sidecar_path(config, plan.split)
  if not plan.instance_rows or not path.is_file():
    return {}
  source = plan.sources[plan.split]
  num_regions = instances_lib.region_counts(
      source.read_records(range(len(source))), config.data.max_regions
  )
  found: dict[str, dict[str, list[formats.Instance]]] = {}
  for proposer, rows in plan.instance_rows.items():
    by_item = found[proposer.name] = {item: [] for item in num_regions}
    for item, regions in zip(rows.item_id, rows.regions):
      by_item[item].append(formats.Instance('', regions))
  return instances_lib.sidecar_quality(found, formats.read_instances(str(path)), num_regions)


def _lap(start: float) -> tuple[float, float]:
  now = time.perf_counter()
  return now - start, now
