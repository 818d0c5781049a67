"""Proposals of a whole split, the proposals file, and the quality table per proposer."""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import ml_collections

from capture_jax import storage
from capture_jax.data import eval_input
from capture_jax.data import formats
from capture_jax.instances import geometry
from capture_jax.instances import proposals as proposals_lib
from capture_jax.instances import trainer as train_lib


def default_method(workdir: storage.PathLike | None) -> str:
  """`learned` when the workdir holds a trained proposer, else `boxes` (never `oracle`)."""
  return 'learned' if train_lib.has_trained_proposer(workdir) else 'boxes'


def resolve_method(method: str | None, workdir: storage.PathLike | None) -> str:
  """The proposer to use: `method`, or `default_method(workdir)` when it is None or ''.

  Raises:
    ValueError: an unknown method.
    FileNotFoundError: 'learned' when `workdir` holds no trained proposer.
  """
  if not method:
    return default_method(workdir)
  if method not in proposals_lib.METHODS:
    raise ValueError(f'unknown proposer {method!r}; expected one of {proposals_lib.METHODS}')
  if method == 'learned' and not train_lib.has_trained_proposer(workdir):
    raise FileNotFoundError(
        f'eval.instances=learned but {train_lib.checkpoint_dir(workdir or ".")} holds no trained '
        'proposer; train one with `python -m capture_jax.instances train --config=... '
        f'--workdir={workdir}` or use boxes'
    )
  return method


def proposals_path(workdir: storage.PathLike, split: str, method: str) -> storage.Path:
  """`{workdir}/instances/{method}/proposals_{split}.jsonl`."""
  return train_lib.proposer_dir(workdir) / method / proposals_lib.proposals_filename(split)


def iter_split(
    config: ml_collections.ConfigDict, split: str, source=None, chunk: int = 1024
) -> Iterator[list[dict[str, Any]]]:
  """The records of a split (item_id, image size, boxes, features), `chunk` at a time,
  in record order: a split is never held in memory whole."""
  from capture_jax.data import source as source_lib  # pylint: disable=import-outside-toplevel

  source = source or source_lib.make_source(config, split)
  for start in range(0, len(source), chunk):
    yield [
        {k: rec[k] for k in ('item_id', 'image_w', 'image_h', 'boxes', 'features')}
        for rec in source.read_records(range(start, min(start + chunk, len(source))))
    ]


def propose_records(
    records: Sequence[dict[str, Any]],
    method: str,
    config: ml_collections.ConfigDict,
    workdir: storage.PathLike | None = None,
    proposer: train_lib.LearnedProposer | None = None,
    sidecar: dict[str, list[formats.Instance]] | None = None,
) -> dict[str, list[proposals_lib.Proposal]]:
  """item_id -> proposals of `records` by one method.

  Args:
    method: 'learned' (needs `workdir` with a trained proposer, or
      `proposer`), 'boxes', or 'oracle' (needs `sidecar`: the oracle is the
      sidecar itself, restricted to the regions stored; score 1).
  """
  if method == 'boxes':
    return {r['item_id']: geometry.propose_boxes(r, config) for r in records}
  if method == 'learned':
    proposer = proposer or train_lib.LearnedProposer(workdir, config)
    return dict(zip((r['item_id'] for r in records), proposer.propose(records)))
  if method == 'oracle':
    if sidecar is None:
      raise ValueError('the oracle proposer needs the instance sidecar')
    out = {}
    for r in records:
      n = len(r['boxes'])
      props = []
      for inst in sidecar.get(r['item_id'], ()):
        regions = tuple(sorted(x for x in inst.regions if 0 <= x < n))
        if regions:
          props.append(proposals_lib.Proposal(regions, 1.0))
      out[r['item_id']] = props
    return out
  raise ValueError(f'unknown proposer {method!r}; expected one of {proposals_lib.METHODS}')


