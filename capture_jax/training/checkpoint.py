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


def check_compatible(manager: ocp.CheckpointManager, config: ml_collections.ConfigDict) -> None:
  """Raises before any compilation if the latest checkpoint is of a different model."""
  step = manager.latest_step()
  if step is None:
    return
  try:
    saved = saved_model_config(manager, step)
  except Exception:  # pylint: disable=broad-except
    return  # unreadable: `restore_latest` reports it and falls back
  ours = config.model.to_dict()
  diffs = [
      f'model.{k}: checkpoint {saved.get(k)!r}, config {v!r}'
      for k, v in ours.items()
      if k not in LAYOUT_NEUTRAL_FIELDS and saved.get(k) != v
  ]
  if diffs:
    raise IncompatibleCheckpointError(
        f'{checkpoint_dir(manager.directory.parent)} holds checkpoints of a different model '
        f'(step {step}): ' + '; '.join(diffs) + '. Use another --workdir or the matching config.'
    )


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
