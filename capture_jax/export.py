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
its padding rows are dropped. Rows are written in the order of their plan
(`eval_input.EvalRows`) whatever the number of devices or processes: every
batch says which rows of the plan it holds, and a shard's rows are put back
in order before it is written. Re-running the same command skips shards
already written, so an interrupted export resumes.

What identifies an export (`export_plan`) includes a fingerprint of what it
embedded (`inputs_fingerprint`: the built split's files, the vocab, the
sidecar, the input sizes) and of the checkpoint save (`checkpoint_id`). When
the output folder holds an export of something else: in the default folder
(ours, under `{workdir}/embeddings`) it is replaced, saying what changed; in
a folder given with `--out` it is refused unless `--overwrite`. A shard that
no longer reads (truncated) is redone; temporary files left by a killed
export are removed. The output folder is locked while an export writes
into it (a second export into it is refused, naming the first), and
non-finite embeddings are refused, naming the split and how many rows.

Output (default `{workdir}/embeddings/step_{STEP}/{kind}/{split}`, with a
`-instances` suffix for instance rows and `random_init` for `--random_init`):
see `capture_jax.evaluation.embeddings` for the format.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import math
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from capture_jax import cli
from capture_jax import config as config_lib
from capture_jax import batch as batch_lib
from capture_jax import instances as instances_lib
from capture_jax import progress as progress_lib
from capture_jax import storage
from capture_jax.data import eval_input
from capture_jax.data import formats
from capture_jax.data import product1m_tfds
from capture_jax.data import source as source_lib
from capture_jax.evaluation import embeddings as emb_lib
from capture_jax.training import distributed
from capture_jax.training import checkpoint as checkpoint_lib
from capture_jax.training import lock as lock_lib
from capture_jax.training import sharding
from capture_jax.training import state as state_lib

LOCK_FILE = '.export.lock'


class NonFiniteEmbeddingsError(ValueError):
  """The model produced NaN or inf embeddings: its parameters are not usable."""


@dataclasses.dataclass
class ExportResult:
  out_dir: storage.Path
  metadata: dict[str, Any]
  written: list[int]  # shard indices computed by this call
  reused: bool  # the export was complete already: nothing was computed
  samples_per_s: float | None  # rows embedded per second by this call (data reading included)


# --------------------------------------------------------------------------
# Checks, the rows to embed, and the weights.


def validate_request(config: ml_collections.ConfigDict, split: str, rows: str) -> None:
  problems = []
  if split not in formats.SPLITS:
    problems.append(f'split must be one of {formats.SPLITS}, got {split!r}')
  if rows not in eval_input.ROW_KINDS:
    problems.append(f'rows must be one of {eval_input.ROW_KINDS}, got {rows!r}')
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


def plan_rows(
    config: ml_collections.ConfigDict,
    source: source_lib.Product1MSource,
    rows: str,
    *,
    workdir: storage.PathLike | None = None,
    proposer: str | None = None,
) -> eval_input.EvalRows:
  """The rows to embed: every sample of the split, or every product instance of its samples.

  Instances come from `proposer` (default `eval.instances`; see
  `capture_jax.instances.resolve_method`): the learned proposer of `workdir`,
  the box rule, or the synthetic world's sidecar (`oracle`, an upper bound).
  """
  if rows == 'samples':
    return eval_input.sample_rows(source)
  method = instances_lib.resolve_method(proposer or config.eval.instances, workdir)
  found = instances_lib.propose_split(config, source.split, method, workdir, source)
  planned = eval_input.instance_rows(source, found, config.data.max_regions)
  return dataclasses.replace(planned, proposer=proposer_tag(method, workdir))


def proposer_tag(method: str, workdir: storage.PathLike | None) -> str:
  """What identifies a proposer's instances: its name, with the checkpoint step for `learned`
  (a retrained proposer groups regions differently: its exports are other exports)."""
  if method != 'learned':
    return method
  return f'learned-{instances_lib.latest_proposer_step(workdir)}'


def random_model_params(config: ml_collections.ConfigDict, embedder: emb_lib.Embedder) -> Any:
  """The untrained model (`state.initial_params(config, PRNGKey(config.seed))['model']`), created
  directly in its shardings."""
  init = jax.jit(
      lambda k: state_lib.initial_params(config, k)['model'], out_shardings=embedder.param_shardings
  )
  return init(jax.random.PRNGKey(config.seed))


