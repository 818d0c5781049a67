r"""Embedding export: a checkpoint's retrieval embeddings of one split, in sharded `.npz` files.

    python -m capture_jax.export --config=configs/demo.py --workdir=runs/demo --split=gallery \
        [--checkpoint=STEP] [--out=DIR] [--instances] [--random_init] [--overwrite] \
        [--config.eval.embedding=fused|text|visual|encoder]

The program, in the order it runs: checks of the request (split, kind, the
split's data and instance sidecar, the checkpoint and its config) before
anything compiles; mesh over whatever devices are present; the inference
step compiled with explicit shardings; the checkpoint's model parameters
restored onto the mesh (only the parameters, not the optimizer state); then
the loop over the shards still missing. Evaluation batches are unmasked and
the model runs with train=False (no dropout); the last batch is padded and
its padding rows are dropped. Rows are written in split order whatever the
number of devices or processes (process p reads rows p, p + n, ...; rows are
put back in order by their position before writing). Re-running the same
command skips shards already written, so an interrupted export resumes.

Output (default `{workdir}/embeddings/step_{STEP}/{kind}/{split}`, with a
`-instances` suffix for instance rows and `random_init` for `--random_init`):
see `capture_jax.evaluation.embeddings` for the format.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags
from ml_collections import config_flags

from capture_jax.data import formats
from capture_jax.data import pipeline
from capture_jax.evaluation import embeddings as emb_lib
from capture_jax.models.capture import BATCH_KEYS
from capture_jax.training import checkpoint as checkpoint_lib
from capture_jax.training import sharding


@dataclasses.dataclass
class ExportResult:
  out_dir: Path
  metadata: dict[str, Any]
  written: list[int]  # shard indices computed by this call
  reused: bool  # the export was complete already: nothing was computed
  samples_per_s: float | None  # rows embedded per second by this call (data reading included)


# --------------------------------------------------------------------------
# Checks and the checkpoint.


def validate_request(config: ml_collections.ConfigDict, split: str, rows: str) -> None:
  problems = []
  if split not in formats.SPLITS:
    problems.append(f'split must be one of {formats.SPLITS}, got {split!r}')
  if rows not in emb_lib.ROW_KINDS:
    problems.append(f'rows must be one of {emb_lib.ROW_KINDS}, got {rows!r}')
  if config.eval.embedding not in emb_lib.EMBEDDING_KINDS:
    problems.append(
        f'eval.embedding must be one of {emb_lib.EMBEDDING_KINDS}, got {config.eval.embedding!r}'
    )
  if config.eval.shard_size < 1:
    problems.append(f'eval.shard_size must be positive, got {config.eval.shard_size}')
  if config.data.feature_dim != config.model.v_feature_size:
    problems.append(
        f'data.feature_dim={config.data.feature_dim} differs from '
        f'model.v_feature_size={config.model.v_feature_size}'
    )
  if problems:
    raise ValueError('bad export request:\n  - ' + '\n  - '.join(problems))


def open_checkpoints(
    workdir: str | Path, config: ml_collections.ConfigDict, step: int | None = None
) -> tuple[ocp.CheckpointManager, int]:
  """The workdir's checkpoint manager and the step to load (latest by default).

  Raises FileNotFoundError when there is no checkpoint (or not that step) and
  `checkpoint.IncompatibleCheckpointError` when the checkpoint is of another
  model, both before anything compiles.
  """
  ckpt_dir = checkpoint_lib.checkpoint_dir(workdir)
  if not ckpt_dir.is_dir():
    raise FileNotFoundError(
        f'no checkpoint in {Path(workdir)}: {ckpt_dir} does not exist. Train first '
        f"(python -m capture_jax.train --workdir={workdir}), or pass the run's --workdir."
    )
  manager = checkpoint_lib.make_manager(workdir, config.checkpoint)
  steps = sorted(manager.all_steps())
  if not steps:
    manager.close()
    raise FileNotFoundError(
        f'no checkpoint in {ckpt_dir}; train first (python -m capture_jax.train)'
    )
  if step is None:
    step = steps[-1]
  elif step not in steps:
    manager.close()
    raise FileNotFoundError(f'no checkpoint of step {step} in {ckpt_dir}; it holds steps {steps}')
  check_step_compatible(manager, config, step)
  return manager, int(step)


def check_step_compatible(
    manager: ocp.CheckpointManager, config: ml_collections.ConfigDict, step: int
) -> None:
  """`checkpoint.check_compatible` for a given step (not only the latest)."""
  saved = checkpoint_lib.saved_model_config(manager, step)
  ours = config.model.to_dict()
  diffs = [
      f'model.{k}: checkpoint {saved.get(k)!r}, config {v!r}'
      for k, v in ours.items()
      if k not in checkpoint_lib.LAYOUT_NEUTRAL_FIELDS and saved.get(k) != v
  ]
  if diffs:
    raise checkpoint_lib.IncompatibleCheckpointError(
        f'the checkpoint of step {step} in {manager.directory} is of a different model: '
        + '; '.join(diffs)
        + '. Pass the config the run was trained with.'
    )


def restore_model_params(
    manager: ocp.CheckpointManager, step: int, embedder: emb_lib.Embedder
) -> Any:
  """Only `state.params['model']` of a checkpoint, placed in the embedder's shardings (Orbax partial
  restore: the optimizer state is not read)."""
  target = {'params': {'model': embedder.abstract_params}}
  restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), target)
  restored = manager.restore(
      step,
      args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
      ),
  )
  return restored['state']['params']['model']


def random_model_params(config: ml_collections.ConfigDict, embedder: emb_lib.Embedder) -> Any:
  """The untrained model (`train.initial_params(config, PRNGKey(config.seed))['model']`), created
  directly in its shardings."""
  init = jax.jit(
      lambda k: emb_lib.initial_model_params(config, k), out_shardings=embedder.param_shardings
  )
  return init(jax.random.PRNGKey(config.seed))


def default_out_dir(
    workdir: str | Path, kind: str, split: str, rows: str, step: int | None
) -> Path:
  tag = 'random_init' if step is None else f'step_{step}'
  return (
      Path(workdir)
      / 'embeddings'
      / tag
      / kind
      / (split + ('-instances' if rows == 'instances' else ''))
  )


# --------------------------------------------------------------------------
# Rows of a split.


@dataclasses.dataclass
class SplitRows:
  """What the iterator will yield, row by row: item ids (and instance labels and indices)."""

  item_id: list[str]
  instance_label: list[str] | None = None
  instance_index: list[int] | None = None

  def __len__(self) -> int:
    return len(self.item_id)


def instances_path(config: ml_collections.ConfigDict, split: str) -> Path:
  return Path(config.data.data_dir) / formats.instances_filename(split)


def split_rows(
    config: ml_collections.ConfigDict, source: pipeline.Product1MSource, rows: str
) -> SplitRows:
  """The rows of `make_eval_iterator` or `make_instance_eval_iterator`, in order.

  For instances this restates the iterator's rule (samples of the sidecar,
  instances with at least one region below data.max_regions); the export
  checks every batch against it, so a change in the pipeline cannot go
  unnoticed.
  """
  item_ids = pipeline.read_split_item_ids(source)
  if rows == 'samples':
    return SplitRows(item_ids)
  path = instances_path(config, source.split)
  if not path.is_file():
    raise FileNotFoundError(
        f'instance-level rows need the instance sidecar {path}, which does not exist '
        f"(set eval.query_mode='whole' to evaluate whole-sample queries only)"
    )
  instances = formats.read_instances(str(path))
  out = SplitRows([], [], [])
  for item_id in item_ids:
    for k, inst in enumerate(instances.get(item_id, ())):
      if any(r < config.data.max_regions for r in inst.regions):
        out.item_id.append(item_id)
        out.instance_label.append(inst.label)
        out.instance_index.append(k)
  return out


def make_iterator(
    config: ml_collections.ConfigDict,
    split: str,
    rows: str,
    source,
    process_index: int,
    process_count: int,
):
  kwargs = dict(
      process_index=process_index,
      process_count=process_count,
      batch_size=config.data.eval_batch_size,
      source=source,
  )
  if rows == 'instances':
    return pipeline.make_instance_eval_iterator(
        config, split, instances=str(instances_path(config, split)), **kwargs
    )
  return pipeline.make_eval_iterator(config, split, **kwargs)


# --------------------------------------------------------------------------
# The export.


def export_split(
    config: ml_collections.ConfigDict,
    split: str,
    out_dir: str | Path,
    embedder: emb_lib.Embedder,
    model_params: Any,
    *,
    rows: str = 'samples',
    checkpoint_step: int | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    source: pipeline.Product1MSource | None = None,
    plan_rows: SplitRows | None = None,
) -> ExportResult:
  """Embeds one split with `model_params` into `out_dir`, computing only the shards not written yet.

  Args:
    checkpoint_step: recorded in the metadata; None means the random
      initialisation (`weights: random_init`, with the config seed).
    overwrite: recompute every shard, replacing whatever export `out_dir`
      holds (otherwise an export of something else there is an error, and
      the shards of the same export are kept).
  Returns:
    what was written; an export that was complete already is left as it is
    (`reused=True`).
  """
  validate_request(config, split, rows)
  out_dir = Path(out_dir)
  is_main = jax.process_index() == 0
  mesh = embedder.mesh
  source = source or pipeline.make_source(config, split)
  plan_rows = plan_rows if plan_rows is not None else split_rows(config, source, rows)
  n = len(plan_rows)
  b = embedder.batch_size
  plan = export_plan(config, split, rows, embedder.kind, checkpoint_step, n)
  shard_rows, num_shards = plan['shard_rows'], plan['num_shards']
  existing = emb_lib.read_metadata(out_dir)
  if existing is not None and not overwrite:
    done = completed_export(out_dir, plan)
    if done is not None:
      return ExportResult(out_dir, done, [], True, None)
    diffs = emb_lib.identity_diffs(existing, plan)
    if diffs:
      raise ValueError(
          f'{out_dir} holds another export ({"; ".join(diffs)}; existing vs requested); '
          'pass --overwrite to replace it, or another --out'
      )
  if is_main:
    if existing is not None and overwrite:  # start afresh: remove this folder's export files only
      for path in out_dir.glob('shard-*-of-*.npz'):
        path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    emb_lib.write_metadata(out_dir, {**plan, 'complete': False})

  p, nproc = jax.process_index(), jax.process_count()
  if nproc > 1:  # every process sees the same shard files from here on
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    multihost_utils.sync_global_devices(f'export start {out_dir}')
  missing = [
      s for s in range(num_shards) if not (out_dir / emb_lib.shard_name(s, num_shards)).is_file()
  ]
  per = b // nproc
  batches_per_shard = shard_rows // b
  num_batches = pipeline.num_eval_batches(n, per, nproc) if n else 0
  iterator = make_iterator(config, split, rows, source, p, nproc) if missing else None
  next_batch = 0
  show = config.eval.progress_bar if progress is None else progress
  bar = None
  if is_main and show and missing:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel

    to_do = sum(min((s + 1) * shard_rows, n) - s * shard_rows for s in missing)
    bar = tqdm(total=to_do, desc=f'embedding {split} {rows}', unit='row', dynamic_ncols=True)
  start = time.perf_counter()
  for s in missing:
    first, last = s * batches_per_shard, min((s + 1) * batches_per_shard, num_batches)
    if next_batch != first:
      _seek(iterator, next_batch, first)
    outputs = []
    for batch_index in range(first, last):
      local = next(iterator)
      ordinal = (p + nproc * (batch_index * per + np.arange(per))).astype(np.int32)
      _check_batch(local, ordinal, plan_rows, split)
      global_batch = sharding.global_batch_from_local(
          {**{k: local.inputs[k] for k in BATCH_KEYS}, 'ordinal': ordinal}, mesh
      )
      ordinals = global_batch.pop('ordinal')
      outputs.append((embedder(model_params, global_batch), ordinals))  # dispatched asynchronously
    next_batch = last
    vectors, ordinals = _to_host(outputs)
    keep = ordinals < n
    vectors, ordinals = vectors[keep], ordinals[keep]
    order = np.argsort(ordinals, kind='stable')
    vectors, ordinals = vectors[order], ordinals[order]
    expected = np.arange(s * shard_rows, min((s + 1) * shard_rows, n))
    if not np.array_equal(ordinals, expected):
      raise RuntimeError(f'shard {s}: got rows {ordinals[:5]}..., expected {expected[:5]}...')
    if is_main:
      arrays = {
          'embeddings': vectors.astype(np.float32),
          'row': ordinals,
          'item_id': np.array([plan_rows.item_id[i] for i in ordinals], dtype=str),
      }
      if rows == 'instances':
        arrays['instance_label'] = np.array(
            [plan_rows.instance_label[i] for i in ordinals], dtype=str
        )
        arrays['instance_index'] = np.array(
            [plan_rows.instance_index[i] for i in ordinals], np.int32
        )
      emb_lib.write_shard(out_dir / emb_lib.shard_name(s, num_shards), arrays)
    if bar is not None:
      bar.update(len(expected))
  elapsed = time.perf_counter() - start
  if bar is not None:
    bar.close()
  computed = sum(min((s + 1) * shard_rows, n) - s * shard_rows for s in missing)
  rate = computed / elapsed if computed and elapsed > 0 else None
  if nproc > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    multihost_utils.sync_global_devices(f'export {out_dir}')
  metadata = {
      **plan,
      'complete': True,
      'samples_per_s': rate,
      'devices': jax.device_count(),
      'processes': nproc,
      'eval_batch_size': b,
      'data': {'tfds_dir': config.data.tfds_dir, 'data_dir': config.data.data_dir},
      'created': time.strftime('%Y-%m-%dT%H:%M:%S'),
  }
  if is_main:
    if n == 0:
      print(f'WARNING: split {split!r} has no {rows} rows: the export is empty', flush=True)
    emb_lib.write_metadata(out_dir, metadata)
  return ExportResult(out_dir, metadata, missing, False, rate)


def export_plan(
    config: ml_collections.ConfigDict,
    split: str,
    rows: str,
    kind: str,
    checkpoint_step: int | None,
    count: int,
) -> dict[str, Any]:
  """The identity of an export (`embeddings.IDENTITY_FIELDS`): what is embedded, with what, how it is cut."""
  b = config.data.eval_batch_size
  shard_rows = math.ceil(config.eval.shard_size / b) * b  # whole batches per shard
  return {
      'format_version': emb_lib.FORMAT_VERSION,
      'split': split,
      'rows': rows,
      'kind': kind,
      'dimension': emb_lib.embedding_dim(config.model, kind),
      'weights': 'random_init' if checkpoint_step is None else 'checkpoint',
      'checkpoint_step': checkpoint_step,
      'seed': config.seed if checkpoint_step is None else None,
      'model': config.model.to_dict(),
      'count': count,
      'shard_rows': shard_rows,
      'num_shards': math.ceil(count / shard_rows),
  }


def completed_export(out_dir: str | Path, plan: dict[str, Any]) -> dict[str, Any] | None:
  """The metadata of a complete export in `out_dir` of the same rows, kind and weights, else None.

  How the rows were cut into shards does not matter once every shard is there.
  """
  meta = emb_lib.read_metadata(out_dir)
  if meta is None or not meta.get('complete'):
    return None
  ignore = {'shard_rows', 'num_shards'}
  if any(meta.get(k) != plan.get(k) for k in emb_lib.IDENTITY_FIELDS if k not in ignore):
    return None
  shards = int(meta['num_shards'])
  if not all((Path(out_dir) / emb_lib.shard_name(s, shards)).is_file() for s in range(shards)):
    return None
  return meta


def _seek(iterator, current: int, target: int) -> None:
  """Moves a Grain iterator to batch `target` without reading the batches in between when it can."""
  if hasattr(iterator, 'set_state'):
    iterator.set_state({'next_index': target})
    return
  if target < current:
    raise RuntimeError('cannot rewind this iterator')
  for _ in range(target - current):
    next(iterator)


def _check_batch(
    local: pipeline.EvalBatch, ordinal: np.ndarray, plan_rows: SplitRows, split: str
) -> None:
  """The batch holds the rows the export expects (validity, item ids, instances)."""
  n = len(plan_rows)
  valid = ordinal < n
  if not np.array_equal(local.is_valid.astype(bool), valid):
    raise RuntimeError(f'{split}: the evaluation iterator padded other rows than expected')
  got = [str(x) for x in local.item_id[valid]]
  want = [plan_rows.item_id[i] for i in ordinal[valid]]
  if got != want:
    raise RuntimeError(
        f'{split}: the evaluation iterator yielded items {got[:3]}..., expected {want[:3]}...'
    )
  if plan_rows.instance_label is not None:
    got = list(zip(map(str, local.instance_label[valid]), map(int, local.instance_index[valid])))
    want = [(plan_rows.instance_label[i], plan_rows.instance_index[i]) for i in ordinal[valid]]
    if got != want:
      raise RuntimeError(
          f'{split}: the instance iterator yielded {got[:3]}..., expected {want[:3]}...'
      )


def _to_host(outputs: Sequence[tuple[jax.Array, jax.Array]]) -> tuple[np.ndarray, np.ndarray]:
  """Global `[B, D]` embeddings and `[B]` row positions -> host numpy on every process."""
  if not outputs:
    return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    outputs = multihost_utils.process_allgather(list(outputs), tiled=True)
  vectors = np.concatenate([np.asarray(v) for v, _ in outputs])
  ordinals = np.concatenate([np.asarray(o) for _, o in outputs]).astype(np.int64)
  return vectors, ordinals


def export(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    split: str,
    *,
    step: int | None = None,
    out: str | Path | None = None,
    rows: str = 'samples',
    random_init: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
    devices=None,
) -> ExportResult:
  """The `capture_jax.export` command: checks, mesh, compiled step, parameters, then `export_split`.

  Everything that can be wrong with the request (split, sidecar, checkpoint,
  config) is reported before anything compiles, and a complete export of the
  same rows, kind and weights is left as it is without compiling.
  """
  validate_request(config, split, rows)
  is_main = jax.process_index() == 0
  source = pipeline.make_source(config, split)  # a split that was not built fails here
  plan_rows = split_rows(config, source, rows)  # and a missing instance sidecar here
  manager = None
  if not random_init:
    manager, step = open_checkpoints(workdir, config, step)
  else:
    step = None
  kind = config.eval.embedding
  out_dir = Path(out) if out else default_out_dir(workdir, kind, split, rows, step)
  what = 'random initialisation' if step is None else f'checkpoint step {step}'
  plan = export_plan(config, split, rows, kind, step, len(plan_rows))
  existing = emb_lib.read_metadata(out_dir)
  if existing is not None and not overwrite:
    done = completed_export(out_dir, plan)
    if done is not None:
      if manager is not None:
        manager.close()
      if is_main:
        print(f'{out_dir} already holds this export ({what}); nothing to do', flush=True)
      return ExportResult(out_dir, done, [], True, None)
    diffs = emb_lib.identity_diffs(existing, plan)
    if diffs:
      if manager is not None:
        manager.close()
      raise ValueError(
          f'{out_dir} holds another export ({"; ".join(diffs)}; existing vs requested); '
          'pass --overwrite to replace it, or another --out'
      )

  mesh = sharding.make_mesh(config.mesh, devices)
  embedder = emb_lib.make_embedder(config, mesh)
  if is_main:
    print(
        f'compiled the embedding step ({embedder.kind}, {embedder.dimension}-d, global batch '
        f'{embedder.batch_size}, {jax.device_count()} devices) in {embedder.compile_s:.1f} s',
        flush=True,
    )
  if random_init:
    params = random_model_params(config, embedder)
  else:
    params = restore_model_params(manager, step, embedder)
    manager.close()
  result = export_split(
      config,
      split,
      out_dir,
      embedder,
      params,
      rows=rows,
      checkpoint_step=step,
      overwrite=overwrite,
      progress=progress,
      source=source,
      plan_rows=plan_rows,
  )
  if is_main:
    rate = f'; {result.samples_per_s:.1f} samples/s' if result.samples_per_s else ''
    print(
        f'wrote {len(result.written)} of {result.metadata["num_shards"]} shards '
        f'({result.metadata["count"]} {rows} rows of {split}, {what}) to {out_dir}{rate}',
        flush=True,
    )
  return result


# --------------------------------------------------------------------------
# Command line.


def define_flags() -> dict[str, Any]:
  """The command's flags (defined when the command runs, not on import, so that the package's
  modules can be imported together)."""
  return {
      'config': config_flags.DEFINE_config_file(
          'config', None, 'A configs/*.py file.', lock_config=True
      ),
      'workdir': flags.DEFINE_string(
          'workdir', None, 'Run directory with checkpoints/ (and embeddings/).'
      ),
      'split': flags.DEFINE_enum('split', 'gallery', list(formats.SPLITS), 'Split to embed.'),
      'checkpoint': flags.DEFINE_integer(
          'checkpoint', None, 'Checkpoint step (default: the latest).'
      ),
      'out': flags.DEFINE_string(
          'out', None, 'Output folder (default {workdir}/embeddings/step_{STEP}/{kind}/{split}).'
      ),
      'instances': flags.DEFINE_bool(
          'instances', False, 'One row per product instance (instance queries).'
      ),
      'random_init': flags.DEFINE_bool(
          'random_init', False, 'Embed with the untrained model (config seed).'
      ),
      'overwrite': flags.DEFINE_bool(
          'overwrite',
          False,
          'Recompute every shard, replacing whatever export the output folder holds.',
      ),
  }


def main(args: dict[str, Any]) -> None:
  from capture_jax.training import distributed  # pylint: disable=import-outside-toplevel

  distributed.initialize()
  try:
    export(
        args['config'].value,
        args['workdir'].value,
        args['split'].value,
        step=args['checkpoint'].value,
        out=args['out'].value,
        rows='instances' if args['instances'].value else 'samples',
        random_init=args['random_init'].value,
        overwrite=args['overwrite'].value,
    )
  except (FileNotFoundError, ValueError) as e:  # bad input: one clear line, no traceback
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


def console_main() -> None:
  args = define_flags()
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(lambda argv: main(args))


if __name__ == '__main__':
  console_main()
