r"""Instance-level retrieval evaluation of a checkpoint: export, search, official metrics, report.

    python -m capture_jax.evaluate --config=configs/demo.py --workdir=runs/demo [--split=dev] \
        [--checkpoint=STEP] [--out=DIR] [--config.eval.query_mode=whole|instances|both] \
        [--config.eval.search=exact|faiss] [--config.eval.embedding=fused|text|visual|encoder]

The program, in the order it runs:

1. checks: the ground-truth files in `config.data.data_dir`, every query id
   of the split present in the annotations, the checkpoint and its config;
2. exports (`capture_jax.export`) of the gallery, the queries (one row per
   sample) and the instance queries (one row per product instance, from the
   `instances_{split}.jsonl` sidecar), with the checkpoint and with the
   random initialisation; an export already in `{workdir}/embeddings` whose
   metadata matches (checkpoint step, kind, rows, model) is reused;
3. top-100 search by cosine (exact, or FAISS with `eval.search='faiss'`,
   whose recall@100 against exact search is reported);
4. ranked lists: per query, the whole-sample list, and the per-instance
   lists merged round-robin with de-duplication (`instance_merge`), in the
   three modes `whole`, `instances`, `both`;
5. baselines on the same queries and gallery: TF-IDF over titles (text only)
   and the mean region feature (visual only), plus the random-weights model;
6. the official metrics (mAP, Prec, mAR at R = 10, 50, 100) of every method.

Written to `{workdir}/eval_{split}/`: `retrieval_id_list.txt` (CAPTURE in
`eval.query_mode`, the official format), `ranked_lists/*.txt` (every method),
`report.md` (the table, the best query mode, listings of a few queries),
`metrics.json`, `metrics.png` and `evaluation.json` (what was evaluated).
The table is printed too.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
import pathlib
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from capture_jax import cli
from capture_jax import config as config_lib
from capture_jax import export as export_lib
from capture_jax import instances as instances_lib
from capture_jax import storage
from capture_jax.data import eval_input
from capture_jax.data import formats
from capture_jax.data import source as source_lib
from capture_jax.evaluation import baselines
from capture_jax.evaluation import embeddings as emb_lib
from capture_jax.evaluation import instance_merge
from capture_jax.evaluation import metrics as metrics_lib
from capture_jax.evaluation import report as report_lib
from capture_jax.evaluation import search as search_lib
from capture_jax.training import distributed
from capture_jax.training import checkpoint as checkpoint_lib
from capture_jax.training import lock as lock_lib
from capture_jax.training import sharding

SEARCH_KINDS = ('exact', 'faiss')
TOP_K = metrics_lib.MAX_RANKED  # the official format holds 100 ids per query
TFIDF = 'TF-IDF over titles (text only)'
MEAN_REGION = 'Mean region feature (visual only)'
EVALUATION_FILE = 'evaluation.json'


# How each proposer's instance queries are named in the report; the oracle is the synthetic
# world's own grouping, which real data does not have: always marked as an upper bound.
PROPOSER_LABELS = {
    'learned': 'learned proposals',
    'boxes': 'box proposals',
    'oracle': 'oracle instances, upper bound',
}


def capture_method(mode: str, random_init: bool = False, proposer: str = '') -> str:
  """The report's name of a CAPTURE row: query mode, weights and, for instance queries, where
  the instances came from (`capture_jax.instances`)."""
  where = f', {PROPOSER_LABELS[proposer]}' if proposer and mode != 'whole' else ''
  return f'CAPTURE{", random weights" if random_init else ""} ({mode}{where})'


@dataclasses.dataclass
class EvalResult:
  out_dir: storage.Path
  metrics: dict[str, dict[str, float]]  # method -> {'mAP@10': fraction, ...}
  table: str  # markdown
  best_query_mode: str
  summary: dict[str, Any]  # what `evaluation.json` holds


# --------------------------------------------------------------------------
# Checks.


def validate_eval_config(config: ml_collections.ConfigDict) -> None:
  e = config.eval
  problems = []
  if e.query_mode not in instance_merge.MERGE_MODES:
    problems.append(
        f'eval.query_mode must be one of {instance_merge.MERGE_MODES}, got {e.query_mode!r}'
    )
  if e.search not in SEARCH_KINDS:
    problems.append(f'eval.search must be one of {SEARCH_KINDS}, got {e.search!r}')
  if e.faiss_index not in ('ivf', 'hnsw'):
    problems.append(f"eval.faiss_index must be 'ivf' or 'hnsw', got {e.faiss_index!r}")
  if e.embedding not in emb_lib.EMBEDDING_KINDS:
    problems.append(f'eval.embedding must be one of {emb_lib.EMBEDDING_KINDS}, got {e.embedding!r}')
  if problems:
    raise ValueError('bad evaluation config:\n  - ' + '\n  - '.join(problems))


def check_query_ids(
    ids: Sequence[str], gt: metrics_lib.GroundTruth, where: str, gt_dir: str
) -> None:
  """Every query must have labels in the query annotation file the ground truth read."""
  missing = [q for q in dict.fromkeys(ids) if q not in gt.query_labels]
  if missing:
    raise ValueError(
        f'{len(missing)} query id(s) of {where} are absent from the annotations '
        f'({" and ".join(gt.query_files)} in {gt_dir}), e.g. {missing[:5]}'
    )


def check_pair(queries: emb_lib.Embeddings, gallery: emb_lib.Embeddings) -> None:
  """Queries and gallery can be searched against each other (and come from the same weights)."""
  if len(gallery) == 0:
    raise ValueError(f'the gallery is empty: {gallery.path} holds no rows; nothing to search')
  if len(queries) == 0:
    raise ValueError(f'no queries: {queries.path} holds no rows')
  if queries.dimension != gallery.dimension:
    raise ValueError(
        f'embedding dimensions differ: queries in {queries.path} have width {queries.dimension} '
        f'({queries.kind}), the gallery in {gallery.path} has width {gallery.dimension} '
        f'({gallery.kind}); export both with the same eval.embedding'
    )
  if queries.kind != gallery.kind:
    raise ValueError(
        f'embedding kinds differ: queries {queries.kind!r} ({queries.path}), gallery '
        f'{gallery.kind!r} ({gallery.path})'
    )
  diffs = emb_lib.pair_diffs(queries.metadata, gallery.metadata)
  if diffs:
    raise ValueError(
        f'queries ({queries.path}) and gallery ({gallery.path}) were not exported from the same '
        f'checkpoint, config and data ({"; ".join(diffs)}; queries vs gallery); export both from '
        'one run'
    )


# --------------------------------------------------------------------------
# Exports.


@dataclasses.dataclass
class ExportJob:
  """One export an evaluation reads: its rows and weights, and where it lives."""

  name: str  # 'gallery', 'queries', 'instances' (+ ' random weights')
  step: int | None  # None: random initialisation
  out_dir: storage.Path
  rows: eval_input.EvalRows
  source: source_lib.Product1MSource
  checkpoint_id: str | None = None  # the checkpoint save's fingerprint

  def plan(self, config: ml_collections.ConfigDict) -> dict[str, Any]:
    return export_lib.rows_plan(
        config, self.rows, config.eval.embedding, self.step, self.checkpoint_id
    )


@dataclasses.dataclass
class EvalPlan:
  """What an evaluation reads, decided (and checked) before anything compiles."""

  split: str
  step: int | None  # the checkpoint (None: only given exports, or random weights)
  query_ids: list[str]
  jobs: list[ExportJob]  # exports to make or reuse
  given: dict[str, emb_lib.Embeddings]  # exports passed on the command line
  with_instances: bool
  sources: dict[str, source_lib.Product1MSource]
  proposers: list[str]  # the headline proposer first, then those compared with it
  instance_rows: dict[str, eval_input.EvalRows]  # proposer -> its instance rows of the split


def plan_exports(
    config: ml_collections.ConfigDict,
    workdir: storage.Path,
    split: str,
    gt: metrics_lib.GroundTruth,
    *,
    step: int | None,
    explicit: Mapping[str, storage.Path],
) -> tuple[EvalPlan, Any]:
  """Checks the request and lists the exports to read; returns the plan and the open checkpoint
  manager (None when every export is given). Raises before anything compiles."""
  e = config.eval
  gt_dir = config.data.data_dir
  sources = {s: source_lib.make_source(config, s) for s in ('gallery', split)}
  query_rows = eval_input.sample_rows(sources[split])
  check_query_ids(query_rows.item_id, gt, f'split {split!r}', gt_dir)
  if explicit and not {'gallery', 'queries'} <= set(explicit):
    raise ValueError(
        'pass both --gallery_embeddings and --query_embeddings (and --instance_embeddings for '
        'instance-level queries), or none of them'
    )
  with_instances = 'instances' in explicit if explicit else True
  if not with_instances and e.query_mode != 'whole':
    raise FileNotFoundError(
        f'eval.query_mode={e.query_mode!r} needs instance queries, but no '
        '--instance_embeddings was given (use --config.eval.query_mode=whole)'
    )
  given = {name: emb_lib.read_embeddings(path) for name, path in explicit.items()}
  for name in ('queries', 'instances'):
    if name in given:
      check_pair(given[name], given['gallery'])
      check_query_ids(given[name].item_id, gt, str(given[name].path), gt_dir)
  manager = None
  if not explicit:
    manager, step = checkpoint_lib.open_step(workdir, config, step)
  try:
    return _plan_jobs(
        config, workdir, split, step, explicit, given, sources, query_rows, with_instances, manager
    )
  except Exception:
    if manager is not None:  # a request refused after the checkpoint was opened
      manager.close()
    raise


def _plan_jobs(
    config, workdir, split, step, explicit, given, sources, query_rows, with_instances, manager
):
  """`plan_exports` once the request is checked: the proposers' rows and the export jobs."""
  e = config.eval
  where = {'gallery': 'gallery', 'queries': split}
  rows = {'queries': query_rows}
  proposers: list[str] = []
  instance_rows: dict[str, eval_input.EvalRows] = {}
  if with_instances and 'instances' not in explicit:
    headline = instances_lib.resolve_method(e.instances, workdir)
    proposers = [headline]
    if e.compare_proposers:
      proposers += [p for p in available_proposers(config, split, workdir) if p != headline]
    for p in proposers:
      instance_rows[p] = export_lib.plan_rows(
          config, sources[split], 'instances', workdir=workdir, proposer=p
      )
      name = 'instances' if p == headline else f'instances {p}'
      where[name], rows[name] = split, instance_rows[p]

  def job(name: str, job_step: int | None, suffix: str = '') -> ExportJob:
    if name not in rows:
      rows[name] = export_lib.plan_rows(config, sources[where[name]], 'samples')
    r = rows[name]
    out_dir = export_lib.default_out_dir(
        workdir, e.embedding, r.split, r.kind, job_step, r.proposer
    )
    checkpoint_id = (
        None if job_step is None else checkpoint_lib.checkpoint_fingerprint(manager, job_step)
    )
    return ExportJob(name + suffix, job_step, out_dir, r, sources[where[name]], checkpoint_id)

  names = ['gallery', 'queries'] + [n for n in rows if n.startswith('instances')]
  jobs = [job(name, step) for name in names if name not in explicit]
  if e.baselines:
    random_names = ['gallery', 'queries'] + (['instances'] if 'instances' in rows else [])
    jobs += [job(name, None, ' random weights') for name in random_names]
  plan = EvalPlan(
      split,
      step,
      list(dict.fromkeys(query_rows.item_id)),
      jobs,
      given,
      with_instances,
      sources,
      proposers,
      instance_rows,
  )
  return plan, manager