def default_out_dir(
    workdir: storage.PathLike,
    kind: str,
    split: str,
    rows: str,
    step: int | None,
    proposer: str = '',
) -> storage.Path:
  """`{workdir}/embeddings/{step_S|random_init}/{kind}/{split}[-instances-{proposer}]`."""
  tag = 'random_init' if step is None else f'step_{step}'
  name = split + (f'-instances-{proposer}' if rows == 'instances' else '')
  return storage.as_path(workdir) / 'embeddings' / tag / kind / name


# --------------------------------------------------------------------------
# What is in the output folder already.


def _sha256_file(path: str | Path) -> str | None:
  if not path or not os.path.isfile(path):
    return None
  with open(path, 'rb') as f:
    return hashlib.file_digest(f, 'sha256').hexdigest()


def inputs_fingerprint(config: ml_collections.ConfigDict, split: str, rows: str) -> dict[str, Any]:
  """What an export embedded, besides the model: the fields that change its rows or vectors.

  The built split is identified by its ArrayRecord files' names, sizes and
  modification times (a rebuild rewrites them) and the hash of the build's
  `dataset_info.json`; hashing the files themselves would read the whole
  dataset (hundreds of GB of features at full scale) on every evaluation.
  The vocab and the instance sidecar are small: their SHA-256 is used.
  """
  d = config.data
  classes = config.model.mrm_target == 'class'
  built = Path(product1m_tfds.dataset_dir(d.tfds_dir, d.storage_dtype, classes))
  files = sorted(built.glob(f'*-{split}.array_record-*')) if built.is_dir() else []
  listing = '\n'.join(f'{p.name} {p.stat().st_size} {p.stat().st_mtime_ns}' for p in files)
  return {
      'max_text_len': d.max_text_len,
      'max_regions': d.max_regions,
      'storage_dtype': d.storage_dtype,
      'vocab_sha256': _sha256_file(d.vocab_file),
      'dataset_info_sha256': _sha256_file(built / 'dataset_info.json'),
      'split_files': hashlib.sha256(listing.encode()).hexdigest(),
      'sidecar_sha256': (
          _sha256_file(eval_input.sidecar_path(config, split)) if rows == 'instances' else None
      ),
  }


def export_plan(
    config: ml_collections.ConfigDict,
    split: str,
    rows: str,
    kind: str,
    checkpoint_step: int | None,
    count: int,
    proposer: str = '',
    checkpoint_id: str | None = None,
    instances_sha256: str | None = None,
) -> dict[str, Any]:
  """The identity of an export (`embeddings.IDENTITY_FIELDS`): what is embedded, with what, how it is cut.

  `checkpoint_id` (`checkpoint.checkpoint_fingerprint`) tells apart two saves
  of the same step (two runs, or a step saved again after a corrupt one);
  `instances_sha256` (`instances_fingerprint`) two groupings of the same
  split by one proposer (other thresholds or rule settings).
  """
  b = config.data.eval_batch_size
  shard_rows = math.ceil(config.eval.shard_size / b) * b  # whole batches per shard
  return {
      'format_version': emb_lib.FORMAT_VERSION,
      'split': split,
      'rows': rows,
      'kind': kind,
      'text_weight': emb_lib.text_weight(config, kind),
      'dimension': emb_lib.embedding_dim(config.model, kind),
      'weights': 'random_init' if checkpoint_step is None else 'checkpoint',
      'checkpoint_step': checkpoint_step,
      'checkpoint_id': checkpoint_id,
      'seed': config.seed if checkpoint_step is None else None,
      'model': config.model.to_dict(),
      'inputs': inputs_fingerprint(config, split, rows),
      'count': count,
      'proposer': proposer or None,  # None for sample rows (as in exports before proposers)
      'instances_sha256': instances_sha256,
      'shard_rows': shard_rows,
      'num_shards': math.ceil(count / shard_rows),
  }


def rows_plan(
    config: ml_collections.ConfigDict,
    rows: eval_input.EvalRows,
    kind: str,
    checkpoint_step: int | None,
    checkpoint_id: str | None = None,
) -> dict[str, Any]:
  """`export_plan` of planned rows."""
  return export_plan(
      config,
      rows.split,
      rows.kind,
      kind,
      checkpoint_step,
      len(rows),
      rows.proposer,
      checkpoint_id,
      instances_fingerprint(rows),
  )


def instances_fingerprint(rows: eval_input.EvalRows) -> str | None:
  """SHA-256 of the instance rows' (item id, regions), None for sample rows: an export of
  instances grouped otherwise (a proposer's thresholds changed) is another export."""
  if rows.kind != 'instances':
    return None
  text = '\n'.join(f'{i} {" ".join(map(str, r))}' for i, r in zip(rows.item_id, rows.regions))
  return hashlib.sha256(text.encode()).hexdigest()