def propose_split(
    config: ml_collections.ConfigDict,
    split: str,
    method: str,
    workdir: storage.PathLike | None = None,
    source=None,
) -> dict[str, list[formats.Instance]]:
  """item_id -> product instances of every sample of a split (what export and evaluation use).

  The result has the sidecar's type (`formats.Instance`, label '' for
  proposals; by decreasing score) and is what
  `eval_input.make_instance_eval_iterator(config, split, instances=...)` takes.

  Args:
    config: reads `data.*` (TFDS dataset, data_dir for the oracle) and
      `instances.*`.
    split: e.g. 'dev'.
    method: 'learned', 'boxes' or 'oracle' (the sidecar
      `{data_dir}/instances_{split}.jsonl`: an upper bound, label it so).
    workdir: for 'learned': the run folder with `instances/checkpoints`.
    source: an open `Product1MSource` of the split (default: opened from config).
  Raises:
    FileNotFoundError: 'oracle' without a sidecar, 'learned' without a
      trained proposer in `workdir`.
    IncompatibleProposerError: the proposer was trained for another feature
      width or architecture than the config's.
  """
  if method not in proposals_lib.METHODS:
    raise ValueError(f'unknown proposer {method!r}; expected one of {proposals_lib.METHODS}')
  if method == 'oracle':
    path = eval_input.sidecar_path(config, split)
    if not path.is_file():
      raise FileNotFoundError(
          f'the oracle proposer reads the instance sidecar {path}, which does not exist '
          "(real data has none: use eval.instances='learned' or 'boxes')"
      )
    sidecar = formats.read_instances(str(path))
  proposer = train_lib.LearnedProposer(workdir, config) if method == 'learned' else None
  out: dict[str, list[formats.Instance]] = {}
  for records in iter_split(config, split, source):
    if method == 'oracle':  # labels kept: the sidecar, restricted to the stored regions
      for r in records:
        n = len(r['boxes'])
        out[r['item_id']] = [
            formats.Instance(i.label, tuple(x for x in i.regions if 0 <= x < n))
            for i in sidecar.get(r['item_id'], ())
            if any(0 <= x < n for x in i.regions)
        ]
    else:
      props = propose_records(records, method, config, workdir, proposer)
      out.update(proposals_lib.as_instances(props))
  return out


def evaluate_proposers(
    config: ml_collections.ConfigDict,
    split: str,
    methods: Sequence[str] = ('boxes', 'learned', 'oracle'),
    workdir: storage.PathLike | None = None,
    out_dir: storage.PathLike | None = None,
    source=None,
) -> dict[str, dict[str, float]]:
  """Proposes a split with each method, writes the proposals files, and measures them.

  Writes `{out_dir}/{method}/proposals_{split}.jsonl` (default out_dir:
  `{workdir}/instances`) for each method. Quality (`proposal_quality`) needs
  the sidecar; without one the result holds only the proposal counts.
  'learned' is skipped (with a message) when `workdir` has no trained
  proposer; 'oracle' when there is no sidecar.

  Returns:
    method -> quality metrics (`proposals.proposal_quality`).
  """
  path = eval_input.sidecar_path(config, split)
  sidecar = formats.read_instances(str(path)) if path.is_file() else None
  if out_dir is None:
    if workdir is None:
      raise ValueError('evaluate_proposers needs out_dir or workdir to write proposals to')
    out_dir = train_lib.proposer_dir(workdir)
  out_dir = storage.as_path(out_dir)
  active = []
  for method in methods:
    if method == 'learned' and not train_lib.has_trained_proposer(workdir):
      print(f'learned: no trained proposer in {workdir}; skipped', flush=True)
    elif method == 'oracle' and sidecar is None:
      print(f'oracle: no sidecar {path}; skipped', flush=True)
    elif method not in proposals_lib.METHODS:
      raise ValueError(f'unknown proposer {method!r}; expected one of {proposals_lib.METHODS}')
    else:
      active.append(method)
  proposer = train_lib.LearnedProposer(workdir, config) if 'learned' in active else None
  props: dict[str, dict[str, list[proposals_lib.Proposal]]] = {m: {} for m in active}
  num_regions: dict[str, int] = {}
  ids: list[str] = []
  for records in iter_split(config, split, source):
    ids += [r['item_id'] for r in records]
    num_regions.update(region_counts(records, config.data.max_regions))
    for method in active:
      props[method].update(
          propose_records(records, method, config, workdir, proposer, sidecar=sidecar)
      )
  for method in active:
    proposals_lib.write_proposals(
        out_dir / method / proposals_lib.proposals_filename(split), props[method], ids
    )
  if sidecar is not None:
    return sidecar_quality(props, sidecar, num_regions)
  counts = {m: sum(len(v) for v in props[m].values()) for m in active}
  return {
      m: {'proposals_per_sample': counts[m] / max(len(ids), 1), 'samples': len(ids)} for m in active
  }


def region_counts(records: Sequence[dict[str, Any]], max_regions: int) -> dict[str, int]:
  """item_id -> how many regions of each record a proposal groups: its stored boxes, at most
  `max_regions` (`data.max_regions`, the model's regions)."""
  return {r['item_id']: min(len(r['boxes']), max_regions) for r in records}


def sidecar_quality(
    found: Mapping[
        str, Mapping[str, Sequence[formats.Instance] | Sequence[proposals_lib.Proposal]]
    ],
    sidecar: Mapping[str, Sequence[formats.Instance]],
    num_regions: Mapping[str, int],
) -> dict[str, dict[str, float]]:
  """Proposer -> the quality (`proposals.proposal_quality`) of its instances (`found`: proposer
  -> item_id -> instances) against the instance sidecar, over the samples of `num_regions`
  (`region_counts`): the one measure of proposals, for `evaluate_proposers` and the evaluation."""
  return {
      method: proposals_lib.proposal_quality(props, sidecar, num_regions)
      for method, props in found.items()
  }