def available_proposers(
    config: ml_collections.ConfigDict, split: str, workdir: storage.Path
) -> list[str]:
  """The proposers that can run here: boxes always, learned when the workdir holds a trained
  one, oracle when the data has an instance sidecar."""
  out = ['boxes']
  if instances_lib.has_trained_proposer(workdir):
    out.insert(0, 'learned')
  if pathlib.Path(eval_input.sidecar_path(config, split)).is_file():
    out.append('oracle')
  return out


def ensure_exports(
    config: ml_collections.ConfigDict,
    jobs: Sequence[ExportJob],
    manager,
    *,
    devices=None,
    progress: bool | None = None,
) -> tuple[dict[str, emb_lib.Embeddings], dict[str, float]]:
  """Runs the exports that are not complete yet (one compiled step for all), then reads every job's."""
  # Decided on process 0: every process must run the same exports (collectives).
  todo_ids = distributed.decide_on_main(
      lambda: [
          i
          for i, j in enumerate(jobs)
          if export_lib.completed_export(j.out_dir, j.plan(config)) is None
      ]
  )
  todo = [jobs[i] for i in todo_ids]
  rates: dict[str, float] = {}
  if todo:
    mesh = sharding.make_mesh(config.mesh, devices)
    embedder = emb_lib.make_embedder(config, mesh, config.eval.embedding)
    params: dict[int | None, Any] = {}
    for job in todo:
      if job.step not in params:
        params[job.step] = (
            export_lib.random_model_params(config, embedder)
            if job.step is None
            else checkpoint_lib.restore_model_params(manager, job.step, embedder.abstract_params)
        )
      if distributed.is_main_process():
        print(
            f'exporting {job.name}: {len(job.rows)} {job.rows.kind} rows of {job.rows.split} '
            f'-> {job.out_dir}',
            flush=True,
        )
      result = export_lib.export_split(
          config,
          job.out_dir,
          embedder,
          params[job.step],
          job.source,
          job.rows,
          checkpoint_step=job.step,
          checkpoint_id=job.checkpoint_id,
          # The default folders are ours: an export of other data or another save is replaced.
          replace_other=True,
          progress=progress,
      )
      if result.samples_per_s:
        rates[job.name] = result.samples_per_s
  elif distributed.is_main_process():
    print('reusing the exports in ' + ', '.join(str(j.out_dir) for j in jobs), flush=True)
  return {j.name: emb_lib.read_embeddings(j.out_dir) for j in jobs}, rates