def shard_readable(path: storage.PathLike) -> bool:
  """Whether a shard file is there and opens as a whole `.npz` (a truncated zip has no central
  directory). Bytes flipped inside are caught by the zip CRC when the export is read."""
  path = storage.as_path(path)
  try:
    with path.open('rb') as f, zipfile.ZipFile(f) as z:
      return 'embeddings.npy' in z.namelist()
  except (OSError, zipfile.BadZipFile):
    return False


def completed_export(out_dir: storage.PathLike, plan: dict[str, Any]) -> dict[str, Any] | None:
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
  out_dir = storage.as_path(out_dir)
  if not all(shard_readable(out_dir / emb_lib.shard_name(s, shards)) for s in range(shards)):
    return None
  return meta


def reusable_export(
    out_dir: storage.Path, plan: dict[str, Any], overwrite: bool, replace_other: bool = False
) -> dict[str, Any] | None:
  """What to do with `out_dir` before embedding into it, decided before anything compiles.

  Returns the metadata of a complete export of the same plan (nothing to
  compute), or None (compute the missing shards, or all when the folder is
  to be replaced). A folder holding another export is replaced with
  `overwrite` or `replace_other` (the default folder of this checkpoint,
  split and kind: ours, so what differs is the data or the checkpoint save,
  and the old vectors are stale), saying what differs; otherwise it is a
  ValueError naming the differences.
  """
  existing = emb_lib.read_metadata(out_dir)
  if existing is None or overwrite:
    return None
  done = completed_export(out_dir, plan)
  if done is not None:
    return done
  diffs = emb_lib.identity_diffs(existing, plan)
  if diffs and not replace_other:
    raise ValueError(
        f'{out_dir} holds another export ({"; ".join(diffs)}; existing vs requested); '
        'pass --overwrite to replace it, or another --out'
    )
  if diffs and distributed.is_main_process():
    print(
        f'{out_dir} holds an export of something else ({"; ".join(diffs)}; existing vs now): '
        'exporting again',
        flush=True,
    )
  return None


def stale_export(out_dir: storage.Path, plan: dict[str, Any]) -> bool:
  """Whether `out_dir` holds an export whose identity differs from `plan` (it is replaced)."""
  existing = emb_lib.read_metadata(out_dir)
  return existing is not None and bool(emb_lib.identity_diffs(existing, plan))


def _remove_leftovers(out_dir: storage.Path, remove_shards: bool) -> None:
  """Temporary files of a killed export (and with `remove_shards` the shards of a replaced one)."""
  patterns = ['.shard-*.tmp-*', f'.{emb_lib.METADATA_FILE}.tmp-*']
  if remove_shards:
    patterns.append('shard-*-of-*.npz')
  for pattern in patterns:
    for path in out_dir.glob(pattern):
      path.unlink()


# --------------------------------------------------------------------------
# The export.


def export_split(
    config: ml_collections.ConfigDict,
    out_dir: storage.PathLike,
    embedder: emb_lib.Embedder,
    model_params: Any,
    source: source_lib.Product1MSource,
    rows: eval_input.EvalRows,
    *,
    checkpoint_step: int | None = None,
    checkpoint_id: str | None = None,
    overwrite: bool = False,
    replace_other: bool = False,
    progress: bool | None = None,
) -> ExportResult:
  """Embeds `rows` of `source` with `model_params` into `out_dir`, computing only the shards
  not written yet.

  Args:
    checkpoint_step: recorded in the metadata; None means the random
      initialisation (`weights: random_init`, with the config seed).
    checkpoint_id: the checkpoint save's fingerprint, recorded in the metadata.
    overwrite: recompute every shard, replacing whatever export `out_dir`
      holds (otherwise an export of something else there is an error, and
      the shards of the same export are kept).
    replace_other: replace an export of something else (see `reusable_export`).
  Returns:
    what was written; an export that was complete already is left as it is
    (`reused=True`).
  """
  validate_request(config, rows.split, rows.kind)
  out_dir = storage.as_path(out_dir)
  plan = rows_plan(config, rows, embedder.kind, checkpoint_step, checkpoint_id)
  with lock_lib.FolderLock(out_dir, LOCK_FILE, 'export'):
    done = distributed.decide_on_main(
        lambda: reusable_export(out_dir, plan, overwrite, replace_other)
    )
    if done is not None:
      return ExportResult(out_dir, done, [], True, None)
    return _export_locked(
        config, out_dir, embedder, model_params, source, rows, plan, overwrite, progress
    )


