"""Orbax checkpoints of a run: train state, every process's Grain iterator state, the config, and
the loop's counters.

Layout: `{workdir}/checkpoints/{step}/{state,data,config,loop}` (`loop`: JSON counters of the
training loop that are not in the train state, such as the consecutive skipped updates;
checkpoints saved before it existed have none). Saves are
asynchronous; the manager keeps the last `keep_last` checkpoints plus every
`keep_every`-th step. Restoring takes an abstract state whose leaves carry
the target shardings, so a checkpoint saved on one mesh restores onto another.

Identity: the `config` item also holds `run_identity` (`RUN_IDENTITY_KEY`): the fingerprint and
path of the run's vocab (`tokenizer.vocab_fingerprint`, the same fact a built dataset records).
Resuming, exporting and evaluating with another vocab is refused (`check_compatible`): every
embedding row belongs to a token id. A checkpoint saved before it was recorded is read with a
note that its vocab cannot be checked.

Integrity: once a save is finalised, process 0 writes `{step}/checksums.json`
(size and SHA-256 of every file of the step; in a `gs://` workdir the size
and the CRC32C that GCS keeps for every object, read from one listing, so
that nothing is downloaded); a restore first checks them, so
a checkpoint with flipped bytes is treated like an unreadable one. Writing
them lazily (at the next save, and at the end of the run) keeps saves
asynchronous; a checkpoint without the file (the run was killed before it was
written) is restored unverified, with a note.

Commit: after `checksums.json`, process 0 writes `{step}/commit.json` through
`lock.commit_record` (in a bucket, a copy of the workdir's lock conditional on
the generation this holder last wrote: refused once another command took the
lock over). `checksums.json` names it, so a step checksummed by a holder that
lost its lock before committing it is not restored (see docs/RELIABILITY.md
for what this does not fence).

A checkpoint that cannot be read (or fails its checksums) is moved aside to
`checkpoints/corrupt-{step}-{time}` (Orbax ignores that name: it is kept for
inspection, never restored nor deleted by the keep-last policy), reported, and
the previous one is tried. Moving it frees the step, so the retrained step is
saved again, and the keep-last policy counts only good checkpoints. When
checkpoints existed but none is readable, starting from scratch needs
`checkpoint.restart_if_unreadable=True`. The learned proposer's trainer
(`instances/trainer.py`) keeps its own items and runs the same policy
(`restore_readable`, `record_checksums`, `corrupt_in`).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import time
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from capture_jax import storage
from capture_jax.data import tokenizer as tokenizer_lib
from capture_jax.training import distributed
from capture_jax.training import lock as lock_lib

# Model fields that change numerics or speed but not the parameter tree.
LAYOUT_NEUTRAL_FIELDS = (
    'dtype',
    'attention_impl',
    'remat',
    'hidden_dropout_prob',
    'attention_probs_dropout_prob',
)


RUN_IDENTITY_KEY = 'run_identity'
CHECKSUMS_FILE = 'checksums.json'
# Written after `checksums.json` by the lock's holder (`lock.commit_record`: on GCS a copy of the
# lock conditional on its generation, refused after a takeover); a step whose checksums name it
# and that lacks it is not restored.
COMMIT_FILE = 'commit.json'
LOOP_ITEM = 'loop'
CORRUPT_PREFIX = 'corrupt-'

# Orbax's tensorstore retries a GCS request within the bounds the user set (storage.RETRIES).
storage.bound_tensorstore_retries()


class IncompatibleCheckpointError(ValueError):
  """The workdir holds checkpoints of a different model."""


class CorruptCheckpointError(ValueError):
  """The checkpoint asked for does not match its `checksums.json` (or was never committed)."""


class UnreadableCheckpointsError(RuntimeError):
  """Every checkpoint of the workdir is unreadable, and restarting from scratch was not asked for."""


def checkpoint_dir(workdir: storage.PathLike) -> storage.Path:
  return storage.as_path(workdir) / 'checkpoints'


def make_manager(
    workdir: storage.PathLike, ckpt_cfg: ml_collections.ConfigDict
) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=ckpt_cfg.every_steps,
      max_to_keep=ckpt_cfg.keep_last,
      keep_period=ckpt_cfg.keep_every or None,
      enable_async_checkpointing=ckpt_cfg.async_save,
      create=True,
  )
  return ocp.CheckpointManager(
      storage.absolute(checkpoint_dir(workdir)),
      options=options,
      item_names=('state', 'data', 'config', LOOP_ITEM),
  )


@contextlib.contextmanager
def saving(manager: ocp.CheckpointManager):
  """Around `manager.save` and `manager.wait_until_finished` (where Orbax raises the errors of an
  asynchronous save): in a bucket, an error that persisted past the retries (tensorstore's or
  gcsfs's, `storage.RETRIES`) is a StorageError naming the folder, the object and the operation,
  one `error:` line from the commands."""
  if not storage.is_remote(manager.directory):
    yield
    return
  with storage.naming(manager.directory, 'saving a checkpoint into'):
    yield


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    data_iterator: Any,
    config: ml_collections.ConfigDict,
    force: bool = False,
    loop: dict[str, int] | None = None,
) -> bool:
  """Saves (asynchronously) if `step` is due, or always with `force`. Returns whether it saved.

  `loop`: the training loop's counters at `step` (JSON), restored by `saved_loop`.
  """
  saved_config = {**config.to_dict(), RUN_IDENTITY_KEY: run_identity(config)}
  items = {'state': ocp.args.StandardSave(state), 'config': ocp.args.JsonSave(saved_config)}
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
  if loop is not None:
    items[LOOP_ITEM] = ocp.args.JsonSave({k: int(v) for k, v in loop.items()})
  with saving(manager):
    saved = manager.save(step, args=ocp.args.Composite(**items), force=force)
  if saved:
    # `manager.save` waits for the previous save to finish before starting this one: every
    # other step is final now and can be checksummed without waiting for this one.
    record_checksums(manager, exclude=step)
  return saved


# --------------------------------------------------------------------------
# Integrity: checksums written after a save, checked before a restore.


def step_dir(manager: ocp.CheckpointManager, step: int) -> storage.Path:
  return storage.as_path(manager.directory) / str(step)


def _sha256(path: storage.Path) -> str:
  with storage.reading(path), path.open('rb') as f:
    return hashlib.file_digest(f, 'sha256').hexdigest()


def _crc32c(path: storage.Path) -> str:
  """GCS's checksum of a file: base64 of the big-endian CRC32C."""
  import google_crc32c  # pylint: disable=import-outside-toplevel  (installed with gcsfs)

  checksum = google_crc32c.Checksum()
  with storage.reading(path), path.open('rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      checksum.update(chunk)
  return base64.b64encode(checksum.digest()).decode('ascii')


def _file_digests(folder: storage.Path, like: dict[str, dict] | None = None) -> dict[str, dict]:
  """Name -> {'bytes', 'sha256'} (on disk) or {'bytes', 'crc32c'} (GCS, from the listing) of the
  files of a step. With `like` (a manifest), a file is hashed the way the manifest hashed it
  where that is possible (a checkpoint copied from disk to a bucket is checked by SHA-256)."""
  digests = {}
  for name, entry in storage.file_listing(folder).items():
    if name.rsplit('/', 1)[-1].lstrip('.').startswith(CHECKSUMS_FILE) or name == COMMIT_FILE:
      continue
    want = (like or {}).get(name, {})
    if 'crc32c' in entry and 'sha256' not in want:
      digests[name] = entry
    elif 'crc32c' in want and 'sha256' not in want:  # made in a bucket, checked on disk
      digests[name] = {'bytes': entry['bytes'], 'crc32c': _crc32c(folder / name)}
    else:
      digests[name] = {'bytes': entry['bytes'], 'sha256': _sha256(folder / name)}
  return digests


def record_checksums(manager: ocp.CheckpointManager, exclude: int | None = None) -> None:
  """Writes `checksums.json` into every finalised step that lacks it (process 0 only).

  Call when no save other than `exclude` is in flight (after `manager.save`,
  or after `wait_until_finished`).
  """
  if jax.process_index() != 0:
    return
  for step in manager.all_steps():
    folder = step_dir(manager, step)
    # `storage` raises on a read error (epath answers False on any error).
    if step == exclude or storage.exists(folder / CHECKSUMS_FILE) or not storage.is_dir(folder):
      continue
    manifest = {'step': int(step), 'files': _file_digests(folder), 'commit': COMMIT_FILE}
    storage.write_text(folder / CHECKSUMS_FILE, json.dumps(manifest, indent=1))
    # The commit: refused (LockLostError) when another command took the workdir's lock over
    # since this holder last confirmed it; the step then never counts as a checkpoint.
    lock_lib.commit_record(folder / COMMIT_FILE)


def checksum_problems(folder: storage.Path) -> list[str] | None:
  """What differs between a step's files and its `checksums.json`; None when it has none.

  Whether the manifest is there is read from the folder's listing, which raises on a read
  error (fsspec's `isfile` answers False on any error: a transient one would restore the step
  unverified).
  """
  manifest = folder / CHECKSUMS_FILE
  listing = storage.file_listing(folder)
  if CHECKSUMS_FILE not in listing:
    return None
  try:
    recorded = json.loads(storage.read_text(manifest))
    expected = recorded['files']
  except (ValueError, KeyError, UnicodeDecodeError) as e:
    return [f'{manifest} cannot be read ({type(e).__name__})']
  if recorded.get('commit') and recorded['commit'] not in listing:
    # Checksummed, never committed: its commit was refused (its writer had lost the workdir's
    # lock) or its writer died between the two writes.
    return [
        f'{recorded["commit"]}: missing (its writer lost the lock, or was killed, between '
        f'{CHECKSUMS_FILE} and its commit)'
    ]
  actual = _file_digests(folder, like=expected)
  problems = [f'{name}: missing' for name in expected if name not in actual]
  for name, want in expected.items():
    got = actual.get(name)
    if got is None:
      continue
    if got['bytes'] != want['bytes']:
      problems.append(f'{name}: size differs from {CHECKSUMS_FILE}')
    elif any(got[k] != want[k] for k in ('sha256', 'crc32c') if k in got and k in want):
      problems.append(f'{name}: checksum differs from {CHECKSUMS_FILE}')
  return problems


def checkpoint_fingerprint(manager: ocp.CheckpointManager, step: int) -> str:
  """A short id of one save of `step`: exports made from it record it, so that embeddings from two
  runs (or from a step saved again) differ.

  The hash of Orbax's `_CHECKPOINT_METADATA` (written once at commit, with the
  save's timestamps), else of our checksums, else of the folder's path.
  """
  folder = step_dir(manager, step)

  def fingerprint() -> str:
    for name in ('_CHECKPOINT_METADATA', CHECKSUMS_FILE):
      if storage.is_file(folder / name):
        return hashlib.sha256(storage.read_bytes(folder / name)).hexdigest()[:16]
    return hashlib.sha256(str(storage.absolute(folder)).encode()).hexdigest()[:16]

  return distributed.decide_on_main(fingerprint)  # one id for the export on every process


def saved_config(manager: ocp.CheckpointManager, step: int) -> dict:
  restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  return restored['config']


def saved_loop(manager: ocp.CheckpointManager, step: int) -> dict[str, int]:
  """The loop counters saved with `step` (see `save`); {} for a checkpoint saved without them."""
  # Whether it is there is decided on process 0: the restore below is collective (Orbax's barrier).
  if not distributed.decide_on_main(lambda: storage.exists(step_dir(manager, step) / LOOP_ITEM)):
    return {}
  return dict(
      manager.restore(step, args=ocp.args.Composite(loop=ocp.args.JsonRestore()))[LOOP_ITEM]
  )


def run_identity(config: ml_collections.ConfigDict) -> dict[str, str | None]:
  """What a checkpoint records of its run besides the config: the vocab's fingerprint (None
  without `data.vocab_file`) and path."""
  vocab = config.data.vocab_file
  return {
      'vocab_fingerprint': tokenizer_lib.vocab_fingerprint(vocab) if vocab else None,
      'vocab_file': str(vocab),
  }


def vocab_problem(saved: dict, config: ml_collections.ConfigDict) -> str | None:
  """Why a checkpoint saved with the config `saved` was trained with another vocab than
  `config.data.vocab_file` (both fingerprints and files); None when it is the same vocab.

  A checkpoint saved before checkpoints recorded their vocab passes, with a
  note (process 0): its vocab cannot be checked.
  """
  identity = saved.get(RUN_IDENTITY_KEY)
  vocab = config.data.vocab_file
  if identity is None:
    if jax.process_index() == 0:
      print(
          'note: the checkpoint records no vocab fingerprint (saved before checkpoints did): '
          f'data.vocab_file={vocab} cannot be checked against the vocab it was trained with',
          flush=True,
      )
    return None
  ours = run_identity(config)['vocab_fingerprint']
  theirs = identity.get('vocab_fingerprint')
  if ours == theirs:
    return None
  short = lambda fp: fp[:16] if fp else 'none'
  return (
      f'the vocab differs: trained with {identity.get("vocab_file")} (fingerprint '
      f'{short(theirs)}), config data.vocab_file={vocab} (fingerprint {short(ours)}); every '
      'embedding row belongs to a token id, so pass the vocab the run was trained with'
  )


def resume_problems(saved: dict, step: int, config: ml_collections.ConfigDict) -> list[str]:
  """Why resuming the checkpoint of `step` (saved with config `saved`) under `config` would be
  silently wrong.

  The data position is a count of batches (the Grain iterator state), so
  another global batch size would resume at another sample; and a
  `train.num_steps` below the saved step has nothing left to do.
  """
  problems = []
  saved_batch = saved.get('data', {}).get('batch_size')
  if saved_batch is not None and saved_batch != config.data.batch_size:
    problems.append(
        f'data.batch_size: checkpoint {saved_batch}, config {config.data.batch_size} (the data '
        'position is counted in batches; resume with the same batch size, or use another --workdir)'
    )
  if config.train.num_steps < step:
    problems.append(
        f'train.num_steps={config.train.num_steps} is below the checkpoint step {step} '
        '(raise num_steps to train on, or use another --workdir)'
    )
  return problems


def model_config_diffs(saved: dict, config: ml_collections.ConfigDict) -> list[str]:
  """The `model` fields that change the parameter tree and differ between a checkpoint and a config."""
  return [
      f'model.{k}: checkpoint {saved.get(k)!r}, config {v!r}'
      for k, v in config.model.to_dict().items()
      if k not in LAYOUT_NEUTRAL_FIELDS and saved.get(k) != v
  ]


def check_compatible(
    manager: ocp.CheckpointManager, config: ml_collections.ConfigDict, step: int | None = None
) -> None:
  """Raises IncompatibleCheckpointError, before any compilation, if the checkpoint of `step`
  is of a different model.

  With `step=None` (the trainer: the latest checkpoint) an unreadable
  checkpoint passes here, as `restore_latest` reports it and falls back; a
  given step must be readable.
  """
  latest = step is None
  step = manager.latest_step() if latest else step
  if step is None:
    return
  try:
    saved = saved_config(manager, step)
  except Exception:  # pylint: disable=broad-except
    if latest:
      return
    raise
  diffs = model_config_diffs(saved['model'], config)
  vocab = vocab_problem(saved, config)
  if vocab:
    diffs.append(vocab)
  if diffs:
    raise IncompatibleCheckpointError(
        f'{manager.directory} holds checkpoints of a different model or vocab (step {step}): '
        + '; '.join(diffs)
        + '. Use another --workdir or the config the run was trained with.'
    )
  if latest:  # the trainer: resuming must continue the same run
    problems = resume_problems(saved, step, config)
    if problems:
      raise IncompatibleCheckpointError(
          f'cannot resume the checkpoint of step {step} in {manager.directory}: '
          + '; '.join(problems)
      )


def open_step(
    workdir: storage.PathLike, config: ml_collections.ConfigDict, step: int | None = None
) -> tuple[ocp.CheckpointManager, int]:
  """A run's checkpoint manager and the step to read (default: the latest), for export.

  Raises FileNotFoundError when there is no checkpoint (or not that step),
  CorruptCheckpointError when its files do not match its checksums (training
  would move it aside; an export of it would be embeddings of damaged
  weights), and IncompatibleCheckpointError when it is of another model, all
  before anything compiles. A step without checksums (its run was killed
  before they were written) is read as training reads it, with a note.
  """
  ckpt_dir = checkpoint_dir(workdir)
  if not distributed.decide_on_main(lambda: storage.is_dir(ckpt_dir)):
    raise FileNotFoundError(
        f'no checkpoint in {workdir}: {ckpt_dir} does not exist. Train first '
        f"(python -m capture_jax.train --workdir={workdir}), or pass the run's --workdir."
    )
  manager = make_manager(workdir, config.checkpoint)
  try:
    steps = distributed.decide_on_main(lambda: sorted(manager.all_steps()))
    if not steps:
      raise FileNotFoundError(
          f'no checkpoint in {ckpt_dir}; train first (python -m capture_jax.train)'
      )
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise FileNotFoundError(f'no checkpoint of step {step} in {ckpt_dir}; it holds steps {steps}')
    check_intact(manager, step)
    check_compatible(manager, config, step)
  except Exception:
    manager.close()
    raise
  return manager, int(step)


def check_intact(
    manager: ocp.CheckpointManager,
    step: int,
    *,
    trainer: str = 'python -m capture_jax.train',
    step_flag: str | None = '--checkpoint',
) -> None:
  """Raises CorruptCheckpointError when `step`'s files do not match its checksums (decided on
  process 0, as `restore_readable` decides), naming what to run instead: `trainer` (which moves
  the step aside when it resumes) and `step_flag` with the other steps; notes a step that has no
  checksums.

  For the commands that read a checkpoint without training from it (export, evaluation, the
  learned proposer's proposals): they have no previous step to fall back to unasked.
  """
  folder = step_dir(manager, step)
  problems = distributed.decide_on_main(lambda: checksum_problems(folder))
  if problems:
    others = distributed.decide_on_main(lambda: sorted(s for s in manager.all_steps() if s != step))
    raise CorruptCheckpointError(
        f'checkpoint {step} in {manager.directory} does not match its {CHECKSUMS_FILE}: '
        + '; '.join(problems[:3])
        + f'. Training moves such a step aside and resumes from the one before (run {trainer} '
        'with the same --workdir)'
        + (f', or pass {step_flag}=<one of {others}>' if step_flag and others else '')
    )
  if problems is None:
    _note_unverified(step, 'read')


def _note_unverified(step: int, done: str) -> None:
  """Says (on process 0) that checkpoint `step` was `done` without checksums to verify."""
  if jax.process_index() == 0:
    print(
        f'note: checkpoint {step} has no {CHECKSUMS_FILE} (the run stopped before it was '
        f'written): {done} without verifying it',
        flush=True,
    )


def restore_model_params(manager: ocp.CheckpointManager, step: int, abstract_params: Any) -> Any:
  """Only `state.params['model']` of a checkpoint, placed in the shardings that
  `abstract_params`' leaves carry (Orbax partial restore: the optimizer state is not read)."""
  target = {'params': {'model': abstract_params}}
  restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), target)
  restored = manager.restore(
      step,
      args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
      ),
  )
  return restored['state']['params']['model']