# --------------------------------------------------------------------------
# Search and ranked lists.


def search(
    queries: np.ndarray, gallery: np.ndarray, config: ml_collections.ConfigDict, *, devices=None
) -> tuple[np.ndarray, float | None]:
  """Top-100 gallery indices [Q, min(100, N)] by cosine; with FAISS also its recall@100 against exact."""
  e = config.eval
  exact = lambda: search_lib.exact_topk(
      queries,
      gallery,
      TOP_K,
      query_chunk=e.query_chunk,
      gallery_chunk=e.gallery_chunk,
      devices=devices,
  )[1]
  if e.search == 'exact':
    return exact(), None
  _, approx = search_lib.faiss_topk(
      queries,
      gallery,
      TOP_K,
      kind=e.faiss_index,
      nlist=e.faiss_nlist or None,
      nprobe=e.faiss_nprobe,
      hnsw_m=e.faiss_hnsw_m,
      ef_search=e.faiss_ef_search,
      seed=config.seed,
  )
  return approx, search_lib.recall_at_k(approx, exact())


class Searcher:
  """`search` with the time and, with FAISS, the recall@100 of each named search recorded."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.devices = jax.local_devices()
    self.seconds: dict[str, float] = {}
    self.recall: dict[str, float] = {}

  def __call__(self, name: str, queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    start = time.perf_counter()
    indices, recall = search(queries, gallery, self.config, devices=self.devices)
    self.seconds[name] = time.perf_counter() - start
    if recall is not None:
      self.recall[name] = recall
    return indices


def instance_lists(
    instances: emb_lib.Embeddings, indices: np.ndarray, gallery_ids: Sequence[str]
) -> dict[str, list[list[str]]]:
  """Query id -> its instances' ranked lists, in the sidecar's instance order (the export's row order)."""
  out: dict[str, list[list[str]]] = {}
  gallery_ids = np.asarray(gallery_ids, dtype=object)
  for item_id, row in zip(instances.item_id, indices):
    out.setdefault(item_id, []).append([str(g) for g in gallery_ids[row[row >= 0]]])
  return out


def merged_lists(
    query_ids: Sequence[str],
    whole: Mapping[str, list[str]],
    per_instance: Mapping[str, list[list[str]]] | None,
    mode: str,
) -> dict[str, list[str]]:
  """Query id -> the ranked list of `mode` (`instance_merge.merge_query_lists`), in query order."""
  return {
      q: instance_merge.merge_query_lists(whole[q], (per_instance or {}).get(q, []), mode, TOP_K)
      for q in query_ids
  }


def rank_model(
    searcher: Searcher,
    query_ids: Sequence[str],
    queries: emb_lib.Embeddings,
    gallery: emb_lib.Embeddings,
    instances: Mapping[str, emb_lib.Embeddings],
    headline: str,
    suffix: str = '',
) -> dict[str, dict[str, list[str]]]:
  """Method name -> query id -> the model's ranked list.

  The whole-sample list, and for each proposer's instance queries
  (`instances`: proposer -> export) the per-instance lists merged with it in
  the `instances` and `both` modes (`headline` first).
  """
  whole = search_lib.indices_to_ranked_lists(
      queries.item_id,
      gallery.item_id,
      searcher('queries' + suffix, queries.vectors, gallery.vectors),
  )
  random_init = bool(suffix)
  out = {capture_method('whole', random_init): merged_lists(query_ids, whole, None, 'whole')}
  for proposer in sorted(instances, key=lambda p: p != headline):
    export = instances[proposer]
    per_instance = instance_lists(
        export,
        searcher(f'instances {proposer}{suffix}', export.vectors, gallery.vectors),
        gallery.item_id,
    )
    for mode in ('instances', 'both'):
      out[capture_method(mode, random_init, proposer)] = merged_lists(
          query_ids, whole, per_instance, mode
      )
  return out


def instance_exports(
    exports: Mapping[str, emb_lib.Embeddings], plan: EvalPlan, suffix: str = ''
) -> dict[str, emb_lib.Embeddings]:
  """Proposer -> the export of its instance queries (`suffix`: ' random weights')."""
  out = {}
  for name, export in exports.items():
    if name.startswith('instances') and name.endswith(suffix) and (suffix or 'random' not in name):
      out[proposer_method(export.metadata.get('proposer') or '')] = export
  return out


def proposer_method(tag: str) -> str:
  """An export's proposer tag ('learned-400', 'boxes', ...) -> the proposer's name ('' if none)."""
  return tag.split('-')[0]


# --------------------------------------------------------------------------
# Baselines.


def mean_region_vectors(
    config: ml_collections.ConfigDict, split: str, ids: Sequence[str], source=None
) -> np.ndarray:
  """[len(ids), F] masked mean of the region features (the model's visual input, global token
  excluded) of the items `ids` of `split`, read through the evaluation pipeline."""
  it = eval_input.make_eval_iterator(config, split, process_index=0, process_count=1, source=source)
  found: dict[str, np.ndarray] = {}
  for batch in it:
    valid = batch.is_valid.astype(bool)
    vectors = baselines.mean_region_embedding(
        batch.inputs['image_feat'][valid, 1:], batch.inputs['image_mask'][valid, 1:]
    )
    found.update(zip(map(str, batch.item_id[valid]), vectors))
  missing = [i for i in ids if i not in found]
  if missing:
    raise ValueError(
        f'{len(missing)} exported id(s) are not in the {split} split, e.g. {missing[:5]}'
    )
  return (
      np.stack([found[i] for i in ids])
      if ids
      else np.zeros((0, config.data.feature_dim), np.float32)
  )


def rank_baselines(
    config: ml_collections.ConfigDict,
    plan: EvalPlan,
    exports: Mapping[str, emb_lib.Embeddings],
    gt: metrics_lib.GroundTruth,
    searcher: Searcher,
) -> dict[str, dict[str, list[str]]]:
  """Method -> ranked lists of the baselines on the same queries and gallery: the model with
  random weights (in `eval.query_mode`), TF-IDF over titles and the mean region feature."""
  e = config.eval
  query_ids = plan.query_ids
  rg, rq = exports['gallery random weights'], exports['queries random weights']
  check_pair(rq, rg)
  headline = plan.proposers[0] if plan.proposers else ''
  random_instances = instance_exports(exports, plan, ' random weights')
  # Given instance exports have no random-weights twin: that row is then whole-sample.
  mode = e.query_mode if random_instances else 'whole'
  random_lists = rank_model(
      searcher, query_ids, rq, rg, random_instances, headline, suffix=' random weights'
  )
  random_method = capture_method(mode, random_init=True, proposer=headline)
  gallery = exports['gallery']
  titles = lambda ids: [gt.titles.get(i, '') for i in ids]
  tq, tg = baselines.tfidf_embeddings(
      titles(query_ids), titles(gallery.item_id), max_features=e.tfidf_max_features
  )
  mq = mean_region_vectors(config, plan.split, query_ids, plan.sources[plan.split])
  mg = mean_region_vectors(config, 'gallery', gallery.item_id, plan.sources['gallery'])
  return {
      random_method: random_lists[random_method],
      TFIDF: search_lib.indices_to_ranked_lists(
          query_ids, gallery.item_id, searcher(TFIDF, tq, tg)
      ),
      MEAN_REGION: search_lib.indices_to_ranked_lists(
          query_ids, gallery.item_id, searcher(MEAN_REGION, mq, mg)
      ),
  }


# --------------------------------------------------------------------------
# The report.


def proposal_quality(
    config: ml_collections.ConfigDict, plan: EvalPlan
) -> dict[str, dict[str, float]]:
  """Proposer -> quality of its instances against the sidecar (empty without a sidecar: real
  data has none); see `capture_jax.instances.proposal_quality`."""
  path = pathlib.Path(eval_input.sidecar_path(config, plan.split))
  if not plan.instance_rows or not path.is_file():
    return {}
  truth = formats.read_instances(str(path))
  source = plan.sources[plan.split]
  num_regions = {
      r['item_id']: min(len(r['boxes']), config.data.max_regions)
      for r in source.read_records(range(len(source)))
  }
  out = {}
  for proposer, rows in plan.instance_rows.items():
    found: dict[str, list[formats.Instance]] = {item: [] for item in num_regions}
    for item, regions in zip(rows.item_id, rows.regions):
      found[item].append(formats.Instance('', regions))
    out[proposer] = instances_lib.proposal_quality(found, truth, num_regions)
  return out


def _slug(method: str) -> str:
  return re.sub(r'[^a-z0-9]+', '_', method.lower()).strip('_')


def write_outputs(
    config: ml_collections.ConfigDict,
    out_dir: storage.Path,
    workdir: storage.Path,
    plan: EvalPlan,
    exports: Mapping[str, emb_lib.Embeddings],
    ranked: Mapping[str, dict[str, list[str]]],
    metrics: Mapping[str, dict[str, float]],
    modes: Sequence[str],
    gt: metrics_lib.GroundTruth,
    searcher: Searcher,
    rates: Mapping[str, float],
    quality: Mapping[str, Mapping[str, float]],
) -> EvalResult:
  """Ranked lists, `report.md`, `metrics.json`, the plot and `evaluation.json` in `out_dir`."""
  e = config.eval
  kind = e.embedding
  split, step, query_ids = plan.split, plan.step, plan.query_ids
  gallery, instances = exports['gallery'], exports.get('instances')
  headline = plan.proposers[0] if plan.proposers else ''
  capture_modes = {mode: metrics[capture_method(mode, proposer=headline)] for mode in modes}
  best_mode = max(capture_modes, key=lambda m: capture_modes[m]['mAP@10'])
  main_method = capture_method(
      e.query_mode if e.query_mode in modes else 'whole', proposer=headline
  )

  storage.makedirs(out_dir / 'ranked_lists')
  metrics_lib.write_ranked_lists(out_dir / metrics_lib.RANKED_FILE, ranked[main_method])
  for method, lists in ranked.items():
    metrics_lib.write_ranked_lists(out_dir / 'ranked_lists' / f'{_slug(method)}.txt', lists)
  listings = {
      main_method: [
          report_lib.build_listing(
              q, gt.query_labels[q], ranked[main_method][q], gt.gallery_labels, gt.titles
          )
          for q in query_ids[: e.num_listings]
      ]
  }
  weights = 'random initialisation' if step is None else f'checkpoint step {step}'
  recall = searcher.recall
  notes = [
      f'- Queries: {len(query_ids)} of split `{split}`'
      + (f' ({len(instances)} product instances)' if instances is not None else '')
      + f'; gallery: {len(gallery)} items. Ground truth: `{config.data.data_dir}`.',
      f'- CAPTURE: {weights} of `{workdir}`; embedding `{kind}` ({gallery.dimension}-d).',
      '- Search: '
      + (
          'exact top-100 by cosine.'
          if e.search == 'exact'
          else f'FAISS {e.faiss_index} top-100; recall@100 against exact search: '
          + ', '.join(f'{k} {v:.4f}' for k, v in recall.items())
          + '.'
      ),
      '- Query modes: `whole` = the whole-sample query; `instances` = one query per product instance '
      "(caption + that instance's regions), lists merged round-robin with de-duplication; `both` = the "
      'instance lists, then the whole-sample list, in every round.',
      f'- Best query mode on mAP@10: **{best_mode}** '
      + '('
      + ', '.join(f'{m} {100 * v["mAP@10"]:.2f}' for m, v in capture_modes.items())
      + ').',
      f"- `{metrics_lib.RANKED_FILE}`: {main_method} (eval.query_mode={e.query_mode!r}); every method's "
      'lists are in `ranked_lists/`.',
  ]
  if e.baselines:
    notes.append(
        f'- Baselines on the same queries and gallery: {TFIDF}, {MEAN_REGION}, and the same model '
        f'with random weights (seed {config.seed}, query mode {e.query_mode}).'
    )
  if plan.proposers:
    notes.append(
        f'- Instance queries: {", ".join(PROPOSER_LABELS[p] for p in plan.proposers)} '
        f'(`capture_jax.instances`; headline: {PROPOSER_LABELS[headline]}, eval.instances='
        f"{e.instances!r}). The oracle is the synthetic world's own grouping: an upper bound that "
        'real data does not have.'
    )
  if quality:
    notes.append(
        '- Proposal quality against the instance sidecar (a proposal matches an instance when '
        'their region sets overlap with IoU >= 0.5):\n\n'
        + instances_lib.quality_table(quality).rstrip()
        + '\n'
    )
  if rates:
    notes.append(
        '- Export throughput: '
        + ', '.join(f'{k} {v:.1f} samples/s' for k, v in rates.items())
        + '.'
    )
  report_lib.write_report(out_dir, metrics, listings, notes=notes)
  summary = {
      'split': split,
      'checkpoint_step': step,
      'workdir': str(workdir),
      'embedding': kind,
      'dimension': gallery.dimension,
      'query_mode': e.query_mode,
      'main_method': main_method,
      'best_query_mode': best_mode,
      'search': e.search,
      'faiss_recall_at_100': recall or None,
      'search_seconds': searcher.seconds,
      'proposers': list(plan.proposers),
      'proposal_quality': dict(quality) or None,
      'export_samples_per_s': dict(rates),
      'counts': {
          'queries': len(query_ids),
          'instances': len(instances) if instances is not None else 0,
          'gallery': len(gallery),
      },
      'exports': {k: str(v.path) for k, v in exports.items()},
      'metrics': dict(metrics),
  }
  storage.write_text(
      out_dir / EVALUATION_FILE, json.dumps(summary, indent=2, ensure_ascii=False) + '\n'
  )
  table = report_lib.metrics_table(metrics)
  return EvalResult(out_dir, dict(metrics), table, best_mode, summary)


# --------------------------------------------------------------------------
# The evaluation.


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
) -> EvalResult | None:
  """The `capture_jax.evaluate` command (see the module docstring). Returns None on processes other than 0."""
  workdir = storage.as_path(workdir)
  out_dir = storage.as_path(out_dir) if out_dir else workdir / f'eval_{split}'
  validate_eval_config(config)
  export_lib.validate_request(config, split, 'samples')
  source_lib.require_local_inputs(config)
  for where in {str(workdir), str(out_dir)}:  # a missing bucket is named before anything compiles
    storage.check_writable(where)
  # Only the gallery and this split's annotations; bad lines are skipped exactly when the
  # dataset build skipped them (data.skip_bad).
  gt = metrics_lib.read_ground_truth(
      config.data.data_dir, split, counter=formats.BadInputCounter(config.data.skip_bad)
  )
  explicit = {
      'gallery': gallery_embeddings,
      'queries': query_embeddings,
      'instances': instance_embeddings,
  }
  explicit = {k: storage.as_path(v) for k, v in explicit.items() if v}

  # 1. Checks, and what to export, before anything compiles.
  plan, manager = plan_exports(config, workdir, split, gt, step=step, explicit=explicit)

  # 2. Exports (only what is missing).
  try:
    exports, rates = ensure_exports(config, plan.jobs, manager, devices=devices, progress=progress)
  finally:
    if manager is not None:
      manager.close()
  exports.update(plan.given)
  if not distributed.is_main_process():
    return None
  gallery, queries = exports['gallery'], exports['queries']
  for name in ('queries', 'instances'):
    if name in exports:
      check_pair(exports[name], gallery)
      check_query_ids(exports[name].item_id, gt, str(exports[name].path), config.data.data_dir)
  if plan.step is None:
    plan.step = gallery.metadata.get('checkpoint_step')

  # 3-4. Search and ranked lists of every method, in query order.
  searcher = Searcher(config)
  by_proposer = instance_exports(exports, plan)
  if not plan.proposers:  # given exports: the given instance export's proposer is the headline
    plan.proposers = list(by_proposer)
  headline = plan.proposers[0] if plan.proposers else ''
  ranked = rank_model(searcher, plan.query_ids, queries, gallery, by_proposer, headline)
  modes = instance_merge.MERGE_MODES if by_proposer else ('whole',)
  if config.eval.baselines:
    ranked.update(rank_baselines(config, plan, exports, gt, searcher))

  # 5. Metrics, files, report.
  metrics = {
      m: metrics_lib.evaluate_ranked_lists(lists, gt.query_labels, gt.gallery_labels)
      for m, lists in ranked.items()
  }
  quality = proposal_quality(config, plan)
  return write_outputs(
      config, out_dir, workdir, plan, exports, ranked, metrics, modes, gt, searcher, rates, quality
  )


