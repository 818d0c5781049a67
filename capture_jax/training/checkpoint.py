"""Orbax checkpoints of a run: train state, every process's Grain iterator state, and the config.

Layout: `{workdir}/checkpoints/{step}/{state,data,config}`. Saves are
asynchronous; the manager keeps the last `keep_last` checkpoints plus every
`keep_every`-th step. Restoring takes an abstract state whose leaves carry
the target shardings, so a checkpoint saved on one mesh restores onto another.
A checkpoint that cannot be read is reported and the previous one is tried.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

# Model fields that change numerics or speed but not the parameter tree.
LAYOUT_NEUTRAL_FIELDS = (
    'dtype',
    'attention_impl',
    'remat',
    'hidden_dropout_prob',
    'attention_probs_dropout_prob',
)


class IncompatibleCheckpointError(ValueError):
  """The workdir holds checkpoints of a different model."""


def checkpoint_dir(workdir: str | Path) -> Path:
  return Path(workdir) / 'checkpoints'


def make_manager(workdir: str | Path, ckpt_cfg: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=ckpt_cfg.every_steps,
      max_to_keep=ckpt_cfg.keep_last,
      keep_period=ckpt_cfg.keep_every or None,
      enable_async_checkpointing=ckpt_cfg.async_save,
      create=True,
  )
  return ocp.CheckpointManager(
      checkpoint_dir(workdir).absolute(), options=options, item_names=('state', 'data', 'config')
  )


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    data_iterator: Any,
    config: ml_collections.ConfigDict,
    force: bool = False,
) -> bool:
  """Saves (asynchronously) if `step` is due, or always with `force`. Returns whether it saved."""
  items = {'state': ocp.args.StandardSave(state), 'config': ocp.args.JsonSave(config.to_dict())}
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
  return manager.save(step, args=ocp.args.Composite(**items), force=force)


def saved_model_config(manager: ocp.CheckpointManager, step: int) -> dict:
  restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  return restored['config']['model']


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
    saved = saved_model_config(manager, step)
  except Exception:  # pylint: disable=broad-except
    if latest:
      return
    raise
  diffs = model_config_diffs(saved, config)
  if diffs:
    raise IncompatibleCheckpointError(
        f'{manager.directory} holds checkpoints of a different model (step {step}): '
        + '; '.join(diffs)
        + '. Use another --workdir or the config the run was trained with.'
    )


def open_step(
    workdir: str | Path, config: ml_collections.ConfigDict, step: int | None = None
) -> tuple[ocp.CheckpointManager, int]:
  """A run's checkpoint manager and the step to read (default: the latest), for export.

  Raises FileNotFoundError when there is no checkpoint (or not that step) and
  IncompatibleCheckpointError when it is of another model, both before
  anything compiles.
  """
  ckpt_dir = checkpoint_dir(workdir)
  if not ckpt_dir.is_dir():
    raise FileNotFoundError(
        f'no checkpoint in {Path(workdir)}: {ckpt_dir} does not exist. Train first '
        f"(python -m capture_jax.train --workdir={workdir}), or pass the run's --workdir."
    )
  manager = make_manager(workdir, config.checkpoint)
  steps = sorted(manager.all_steps())
  try:
    if not steps:
      raise FileNotFoundError(
          f'no checkpoint in {ckpt_dir}; train first (python -m capture_jax.train)'
      )
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise FileNotFoundError(f'no checkpoint of step {step} in {ckpt_dir}; it holds steps {steps}')
    check_compatible(manager, config, step)
  except Exception:
    manager.close()
    raise
  return manager, int(step)


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


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )


def restore_latest(
    manager: ocp.CheckpointManager, abstract_state: Any, data_iterator: Any
) -> tuple[Any, int] | None:
  """Restores the newest readable checkpoint (state onto `abstract_state`'s shardings, and the iterator).

  Returns `(state, step)`, or None when there is no readable checkpoint.
  """
  for step in sorted(manager.all_steps(), reverse=True):
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except
      print(
          f'WARNING: checkpoint {step} in {manager.directory} cannot be read '
          f'({type(e).__name__}: {str(e)[:200]}); trying the previous one',
          flush=True,
      )
      continue
    return restored['state'], step
  return None