def _export_locked(
    config, out_dir, embedder, model_params, source, rows, plan, overwrite, progress
) -> ExportResult:
  """`export_split` once the folder is locked and known to need (some) shards."""
  is_main = distributed.is_main_process()
  n = len(rows)
  shard_rows, num_shards = plan['shard_rows'], plan['num_shards']
  if is_main:
    storage.makedirs(out_dir)
    # Start afresh when asked or when the folder holds an export of something else; always
    # drop temporary files a killed export left (the lock says no other export is writing).
    _remove_leftovers(out_dir, remove_shards=overwrite or stale_export(out_dir, plan))
    emb_lib.write_metadata(out_dir, {**plan, 'complete': False})
  _sync(f'export start {out_dir}')  # every process sees the same shard files from here on

  # A shard that does not read as a whole file (truncated) is computed again. Decided on
  # process 0 (it writes the shards): a read error on another process must not give it another
  # list, and so other collectives.
  missing = distributed.decide_on_main(
      lambda: [
          s
          for s in range(num_shards)
          if not shard_readable(out_dir / emb_lib.shard_name(s, num_shards))
      ]
  )
  batches_per_shard = shard_rows // embedder.batch_size
  iterator = None
  if missing:
    iterator = eval_input.iterate_rows(config, source, rows, batch_size=embedder.batch_size)
  show = config.eval.progress_bar if progress is None else progress
  shard_sizes = {s: min((s + 1) * shard_rows, n) - s * shard_rows for s in missing}
  bar = progress_lib.Progress(
      sum(shard_sizes.values()),
      f'embedding {rows.split} {rows.kind}',
      'row',
      enabled=is_main and show and bool(missing),
  )
  start = time.perf_counter()
  next_batch = 0
  for s in missing:
    first = s * batches_per_shard
    if next_batch != first:
      iterator.set_state({'next_index': first})  # Grain: seek without reading the batches between
    vectors, row_ids = _embed_batches(iterator, batches_per_shard, embedder, model_params)
    next_batch = first + batches_per_shard
    keep = row_ids >= 0
    order = np.argsort(row_ids[keep], kind='stable')
    vectors, row_ids = vectors[keep][order], row_ids[keep][order]
    expected = np.arange(s * shard_rows, s * shard_rows + shard_sizes[s])
    if not np.array_equal(row_ids, expected):
      raise RuntimeError(f'shard {s}: got rows {row_ids[:5]}..., expected {expected[:5]}...')
    bad = int(np.count_nonzero(~np.isfinite(vectors).all(axis=1)))
    if bad:
      weights = 'random' if plan['checkpoint_step'] is None else f'step {plan["checkpoint_step"]}'
      raise NonFiniteEmbeddingsError(
          f'split {rows.split!r} ({rows.kind}): {bad} of {len(vectors)} rows of shard {s} have '
          f'non-finite (NaN or inf) embeddings with the {weights} weights; the checkpoint is '
          f'not usable (diverged training?). Nothing was written for this shard in {out_dir}.'
      )
    if is_main:
      emb_lib.write_shard(
          out_dir / emb_lib.shard_name(s, num_shards), _shard_arrays(rows, row_ids, vectors)
      )
    bar.update(len(expected))
  elapsed = time.perf_counter() - start
  bar.close()
  computed = sum(shard_sizes.values())
  rate = computed / elapsed if computed and elapsed > 0 else None
  _sync(f'export {out_dir}')
  metadata = {
      **plan,
      'complete': True,
      'samples_per_s': rate,
      'devices': jax.device_count(),
      'processes': jax.process_count(),
      'eval_batch_size': embedder.batch_size,
      'data': {'tfds_dir': config.data.tfds_dir, 'data_dir': config.data.data_dir},
      'created': time.strftime('%Y-%m-%dT%H:%M:%S'),
  }
  if is_main:
    if n == 0:
      print(
          f'WARNING: split {rows.split!r} has no {rows.kind} rows: the export is empty', flush=True
      )
    emb_lib.write_metadata(out_dir, metadata)
  return ExportResult(out_dir, metadata, missing, False, rate)


