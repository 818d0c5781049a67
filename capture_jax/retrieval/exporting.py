"""Making exports: one compiled embedding step and the weights it needs, for one export or many.

`export` is the `capture_jax.export` command's program: the request checked
(split, rows, the split's data and proposer, the checkpoint and its config)
before anything compiles; a complete export of the same identity left as it
is without compiling; else the mesh over whatever devices are present, the
inference step compiled with explicit shardings (`embedding.make_embedder`),
the checkpoint's model parameters restored onto the mesh (only the
parameters, not the optimizer state), and the shards still missing written
(`writer.write_export`). `ensure_exports` does the same for every export an
evaluation reads, with one compiled step for all.

When the output folder holds an export of something else: in the default
folder (ours, under `{workdir}/embeddings`) it is replaced, saying what
changed; in a folder given with `--out` it is refused unless `overwrite`.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import ml_collections

from capture_jax import config as config_lib
from capture_jax import storage
from capture_jax.data import formats
from capture_jax.data import source as source_lib
from capture_jax.retrieval import embedding as embedding_lib
from capture_jax.retrieval import export_format
from capture_jax.retrieval import identity as identity_lib
from capture_jax.retrieval import keys
from capture_jax.retrieval import plan as plan_lib
from capture_jax.retrieval import writer
from capture_jax.training import checkpoint as checkpoint_lib
from capture_jax.training import distributed
from capture_jax.training import sharding

ROWS = ('samples', 'instances')  # one row per sample, or one per product instance


def model_params(config, embedder: embedding_lib.Embedder, manager, step: int | None) -> Any:
  """The model parameters of checkpoint `step` (None: the random initialisation), on the mesh."""
  if step is None:
    return embedding_lib.random_model_params(config, embedder)
  return checkpoint_lib.restore_model_params(manager, step, embedder.abstract_params)


def ensure_exports(
    config: ml_collections.ConfigDict,
    jobs: Sequence[plan_lib.ExportJob],
    manager,
    *,
    devices=None,
    progress: bool | None = None,
) -> tuple[dict[keys.ExportKey, export_format.Embeddings], dict[str, float]]:
  """Runs the jobs whose export is not complete (one compiled step for all), then reads every
  job's export. Returns key -> export, and export label -> rows/s of those computed now."""
  # Decided on process 0: every process must run the same exports (collectives).
  todo_ids = distributed.decide_on_main(
      lambda: [i for i, j in enumerate(jobs) if j.identity.completed(j.out_dir) is None]
  )
  todo = [jobs[i] for i in todo_ids]
  reused = [j for i, j in enumerate(jobs) if i not in todo_ids]
  if reused and distributed.is_main_process():  # none with given exports: nothing to say
    print('reusing the exports in ' + ', '.join(str(j.out_dir) for j in reused), flush=True)
  rates: dict[str, float] = {}
  if todo:
    mesh = sharding.make_mesh(config.mesh, devices)
    embedder = embedding_lib.make_embedder(config, mesh, config.eval.embedding)
    params: dict[int | None, Any] = {}
    for job in todo:
      if job.step not in params:
        params[job.step] = model_params(config, embedder, manager, job.step)
      if distributed.is_main_process():
        print(
            f'exporting {job.key.label}: {len(job.rows)} {job.rows.kind} rows of '
            f'{job.rows.split} -> {job.out_dir}',
            flush=True,
        )
      # The default folders are ours: an export of other data or another save is replaced.
      result = writer.write_export(
          config,
          job.out_dir,
          embedder,
          params[job.step],
          job.source,
          job.rows,
          identity=job.identity,
          replace_other=True,
          progress=progress,
      )
      if result.samples_per_s:
        rates[job.key.label] = result.samples_per_s
  return {j.key: export_format.read_embeddings(j.out_dir) for j in jobs}, rates


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
) -> writer.ExportResult:
  """Exports `rows` of `split` (see the module docstring); returns what was written.

  Args:
    rows: 'samples', or 'instances' from the proposer of `eval.instances`.
    random_init: embed with the untrained model (the config seed) instead of a checkpoint.
    overwrite: recompute every shard, replacing whatever export the output folder holds.
  """
  check_request(config, split, rows)
  storage.check_writable(out or workdir)  # a missing bucket is named before anything compiles
  source = source_lib.make_source(config, split)  # a split that was not built fails here
  proposer = plan_lib.resolve_proposer(config, workdir) if rows == 'instances' else None
  planned = plan_lib.plan_rows(config, source, proposer, workdir)  # a missing proposer fails here
  opened = (None, None) if random_init else checkpoint_lib.open_step(workdir, config, step)
  manager, step = opened
  what = 'random initialisation' if step is None else f'checkpoint step {step}'
  try:
    out_dir, identity = _destination(config, workdir, planned, out, manager, step)
    # Decided on process 0 (as in the writer), so that every process takes the same path.
    done = distributed.decide_on_main(lambda: identity.reusable(out_dir, overwrite, not out))
    if done is not None:
      _say(f'{out_dir} already holds this export ({what}); nothing to do')
      return writer.ExportResult(out_dir, done, [], True, None)
    embedder = _compile(config, devices)
    params = model_params(config, embedder, manager, step)
  finally:
    if manager is not None:
      manager.close()
  result = writer.write_export(
      config,
      out_dir,
      embedder,
      params,
      source,
      planned,
      identity=identity,
      overwrite=overwrite,
      replace_other=not out,
      progress=progress,
  )
  rate = f'; {result.samples_per_s:.1f} samples/s' if result.samples_per_s else ''
  _say(
      f'wrote {len(result.written)} of {result.metadata["num_shards"]} shards '
      f'({result.metadata["count"]} {rows} rows of {split}, {what}) to {out_dir}{rate}'
  )
  return result


def check_request(config: ml_collections.ConfigDict, split: str, rows: str) -> None:
  """The config (`config.validate`: kinds, sizes, the feature width), the split and the rows."""
  config_lib.validate(config)
  problems = []
  if split not in formats.SPLITS:
    problems.append(f'split must be one of {formats.SPLITS}, got {split!r}')
  if rows not in ROWS:
    problems.append(f'rows must be one of {ROWS}, got {rows!r}')
  if problems:
    raise ValueError('bad export request: ' + '; '.join(problems))


def _destination(config, workdir, planned, out, manager, step):
  """The export's folder (`out`, or the default one of its rows and weights) and identity."""
  out_dir = storage.as_path(
      out or plan_lib.default_out_dir(workdir, config.eval.embedding, planned, step)
  )
  checkpoint_id = None if manager is None else checkpoint_lib.checkpoint_fingerprint(manager, step)
  identity = identity_lib.ExportIdentity.of_rows(
      config, planned, config.eval.embedding, step, checkpoint_id
  )
  return out_dir, identity


def _compile(config: ml_collections.ConfigDict, devices) -> embedding_lib.Embedder:
  embedder = embedding_lib.make_embedder(config, sharding.make_mesh(config.mesh, devices))
  _say(
      f'compiled the embedding step ({embedder.kind}, {embedder.dimension}-d, global batch '
      f'{embedder.batch_size}, {jax.device_count()} devices) in {embedder.compile_s:.1f} s'
  )
  return embedder


def _say(text: str) -> None:
  if distributed.is_main_process():
    print(text, flush=True)
