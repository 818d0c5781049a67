"""The plan of an evaluation: what it reads and exports, and which rows the report has.

`plan_evaluation` checks the request and decides, before anything compiles:
the query ids, the proposers (the headline first, decided here once), each
proposer's instance rows, the exports to make or reuse (`ExportJob`, each
with its `ExportIdentity`), the exports given on the command line, and the
report's rows (`Method`s, in order). Everything after it only follows the plan.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import ml_collections

from capture_jax import instances as instances_lib
from capture_jax import storage
from capture_jax.data import eval_input
from capture_jax.data import source as source_lib
from capture_jax.retrieval import export_format
from capture_jax.retrieval import identity as identity_lib
from capture_jax.retrieval import keys
from capture_jax.retrieval import metrics as metrics_lib
from capture_jax.training import checkpoint as checkpoint_lib

# The model's query modes (`instance_merge.MERGE_MODES`), and those of instance queries.
INSTANCE_MODES = ('instances', 'both')


def resolve_proposer(
    config: ml_collections.ConfigDict, workdir: storage.PathLike | None, name: str | None = None
) -> keys.Proposer:
  """The proposer `name` (default `eval.instances`; empty: learned when trained in `workdir`,
  else boxes), with the learned proposer's checkpoint step."""
  method = instances_lib.resolve_method(name or config.eval.instances, workdir)
  step = instances_lib.latest_proposer_step(workdir) if method == 'learned' else None
  return keys.Proposer(method, step)


def available_proposers(
    config: ml_collections.ConfigDict, split: str, workdir: storage.Path
) -> list[str]:
  """The proposers that can run here: boxes always, learned when the workdir holds a trained
  one, oracle when the data has an instance sidecar."""
  out = ['boxes']
  if instances_lib.has_trained_proposer(workdir):
    out.insert(0, 'learned')
  if eval_input.sidecar_path(config, split).is_file():
    out.append('oracle')
  return out


def plan_rows(
    config: ml_collections.ConfigDict,
    source: source_lib.Product1MSource,
    proposer: keys.Proposer | None,
    workdir: storage.PathLike | None = None,
) -> eval_input.EvalRows:
  """The rows to embed: every sample of the split (`proposer` None), or every product instance
  `proposer` finds in its samples (`learned` reads its model from `workdir`)."""
  if proposer is None:
    return eval_input.sample_rows(source)
  found = instances_lib.propose_split(config, source.split, proposer.name, workdir, source)
  planned = eval_input.instance_rows(source, found, config.data.max_regions)
  return dataclasses.replace(planned, proposer=proposer.tag)


def default_out_dir(
    workdir: storage.PathLike, kind: str, rows: eval_input.EvalRows, step: int | None
) -> storage.Path:
  """`{workdir}/embeddings/{step_S|random_init}/{kind}/{split}[-instances-{proposer tag}]`."""
  tag = 'random_init' if step is None else f'step_{step}'
  name = rows.split + (f'-instances-{rows.proposer}' if rows.kind == 'instances' else '')
  return storage.as_path(workdir) / 'embeddings' / tag / kind / name


@dataclasses.dataclass(frozen=True)
class ExportJob:
  """One export to make or reuse: its key, rows, where it lives, and its identity."""

  key: keys.ExportKey
  rows: eval_input.EvalRows
  source: source_lib.Product1MSource
  out_dir: storage.Path
  identity: identity_lib.ExportIdentity

  @property
  def step(self) -> int | None:
    """The checkpoint step of its weights (None: the random initialisation)."""
    return self.identity.fields['checkpoint_step']


def export_job(
    config: ml_collections.ConfigDict,
    workdir: storage.Path,
    key: keys.ExportKey,
    rows: eval_input.EvalRows,
    source: source_lib.Product1MSource,
    *,
    step: int | None,
    checkpoint_id: str | None,
) -> ExportJob:
  """The job of embedding `rows` with `step`'s weights (None: random) in its default folder."""
  kind = config.eval.embedding
  identity = identity_lib.ExportIdentity.of_rows(config, rows, kind, step, checkpoint_id)
  return ExportJob(key, rows, source, default_out_dir(workdir, kind, rows, step), identity)