def move_aside(manager: ocp.CheckpointManager, step: int) -> storage.Path:
  """Renames a step's folder to `corrupt-{step}-{time}` (process 0) and reloads the manager."""
  target = (
      storage.as_path(manager.directory)
      / f'{CORRUPT_PREFIX}{step}-{time.strftime("%Y%m%dT%H%M%S")}'
  )
  if jax.process_index() == 0:
    storage.rename_tree(step_dir(manager, step), target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    multihost_utils.sync_global_devices(f'checkpoint moved aside {step}')
  manager.reload()
  return target


def corrupt_checkpoints(workdir: storage.PathLike) -> list[storage.Path]:
  """The trainer's checkpoints moved aside in this workdir (`corrupt_in`)."""
  return corrupt_in(checkpoint_dir(workdir))


def corrupt_in(folder: storage.PathLike) -> list[storage.Path]:
  """The checkpoints moved aside in the checkpoint folder `folder` (`move_aside`; oldest name
  first), as process 0 lists them."""
  folder = storage.as_path(folder)

  def names() -> list[str]:
    if not storage.is_dir(folder):
      return []
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(CORRUPT_PREFIX))

  return [folder / name for name in distributed.decide_on_main(names)]


def restore_latest(
    manager: ocp.CheckpointManager,
    abstract_state: Any,
    data_iterator: Any,
    *,
    move_unreadable: bool = False,
) -> tuple[Any, int] | None:
  """The trainer's `restore_readable`: the train state onto `abstract_state`'s shardings, and the
  iterator (when given). Returns `(state, step)`, or None when no checkpoint is readable."""
  items = {'state': ocp.args.StandardRestore(abstract_state)}
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = restore_readable(manager, items, move_unreadable=move_unreadable)
  return None if restored is None else (restored[0]['state'], restored[1])


