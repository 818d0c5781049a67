"""The stages both trainers share: the lock, the corrupt-checkpoint policy, and the loop.

CAPTURE pretraining (`capture_jax/train.py`) and the learned proposer
(`capture_jax/instances/trainer.py`) run the same shape, as MaxText's
`setup_train_loop` / `train_loop` and Levanter's `Trainer` hooks do:

    with locked(workdir, folder, 'trainer'):            # one trainer per folder
      restored = ...                                     # the trainer's own restore
      require_readable(...)                              # the corrupt-checkpoint policy
      with preemption.Preemption() as stop:              # stop requests
        stop.reached(start)
        step, stopped = run_steps(hooks, start, end, stop)

`run_steps` owns the order of a step (dispatch, stop request, sync point, save
when due or stopping); each trainer says what a step, a sync point and a save
are (`LoopHooks`).
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterator, Protocol, Sequence

from capture_jax import storage
from capture_jax.training import checkpoint as checkpoint_lib
from capture_jax.training import lock as lock_lib
from capture_jax.training import preemption as preemption_lib


@contextlib.contextmanager
def locked(workdir: storage.PathLike, folder: storage.PathLike, holder: str) -> Iterator[None]:
  """Names an unwritable `workdir` now (not after compiling), then holds the train lock of
  `folder` (`lock.FolderLock`; process 0 only) for the run: a second trainer is refused."""
  storage.check_writable(workdir)
  with lock_lib.FolderLock(folder, lock_lib.TRAIN_LOCK_FILE, holder):
    yield


def end_step(start: int, num_steps: int, stop_after: int | None) -> int:
  """The step the loop stops at: `num_steps`, or `stop_after` steps after `start` if sooner."""
  return num_steps if stop_after is None else min(num_steps, start + stop_after)


def require_readable(
    restored: bool,
    had_checkpoints: bool,
    corrupt: Sequence[storage.Path],
    restart_if_unreadable: bool,
    where: storage.Path,
    is_main: bool = True,
) -> None:
  """The corrupt-checkpoint policy: when checkpoints existed but none could be read, training
  again from step 0 (and overwriting the run's history) needs `restart_if_unreadable`.

  Args:
    restored: whether a checkpoint was restored.
    had_checkpoints: whether `where` held checkpoints before the restore.
    corrupt: the checkpoints moved aside (`checkpoint.corrupt_checkpoints`).
    restart_if_unreadable: `checkpoint.restart_if_unreadable`.
    where: the checkpoint folder, for the messages.
    is_main: whether this process prints the warning.
  Raises:
    checkpoint.UnreadableCheckpointsError: none readable and no restart asked for.
  """
  if restored or not (had_checkpoints or corrupt):
    return
  if not restart_if_unreadable:
    raise checkpoint_lib.UnreadableCheckpointsError(
        f'no readable checkpoint in {where}: '
        f'{", ".join(p.name for p in corrupt)} could not be read (moved aside, kept for '
        'inspection). To train again from step 0 in this workdir, pass '
        '--config.checkpoint.restart_if_unreadable=True; or use another --workdir.'
    )
  if is_main:
    print(
        f'WARNING: no readable checkpoint in {where} '
        '(checkpoint.restart_if_unreadable=True): training from step 0',
        flush=True,
    )


class LoopHooks(Protocol):
  """What a trainer does at each point of `run_steps`."""

  def dispatch(self, step: int) -> None:
    """Runs the step that takes the state from `step` to `step + 1` (host: dispatch only)."""

  def save_due(self, step: int) -> bool:
    """Whether a checkpoint is due after `step` (host-only)."""

  def sync(self, step: int) -> None:
    """Work that may fetch from the devices after `step`: checks, logging."""

  def save(self, step: int, stopping: bool) -> None:
    """Checkpoints the state after `step` (`stopping`: on a stop request, due or not)."""


def run_steps(
    hooks: LoopHooks,
    start: int,
    end: int,
    stop: preemption_lib.Preemption,
    between_sync_points: Callable[[], ContextManager] = contextlib.nullcontext,
) -> tuple[int, bool]:
  """Steps from `start` to `end`, checkpointing when due, until done or a stop request.

  `stop.reached` is asked at every step (every process must, with the same
  steps: `preemption.Preemption`); `between_sync_points` is the context of the
  host-only part of a step (the tests make it refuse device fetches). Returns
  `(the last step, whether a stop request ended the loop)`.
  """
  step, stopping = start, False
  while step < end:
    with between_sync_points():
      hooks.dispatch(step)
      step += 1
      stopping = stop.reached(step)  # host-only (the coordination service on a pod)
      due = hooks.save_due(step)
    hooks.sync(step)
    if due or stopping:
      hooks.save(step, stopping)
    if stopping:
      break
  return step, stopping