@dataclasses.dataclass
class EvalPlan:
  """What an evaluation reads and reports, decided (and checked) before anything compiles.

  Attributes:
    split: the query split.
    step: the checkpoint (None: only given exports).
    query_ids: the split's query ids, in order.
    jobs: the exports to make or reuse.
    given: the exports passed on the command line, read.
    sources: 'gallery' and `split` -> the open split.
    proposers: the instance queries' proposers, the headline first (empty: whole queries only).
    instance_rows: proposer -> its instance rows of the split (planned here, not given).
    methods: the report's rows, in order.
  """

  split: str
  step: int | None
  query_ids: list[str]
  jobs: list[ExportJob]
  given: dict[keys.ExportKey, Any]
  sources: dict[str, source_lib.Product1MSource]
  proposers: tuple[keys.Proposer, ...]
  instance_rows: dict[keys.Proposer, eval_input.EvalRows]
  methods: tuple[keys.Method, ...]

  @property
  def headline(self) -> keys.Proposer | None:
    return self.proposers[0] if self.proposers else None

  @property
  def headline_instances(self) -> keys.ExportKey | None:
    """The export of the headline proposer's instance queries (None: whole queries only)."""
    return keys.ExportKey('instances', self.headline) if self.headline else None

  @property
  def modes(self) -> tuple[str, ...]:
    """The model's query modes in the report."""
    return ('whole', *INSTANCE_MODES) if self.proposers else ('whole',)

  def model_method(self, mode: str, weights: str = 'checkpoint') -> keys.Method:
    """The model's row in `mode` (instance modes with the headline proposer)."""
    return keys.Method('model', mode, None if mode == 'whole' else self.headline, weights)


def report_methods(
    proposers: tuple[keys.Proposer, ...], random_mode: str | None
) -> tuple[keys.Method, ...]:
  """The report's rows: the model whole, then per proposer (headline first) its instance modes,
  then (`random_mode` not None: with baselines) the random-weights model and the baselines."""
  rows = [keys.Method('model', 'whole')]
  rows += [keys.Method('model', mode, p) for p in proposers for mode in INSTANCE_MODES]
  if random_mode is not None:
    headline = proposers[0] if random_mode != 'whole' else None
    rows += [
        keys.Method('model', random_mode, headline, 'random'),
        keys.Method('tfidf'),
        keys.Method('mean_region'),
    ]
  return tuple(rows)


def plan_evaluation(
    config: ml_collections.ConfigDict,
    workdir: storage.Path,
    split: str,
    gt: metrics_lib.GroundTruth,
    *,
    step: int | None,
    given: Mapping[str, Any],
) -> tuple[EvalPlan, Any]:
  """Checks the request and plans it; returns the plan and the open checkpoint manager (None
  when every export is given). Raises before anything compiles.

  `given`: 'gallery', 'queries' and optionally 'instances' -> an export read
  (`export_format.Embeddings`), from the command line.
  """
  e = config.eval
  sources = {s: source_lib.make_source(config, s) for s in ('gallery', split)}
  query_rows = eval_input.sample_rows(sources[split])
  check_query_ids(query_rows.item_id, gt, f'split {split!r}', config.data.data_dir)
  if given and not {'gallery', 'queries'} <= set(given):
    raise ValueError(
        'pass both --gallery_embeddings and --query_embeddings (and --instance_embeddings for '
        'instance-level queries), or none of them'
    )
  if given and 'instances' not in given and e.query_mode != 'whole':
    raise FileNotFoundError(
        f'eval.query_mode={e.query_mode!r} needs instance queries, but no '
        '--instance_embeddings was given (use --config.eval.query_mode=whole)'
    )
  for name in ('queries', 'instances'):
    if name in given:
      check_pair(given[name], given['gallery'])
      check_query_ids(given[name].item_id, gt, str(given[name].path), config.data.data_dir)
  manager = None
  if not given:
    manager, step = checkpoint_lib.open_step(workdir, config, step)
  try:
    plan = _plan(config, workdir, split, step, manager, given=given, sources=sources)
  except Exception:
    if manager is not None:  # a request refused after the checkpoint was opened
      manager.close()
    raise
  return plan, manager