def restore_readable(
    manager: ocp.CheckpointManager,
    items: dict[str, Any],
    *,
    move_unreadable: bool = False,
) -> tuple[Any, int] | None:
  """Restores `items` (name -> `ocp.args` restore argument) of the newest readable checkpoint.

  A checkpoint whose files fail their checksums, or that Orbax cannot read,
  is reported and skipped; with `move_unreadable` (both trainers) it is also
  moved aside (`move_aside`). Returns `(the restored Composite, step)`, or
  None when there is no readable checkpoint.

  The processes of a pod decide together: the steps, whether a step has its
  checksums and whether they match are read on process 0 and sent to the
  others, so that a read error on one host cannot restore it unverified or
  send it to another step. (A read error inside Orbax's own restore on one
  process only is not healed here: Orbax's barrier after the reads then
  fails, and the job stops with that error, with no process gone on alone.)
  """
  steps = distributed.decide_on_main(lambda: sorted(manager.all_steps(), reverse=True))
  for step in steps:
    problems = distributed.decide_on_main(lambda: checksum_problems(step_dir(manager, step)))
    try:
      if problems:
        raise ValueError('checksums do not match: ' + '; '.join(problems[:3]))
      restored = manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except
      if problems == [] and storage.is_remote(manager.directory):
        # Every file matches its checksum (read from the bucket's listing): the checkpoint is
        # intact and the bucket failed to serve it (past tensorstore's retries). Moving it aside
        # would lose a good checkpoint to a transient fault.
        raise storage.StorageError(
            f'{step_dir(manager, step)}: restoring failed although its files match '
            f'{CHECKSUMS_FILE} ({type(e).__name__}: {str(e).strip()[:300]}); the checkpoint is '
            'kept: run the same command again once the bucket answers'
        ) from e
      where = ''
      if move_unreadable:
        where = f'; moved aside to {move_aside(manager, step)}'
      print(
          f'WARNING: checkpoint {step} in {manager.directory} cannot be read '
          f'({type(e).__name__}: {str(e)[:300]}){where}; trying the previous one',
          flush=True,
      )
      continue
    if problems is None:
      _note_unverified(step, 'restored')
    return restored, int(step)
  return None
