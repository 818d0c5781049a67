"""Evaluation iterators: the rows of a split, unmasked, in batches that say which rows they hold.

What an evaluation reads is first planned as `EvalRows`: one row per sample
of a split (`sample_rows`), or one row per product instance of each sample
(`instance_rows`: the sample's title with only the instance's regions).
`iterate_rows` yields `EvalBatch`es of those rows; each batch carries its
rows' positions in the plan (`row`, -1 for padding), so a consumer (the
export) puts outputs back in order and names them from the same `EvalRows`
without restating which rows the iterator yields.

With n processes, process p reads rows p, p + n, p + 2n, ... in order, and
every process yields `num_eval_batches(len(rows), B, n)` batches (B per
process), the last ones padded, so that collectives see equal batches.
Global batch i (the processes' batches i together) holds exactly the rows
[i * B * n, (i + 1) * B * n).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import pathlib
from typing import Any, Iterator, Mapping, Sequence

import grain
import ml_collections
import numpy as np

from capture_jax.data import collate as collate_lib
from capture_jax.data import formats
from capture_jax.data import source as source_lib

ROW_KINDS = ('samples', 'instances')  # one row per sample, or one per product instance


@dataclasses.dataclass(frozen=True)
class EvalRows:
  """The rows an evaluation reads, in order.

  Attributes:
    kind: 'samples' or 'instances'.
    split: the split the records come from.
    item_id: [N] the sample of each row.
    record_index: [N] int64, the sample's position in the split.
    regions: for instance rows, the instance's region indices (all below
      `data.max_regions`); None for sample rows.
    instance_label: for instance rows, the instance's label ('' for proposals).
    instance_index: for instance rows, the instance's position in its
      sample's list of instances.
    proposer: for instance rows, what grouped the regions into instances
      (`capture_jax.instances`: e.g. 'boxes', 'learned-400', 'oracle').
  """

  kind: str
  split: str
  item_id: list[str]
  record_index: np.ndarray
  regions: list[tuple[int, ...]] | None = None
  instance_label: list[str] | None = None
  instance_index: list[int] | None = None
  proposer: str = ''

  def __len__(self) -> int:
    return len(self.item_id)


@dataclasses.dataclass
class EvalBatch:
  """One evaluation batch of a process.

  Attributes:
    inputs: the batch dict (`capture_jax.batch`), unmasked: lm_label_ids and
      image_label are all -1; padding rows are zero.
    row: [B] int64, each row's position in the `EvalRows` plan; -1 for the
      padding rows of the last batches.
    item_id: [B] numpy str array ('' at padding), kept off the device.
    labels: B tuples of labels (empty at padding and for unlabelled splits).
    instance_label: [B] str array, for instance-level batches ('' otherwise).
    instance_index: [B] int32, the instance's position in its sample's list
      of instances (-1 otherwise).
  """

  inputs: dict[str, np.ndarray]
  row: np.ndarray
  item_id: np.ndarray
  labels: list[tuple[str, ...]]
  instance_label: np.ndarray
  instance_index: np.ndarray

  @property
  def is_valid(self) -> np.ndarray:
    """[B] int32, 0 for padding rows."""
    return (self.row >= 0).astype(np.int32)


# --------------------------------------------------------------------------
# Planning the rows.


def sample_rows(source: source_lib.Product1MSource) -> EvalRows:
  """One row per sample of the split, in file order."""
  ids = source.item_ids()
  return EvalRows('samples', source.split, ids, np.arange(len(ids), dtype=np.int64))


def sidecar_path(config: ml_collections.ConfigDict, split: str) -> pathlib.Path:
  """`{data.data_dir}/instances_{split}.jsonl`: the synthetic world's instance grouping (an
  input: on local disk; real data has none)."""
  return pathlib.Path(config.data.data_dir) / formats.instances_filename(split)


def instance_rows(
    source: source_lib.Product1MSource,
    instances: Mapping[str, Sequence[formats.Instance]],
    max_regions: int,
) -> EvalRows:
  """One row per product instance of each sample, in split order, then instance order.

  Samples without instances are skipped, and so are instances with no region
  below `max_regions` (regions beyond it were not stored); both are logged.
  """
  ids, records, regions, labels, indices = [], [], [], [], []
  missing = empty = 0
  for i, item_id in enumerate(source.item_ids()):
    if item_id not in instances:
      missing += 1
      continue
    for k, inst in enumerate(instances[item_id]):
      kept = tuple(r for r in inst.regions if r < max_regions)
      if not kept:
        empty += 1
        continue
      ids.append(item_id)
      records.append(i)
      regions.append(kept)
      labels.append(inst.label)
      indices.append(k)
  if missing or empty:
    logging.warning(
        '%s: %d samples without instances, %d instances with no region within max_regions; '
        'skipped',
        source.split,
        missing,
        empty,
    )
  return EvalRows(
      'instances', source.split, ids, np.array(records, np.int64), regions, labels, indices
  )


# --------------------------------------------------------------------------
# Reading them.


def num_eval_batches(num_rows: int, batch_per_process: int, process_count: int) -> int:
  """Batches every process yields (equal across processes, for collectives)."""
  return max(1, math.ceil(math.ceil(num_rows / process_count) / batch_per_process))


def batch_plan(
    num_rows: int, batch_per_process: int, process_index: int, process_count: int
) -> np.ndarray:
  """[num_batches, B] row positions of this process (strided shard), -1 padding."""
  mine = np.arange(process_index, num_rows, process_count)
  n = num_eval_batches(num_rows, batch_per_process, process_count)
  plan = np.full(n * batch_per_process, -1, np.int64)
  plan[: len(mine)] = mine
  return plan.reshape(n, batch_per_process)


def _load_batch(
    source: source_lib.Product1MSource,
    row_ids: np.ndarray,
    rows: EvalRows,
    spec: collate_lib.BatchSpec,
) -> EvalBatch:
  """Reads and collates the rows of one batch ([B] positions in `rows`, -1 = padding)."""
  valid = np.flatnonzero(row_ids >= 0)
  wanted = row_ids[valid]
  records = source.read_records(rows.record_index[wanted].tolist()) if len(wanted) else []
  if rows.regions is not None:
    records = [collate_lib.restrict_regions(r, rows.regions[i]) for r, i in zip(records, wanted)]
  b = len(row_ids)
  inputs = spec.layout.padding(b)
  if records:
    for key, arr in collate_lib.eval_batch(records, spec).items():
      inputs[key][valid] = arr
  item_id = np.full(b, '', dtype=object)
  item_id[valid] = [r['item_id'] for r in records]
  labels: list[tuple[str, ...]] = [()] * b
  for j, r in zip(valid, records):
    labels[j] = tuple(r['labels'])
  instance_label = np.full(b, '', dtype=object)
  instance_index = np.full(b, -1, np.int32)
  if rows.instance_label is not None:
    instance_label[valid] = [rows.instance_label[i] for i in wanted]
    instance_index[valid] = [rows.instance_index[i] for i in wanted]
  return EvalBatch(
      inputs,
      row_ids.copy(),
      item_id.astype(str),
      labels,
      instance_label.astype(str),
      instance_index,
  )


def iterate_rows(
    config: ml_collections.ConfigDict,
    source: source_lib.Product1MSource,
    rows: EvalRows,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    batch_size: int | None = None,
) -> Iterator[EvalBatch]:
  """`EvalBatch`es of `rows` (see the module docstring); a Grain iterator, seekable with
  `set_state({'next_index': batch})`.

  Args:
    batch_size: global (default config.data.eval_batch_size).
  """
  index, count = source_lib.process_shard(process_index, process_count)
  per_process = source_lib.per_process_batch(batch_size or config.data.eval_batch_size, count)
  spec = collate_lib.make_batch_spec(config)
  plan = batch_plan(len(rows), per_process, index, count)
  ds = grain.MapDataset.source(list(plan)).map(
      functools.partial(_load_batch, source, rows=rows, spec=spec)
  )
  return iter(ds.to_iter_dataset(source_lib.read_options(config)))


def make_eval_iterator(
    config: ml_collections.ConfigDict,
    split: str,
    *,
    source: source_lib.Product1MSource | None = None,
    **kwargs: Any,
) -> Iterator[EvalBatch]:
  """`EvalBatch`es of every sample of a split in file order (`iterate_rows` of `sample_rows`)."""
  source = source or source_lib.make_source(config, split)
  return iterate_rows(config, source, sample_rows(source), **kwargs)


def make_instance_eval_iterator(
    config: ml_collections.ConfigDict,
    split: str,
    *,
    instances: Mapping[str, Sequence[formats.Instance]] | str | None = None,
    source: source_lib.Product1MSource | None = None,
    **kwargs: Any,
) -> Iterator[EvalBatch]:
  """`EvalBatch`es with one row per product instance of each sample (`instance_rows`).

  Args:
    instances: item_id -> instances, or a sidecar path; default
      `sidecar_path(config, split)`.
  """
  source = source or source_lib.make_source(config, split)
  if instances is None or isinstance(instances, str):
    instances = formats.read_instances(instances or sidecar_path(config, split))
  rows = instance_rows(source, instances, config.data.max_regions)
  return iterate_rows(config, source, rows, **kwargs)