def _plan(config, workdir, split, step, manager, *, given, sources) -> EvalPlan:
  """`plan_evaluation` once the request is checked: proposers, instance rows, jobs, methods."""
  e = config.eval
  query_rows = eval_input.sample_rows(sources[split])
  if given:
    proposers = given_proposers(given)
    instance_rows = {}
  else:
    proposers = planned_proposers(config, split, workdir)
    instance_rows = {p: plan_rows(config, sources[split], p, workdir) for p in proposers}
  checkpoint_id = None if step is None else checkpoint_lib.checkpoint_fingerprint(manager, step)
  wanted = []  # (key, rows, split) of the exports this evaluation makes
  if not given or e.baselines:  # else no export: the gallery's ids (a whole read) are not needed
    wanted = [
        (keys.ExportKey('gallery'), plan_rows(config, sources['gallery'], None), 'gallery'),
        (keys.ExportKey('queries'), query_rows, split),
    ] + [(keys.ExportKey('instances', p), r, split) for p, r in instance_rows.items()]
  jobs = [
      export_job(config, workdir, key, rows, sources[where], step=step, checkpoint_id=checkpoint_id)
      for key, rows, where in ([] if given else wanted)
  ]
  random_mode = None
  if e.baselines:
    # The random-weights twin of the gallery, the queries and the headline's instance queries.
    random_wanted = wanted[: 2 + bool(instance_rows)]
    jobs += [
        export_job(
            config,
            workdir,
            dataclasses.replace(key, weights='random'),
            rows,
            sources[where],
            step=None,
            checkpoint_id=None,
        )
        for key, rows, where in random_wanted
    ]
    random_mode = e.query_mode if instance_rows else 'whole'
  return EvalPlan(
      split=split,
      step=step,
      query_ids=list(dict.fromkeys(query_rows.item_id)),
      jobs=jobs,
      given={
          keys.ExportKey(n, proposers[0] if n == 'instances' else None): v for n, v in given.items()
      },
      sources=sources,
      proposers=proposers,
      instance_rows=instance_rows,
      methods=report_methods(proposers, random_mode),
  )


def planned_proposers(
    config: ml_collections.ConfigDict, split: str, workdir: storage.Path
) -> tuple[keys.Proposer, ...]:
  """The headline proposer (`eval.instances`), then with `eval.compare_proposers` every other
  one that can run here."""
  headline = resolve_proposer(config, workdir)
  out = [headline]
  if config.eval.compare_proposers:
    out += [
        resolve_proposer(config, workdir, name)
        for name in available_proposers(config, split, workdir)
        if name != headline.name
    ]
  return tuple(out)


def given_proposers(given: Mapping[str, Any]) -> tuple[keys.Proposer, ...]:
  """The proposer of a given instance export (read from its metadata), the headline."""
  if 'instances' not in given:
    return ()
  return (keys.Proposer.from_tag(given['instances'].metadata.get('proposer') or ''),)


def check_query_ids(ids: list[str], gt: metrics_lib.GroundTruth, where: str, gt_dir: str) -> None:
  """Every query must have labels in the query annotation file the ground truth read."""
  missing = [q for q in dict.fromkeys(ids) if q not in gt.query_labels]
  if missing:
    raise ValueError(
        f'{len(missing)} query id(s) of {where} are absent from the annotations '
        f'({" and ".join(gt.query_files)} in {gt_dir}), e.g. {missing[:5]}'
    )


def check_pair(queries, gallery) -> None:
  """Queries and gallery (`export_format.Embeddings`) can be searched against each other (and
  come from the same weights)."""
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
  diffs = export_format.pair_diffs(queries.metadata, gallery.metadata)
  if diffs:
    raise ValueError(
        f'queries ({queries.path}) and gallery ({gallery.path}) were not exported from the same '
        f'checkpoint, config and data ({"; ".join(diffs)}; queries vs gallery); export both from '
        'one run'
    )