def _embed_batches(
    iterator: Iterator[eval_input.EvalBatch],
    num_batches: int,
    embedder: emb_lib.Embedder,
    model_params: Any,
) -> tuple[np.ndarray, np.ndarray]:
  """The next `num_batches` global batches -> host `[N, D]` embeddings and `[N]` row ids (-1 at
  padding), gathered from every process in global-batch order."""
  outputs, row_ids = [], []
  for _ in range(num_batches):
    try:
      local = next(iterator)
    except StopIteration:  # the last shard ends before its last whole batch
      break
    global_batch = sharding.global_batch_from_local(
        batch_lib.model_inputs(local.inputs), embedder.mesh
    )
    outputs.append(embedder(model_params, global_batch))  # dispatched asynchronously
    row_ids.append(local.row)
  if not outputs:
    return np.zeros((0, embedder.dimension), np.float32), np.zeros(0, np.int64)
  if jax.process_count() > 1:
    # Process p's rows are the p-th block of each global batch (`global_batch_from_local`), so
    # gathering the host row ids in process order lines them up with the gathered embeddings.
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    outputs = multihost_utils.process_allgather(outputs, tiled=True)
    row_ids = [
        np.asarray(multihost_utils.process_allgather(r, tiled=True)).reshape(-1) for r in row_ids
    ]
  vectors = np.concatenate([np.asarray(v) for v in outputs]).astype(np.float32)
  return vectors, np.concatenate(row_ids).astype(np.int64)


def _shard_arrays(
    rows: eval_input.EvalRows, row_ids: np.ndarray, vectors: np.ndarray
) -> dict[str, np.ndarray]:
  """A shard's arrays (see `capture_jax.evaluation.embeddings`), named from the row plan."""
  arrays = {
      'embeddings': vectors,
      'row': row_ids,
      'item_id': np.array([rows.item_id[i] for i in row_ids], dtype=str),
  }
  if rows.kind == 'instances':
    arrays['instance_label'] = np.array([rows.instance_label[i] for i in row_ids], dtype=str)
    arrays['instance_index'] = np.array([rows.instance_index[i] for i in row_ids], np.int32)
  return arrays


def _sync(name: str) -> None:
  """A barrier across processes (nothing to do in a single-process run)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    multihost_utils.sync_global_devices(name)


def export(
    config: ml_collections.ConfigDict,
    workdir: storage.PathLike,
    split: str,
    *,
    step: int | None = None,
    out: storage.PathLike | None = None,
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
  is_main = distributed.is_main_process()
  storage.check_writable(out or workdir)  # a missing bucket is named before anything compiles
  source = source_lib.make_source(config, split)  # a split that was not built fails here
  planned = plan_rows(config, source, rows, workdir=workdir)  # and a proposer that is missing
  manager = None
  if not random_init:
    manager, step = checkpoint_lib.open_step(workdir, config, step)
  else:
    step = None
  try:
    kind = config.eval.embedding
    out_dir = (
        storage.as_path(out)
        if out
        else default_out_dir(workdir, kind, split, rows, step, planned.proposer)
    )
    what = 'random initialisation' if step is None else f'checkpoint step {step}'
    checkpoint_id = (
        None if manager is None else checkpoint_lib.checkpoint_fingerprint(manager, step)
    )
    plan = rows_plan(config, planned, kind, step, checkpoint_id)
    done = distributed.decide_on_main(
        lambda: reusable_export(out_dir, plan, overwrite, replace_other=not out)
    )  # decided on process 0 (as below), so that every process takes the same path
    if done is not None:
      if is_main:
        print(f'{out_dir} already holds this export ({what}); nothing to do', flush=True)
      return ExportResult(out_dir, done, [], True, None)

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
      params = checkpoint_lib.restore_model_params(manager, step, embedder.abstract_params)
  finally:
    if manager is not None:
      manager.close()
  result = export_split(
      config,
      out_dir,
      embedder,
      params,
      source,
      planned,
      checkpoint_step=step,
      checkpoint_id=checkpoint_id,
      overwrite=overwrite,
      replace_other=not out,
      progress=progress,
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
          'instances',
          False,
          'One row per product instance (instance queries), from the proposer of '
          '--config.eval.instances (default: learned if trained in the workdir, else boxes).',
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
  config_lib.check_or_exit(args['config'].value)
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
  except (
      FileNotFoundError,
      ValueError,
      lock_lib.LockedError,
      storage.StorageError,
  ) as e:  # bad input: one clear line, no traceback
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


def console_main() -> None:
  args = define_flags()
  flags.mark_flags_as_required(['config', 'workdir'])
  cli.run(lambda argv: main(args))


if __name__ == '__main__':
  console_main()