# --------------------------------------------------------------------------
# Command line.


def define_flags() -> dict[str, Any]:
  """The command's flags (defined when the command runs, not on import)."""
  return {
      'config': config_flags.DEFINE_config_file(
          'config', None, 'A configs/*.py file.', lock_config=True
      ),
      'workdir': flags.DEFINE_string('workdir', None, 'Run directory with checkpoints/.'),
      'split': flags.DEFINE_enum('split', 'dev', ['dev', 'test'], 'Query split.'),
      'checkpoint': flags.DEFINE_integer(
          'checkpoint', None, 'Checkpoint step (default: the latest).'
      ),
      'out': flags.DEFINE_string('out', None, 'Output folder (default {workdir}/eval_{split}).'),
      'gallery_embeddings': flags.DEFINE_string(
          'gallery_embeddings', None, 'Evaluate this export of the gallery instead of exporting it.'
      ),
      'query_embeddings': flags.DEFINE_string(
          'query_embeddings', None, 'Evaluate this export of the queries instead of exporting them.'
      ),
      'instance_embeddings': flags.DEFINE_string(
          'instance_embeddings', None, 'Export of the instance queries (with the two above).'
      ),
  }


def main(args: dict[str, Any]) -> None:
  config_lib.check_or_exit(args['config'].value)
  distributed.initialize()
  try:
    result = evaluate(
        args['config'].value,
        args['workdir'].value,
        args['split'].value,
        step=args['checkpoint'].value,
        out_dir=args['out'].value,
        gallery_embeddings=args['gallery_embeddings'].value,
        query_embeddings=args['query_embeddings'].value,
        instance_embeddings=args['instance_embeddings'].value,
    )
  except (
      FileNotFoundError,
      ValueError,
      KeyError,
      lock_lib.LockedError,
      storage.StorageError,
  ) as e:  # bad input: one clear line, no traceback
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  if result is not None:
    print(result.table)
    print(f'best query mode on mAP@10: {result.best_query_mode}')
    print(
        f'wrote {result.out_dir}/report.md, metrics.json, metrics.png and {metrics_lib.RANKED_FILE}'
    )


def console_main() -> None:
  args = define_flags()
  flags.mark_flags_as_required(['config', 'workdir'])
  cli.run(lambda argv: main(args))


if __name__ == '__main__':
  console_main()
