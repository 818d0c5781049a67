r"""Sharded CAPTURE pretraining: MLM + MRM + global-batch contrastive loss.

    python -m capture_jax.train --config=configs/demo.py --workdir=runs/demo \
        [--config.train.num_steps=2000 --config.mesh.fsdp=4 ...]

The program, in the order it runs: distributed init, config checks (before
any compilation), mesh, input, model and sharded initialisation (or restore
from the workdir's latest checkpoint), the jitted train step, and the loop
with metrics, checkpoints and preemption handling. Starting in a workdir
that has checkpoints resumes from the latest one, data position included.

Faults: the workdir is locked for the run (a second trainer is refused,
naming the first); a run whose updates are skipped as non-finite
`train.max_consecutive_skipped` times in a row stops with
`TrainingDivergedError`, and a state with non-finite parameters is never
checkpointed; `metrics.jsonl` keeps one row per step of the run the
checkpoints describe. The command exits 1 with one `error:` line on these.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import flags
from ml_collections import config_flags

from capture_jax import cli
from capture_jax import config as config_lib
from capture_jax import batch as batch_lib
from capture_jax import progress as progress_lib
from capture_jax import storage
from capture_jax.data import source as source_lib
from capture_jax.models import layers
from capture_jax.data import train_input
from capture_jax.training import checkpoint as checkpoint_lib
from capture_jax.training import device_prefetch
from capture_jax.training import distributed
from capture_jax.training import lock as lock_lib
from capture_jax.training import metrics as metrics_lib
from capture_jax.training import preemption as preemption_lib
from capture_jax.training import sharding
from capture_jax.training import state as state_lib
from capture_jax.training import steps as steps_lib

# The context of each step's work between the points where the loop fetches from the devices
# (logging, the skip check, checkpoints, profiling): there the host only dispatches. The tests
# replace it with a guard that raises on any device-to-host fetch (`tests/helpers.py`).
BETWEEN_SYNC_POINTS = contextlib.nullcontext


class TrainingDivergedError(RuntimeError):
  """Updates are non-finite: continuing would train, save and evaluate garbage."""


@dataclasses.dataclass
class RunResult:
  state: Any
  last_metrics: dict[str, float]
  preempted: bool


# --------------------------------------------------------------------------
# Configuration checks: cheap, before any compilation.


def validate_config(config: ml_collections.ConfigDict, mesh) -> None:
  """The checks that depend on the mesh; every field's own range is `config.validate`'s."""
  d, t, m = config.data, config.train, config.model
  problems = sharding.batch_split_problems(d.batch_size, mesh, 'data.batch_size')
  per_device = d.batch_size // sharding.batch_devices(mesh)
  if not problems and (t.microbatches < 1 or per_device % t.microbatches):
    problems.append(
        f'train.microbatches={t.microbatches} must divide the per-device batch {per_device}'
    )
  try:
    layers.check_attention_impl(
        m.attention_impl,
        m.dtype,
        sharding.mesh_platform(mesh),
        training_lengths={
            'text': d.max_text_len,
            'visual': d.max_regions + 1,  # + the global image token
            'joint': d.max_text_len + d.max_regions + 1,
        },
    )
  except ValueError as e:
    problems.append(str(e))
  if problems:
    raise ValueError('bad configuration: ' + '; '.join(problems))


# --------------------------------------------------------------------------
# Divergence: consecutive skipped updates, non-finite parameters.


class SkipMonitor:
  """Counts consecutive skipped updates from the cumulative `skipped_updates` metric.

  Each step's count stays on the device (no sync per step); `check` fetches
  the pending ones in one transfer, every `min(log_every, limit)` steps and
  before every save, so a diverged run stops at most that many steps late.
  A step is skipped exactly when the cumulative count grew.
  """

  def __init__(self, limit: int, skipped_before: int, consecutive_before: int = 0):
    self.limit = limit
    self.last = skipped_before
    # Kept in the checkpoint (`loop`), so that a run preempted more often than `limit` steps
    # still stops.
    self.consecutive = consecutive_before
    self.pending: list[tuple[int, Any]] = []

  def add(self, step: int, skipped_updates: Any) -> None:
    self.pending.append((step, skipped_updates))

  def check(self) -> None:
    """Raises TrainingDivergedError once `limit` updates in a row were skipped."""
    if not self.pending:
      return
    values = jax.device_get([v for _, v in self.pending])
    steps = [s for s, _ in self.pending]
    self.pending = []
    for step, value in zip(steps, values):
      value = int(value)
      self.consecutive = self.consecutive + 1 if value > self.last else 0
      self.last = value
      if self.limit and self.consecutive >= self.limit:
        raise TrainingDivergedError(
            f'training diverged: the last {self.consecutive} updates (to step {step}) were '
            f'skipped because the loss or gradients were not finite ({value} skipped in all; '
            f'train.max_consecutive_skipped={self.limit}). Lower train.learning_rate or check '
            'the data; the last checkpoint saved before is kept.'
        )


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jax.tree.reduce(
      lambda a, b: a & b, jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), tree), jnp.bool_(True)
  )


def check_before_save(state: Any, step: int, skips: SkipMonitor) -> None:
  """Raises TrainingDivergedError instead of checkpointing a diverged state."""
  skips.check()
  if not bool(_all_finite(state.params)):
    raise TrainingDivergedError(
        f'training diverged: the parameters at step {step} are not finite; this state is not '
        'checkpointed (the last checkpoint saved before is kept). Lower train.learning_rate or '
        'check the data.'
    )


# --------------------------------------------------------------------------
# The run.


def run(
    config: ml_collections.ConfigDict,
    workdir: storage.PathLike,
    *,
    stop_after_steps: int | None = None,
    devices=None,
) -> RunResult:
  """Trains until `train.num_steps` (or `stop_after_steps` more steps, or a preemption signal)."""
  config_lib.validate(config)  # every field's type and range, before anything else
  workdir = storage.as_path(workdir)
  mesh = sharding.make_mesh(config.mesh, devices)
  validate_config(config, mesh)
  source_lib.require_local_inputs(config)
  if storage.is_remote(workdir) and config.train.profile_start_step >= 0:
    raise ValueError(
        f'train.profile_start_step={config.train.profile_start_step}: the profiler trace is '
        f'written through JAX profiler to local disk, and --workdir={workdir} is a bucket; '
        'profile a run with a local --workdir'
    )
  # A bucket that is missing or unreachable is named now, not after compiling.
  storage.check_writable(workdir)
  # One trainer per workdir (process 0 holds the lock for the whole run).
  with lock_lib.FolderLock(workdir, lock_lib.TRAIN_LOCK_FILE, 'trainer'):
    return _run_locked(config, workdir, mesh, stop_after_steps)


def _run_locked(
    config: ml_collections.ConfigDict, workdir: storage.Path, mesh, stop_after_steps: int | None
) -> RunResult:
  # Checkpoints: refuse a workdir of another model (or another batch size, or num_steps below
  # the saved step) before compiling anything.
  manager = checkpoint_lib.make_manager(workdir, config.checkpoint)
  closers = []
  try:
    checkpoint_lib.check_compatible(manager, config)
    return _train(config, workdir, mesh, stop_after_steps, manager, closers)
  finally:
    for close in closers:
      close()
    # Wait for the saves in flight (also when stopping on an error: they hold good states),
    # then checksum them.
    manager.wait_until_finished()
    checkpoint_lib.record_checksums(manager)
    manager.close()


def _train(
    config, workdir: storage.Path, mesh, stop_after_steps, manager, closers: list
) -> RunResult:
  """Restore or initialise, compile, and the loop; `closers` collects what `_run_locked` closes
  however the run ends."""
  is_main = distributed.is_main_process()

  # Input: this process's share of every global batch.
  data_iterator = train_input.make_train_iterator(config)

  # The step (jitted with explicit shardings, the state donated), and the parameters and
  # optimizer state it takes, created directly in their shardings.
  key = jax.random.PRNGKey(config.seed)
  step_program = steps_lib.build_train_step(config, mesh)
  optimizer, state_shardings = step_program.optimizer, step_program.state_shardings

  had_checkpoints = bool(manager.all_steps())
  restored = checkpoint_lib.restore_latest(
      manager,
      step_program.abstract_state,
      data_iterator,
      move_unreadable=True,
  )
  corrupt = checkpoint_lib.corrupt_checkpoints(workdir)
  if restored is None and (had_checkpoints or corrupt):
    if not config.checkpoint.restart_if_unreadable:
      raise checkpoint_lib.UnreadableCheckpointsError(
          f'no readable checkpoint in {checkpoint_lib.checkpoint_dir(workdir)}: '
          f'{", ".join(p.name for p in corrupt)} could not be read (moved aside, kept for '
          'inspection). To train again from step 0 in this workdir, pass '
          '--config.checkpoint.restart_if_unreadable=True; or use another --workdir.'
      )
    if is_main:
      print(
          f'WARNING: no readable checkpoint in {checkpoint_lib.checkpoint_dir(workdir)} '
          '(checkpoint.restart_if_unreadable=True): training from step 0',
          flush=True,
      )
  if restored is not None:
    state, start = restored
    if is_main:
      print(
          f'resumed from the checkpoint at step {start} in {checkpoint_lib.checkpoint_dir(workdir)}',
          flush=True,
      )
  else:
    state = jax.jit(step_program.init_state, out_shardings=state_shardings)(key)
    pretrained = state_lib.pretrained_params(config)
    if pretrained:
      params = state_lib.place_pretrained(state.params, pretrained, state_shardings.params)
      state = state.replace(
          params=params,
          opt_state=jax.jit(optimizer.init, out_shardings=state_shardings.opt_state)(params),
      )
    start = 0
  if start > config.train.num_steps:
    raise checkpoint_lib.IncompatibleCheckpointError(
        f'train.num_steps={config.train.num_steps} is below the restored checkpoint step {start} '
        f'in {checkpoint_lib.checkpoint_dir(workdir)}; raise num_steps or use another --workdir'
    )

  # Stop requests from here on (also while compiling): every process stops at the same step.
  preemption = preemption_lib.Preemption().__enter__()
  closers.append(preemption.__exit__)
  preemption.reached(start)

  # The step, compiled ahead of time.
  step_fn, compile_s = step_program.compile()
  flops_per_step = state_lib.count_flops(step_fn)
  if is_main:
    print(
        f'compiled the train step in {compile_s:.1f} s'
        + (f'; {flops_per_step / 1e9:.1f} GFLOP per step and device' if flops_per_step else ''),
        flush=True,
    )

  end = (
      config.train.num_steps
      if stop_after_steps is None
      else min(config.train.num_steps, start + stop_after_steps)
  )
  writer = metrics_lib.MetricWriter(workdir, start_step=start)
  closers.append(writer.close)
  loop = checkpoint_lib.saved_loop(manager, start) if restored is not None else {}
  skips = SkipMonitor(
      config.train.max_consecutive_skipped,
      int(jax.device_get(state.skipped)),
      loop.get('consecutive_skipped', 0),
  )
  limit = config.train.max_consecutive_skipped
  check_every = min(config.train.log_every, limit) if limit else config.train.log_every
  progress = progress_lib.Progress(
      end - start,
      'pretraining',
      'step',
      enabled=is_main and config.train.progress_bar and end > start,
      log_every=config.train.log_every,
  )

  peak = metrics_lib.peak_flops(jax.devices()[0])
  last_metrics: dict[str, float] = {}
  preempted = False
  window_start, window_steps = time.perf_counter(), 0
  profiling = False
  # Global batches built by a thread, `data.prefetch_to_device` steps ahead; checkpoints record
  # the data position of the batches the steps consumed.
  batches = device_prefetch.DevicePrefetch(
      data_iterator,
      lambda local: sharding.global_batch_from_local(
          {k: local[k] for k in batch_lib.TRAIN_KEYS}, mesh
      ),
      config.data.prefetch_to_device,
  )
  closers.insert(0, batches.close)

  def save_checkpoint(step: int, state: Any, force: bool) -> None:
    """Never a diverged state; the metric rows up to a checkpoint are durable before it; the
    data position of the consumed batches and the consecutive-skip count go with it."""
    check_before_save(state, step, skips)
    # Fencing: a trainer whose lock was taken over (or cannot be confirmed) stops here.
    lock_lib.confirm(workdir, lock_lib.TRAIN_LOCK_FILE)
    writer.flush()
    checkpoint_lib.save(
        manager,
        step,
        state,
        batches,
        config,
        force=force,
        loop={'consecutive_skipped': skips.consecutive},
    )

  step = start
  while step < end:
    # Between the sync points below the host only dispatches: no device-to-host transfer, no
    # collective it waits for, so it runs ahead of the devices.
    with BETWEEN_SYNC_POINTS():
      if step == config.train.profile_start_step and is_main:
        jax.profiler.start_trace(str(workdir / 'profile'))
        profiling = True
      batch = next(batches)
      state, metrics = step_fn(state, batch)
      step += 1
      window_steps += 1
      skips.add(step, metrics['skipped_updates'])
      preempted = preemption.reached(step)  # host-only (the coordination service on a pod)
      progress.update(1)
      due = manager.should_save(step)
    # Sync points.
    if step % check_every == 0:
      skips.check()
    if profiling and step >= config.train.profile_start_step + config.train.profile_num_steps:
      jax.block_until_ready(state.params)
      jax.profiler.stop_trace()
      profiling = False
    if step % config.train.log_every == 0 or step == end:
      metrics = jax.device_get(metrics)
      elapsed = time.perf_counter() - window_start
      step_time = elapsed / window_steps
      last_metrics = {k: float(v) for k, v in metrics.items()}
      last_metrics.update(
          {'step_time_s': step_time, 'samples_per_s': config.data.batch_size / step_time}
      )
      if flops_per_step and peak:
        last_metrics['mfu'] = flops_per_step / step_time / peak  # XLA counts per device
      writer.write(step, last_metrics)
      progress.set_postfix(
          loss=f'{last_metrics["loss/total"]:.3f}', skipped=int(last_metrics['skipped_updates'])
      )
      window_start, window_steps = time.perf_counter(), 0
    if due or preempted:
      save_checkpoint(step, state, force=preempted)
    if preempted:
      break
  progress.close()
  # A final checkpoint (forced: also when the interval is not due), then wait for async saves.
  if manager.latest_step() != step:
    save_checkpoint(step, state, force=True)
  if preempted and is_main:
    print(
        f'stopped at step {step} on request; checkpoint saved in {checkpoint_lib.checkpoint_dir(workdir)}. '
        'Run the same command again to resume.',
        flush=True,
    )
  return RunResult(state=state, last_metrics=last_metrics, preempted=preempted)


# --------------------------------------------------------------------------
# Command line.


def define_flags() -> dict[str, flags.FlagHolder]:
  """The command's flags (defined when the command runs, not on import, so that other commands
  can import this module)."""
  return {
      'config': config_flags.DEFINE_config_file(
          'config', None, 'A configs/*.py file.', lock_config=True
      ),
      'workdir': flags.DEFINE_string(
          'workdir', None, 'Run directory: checkpoints, metrics, TensorBoard events.'
      ),
      'stop_after_steps': flags.DEFINE_integer(
          'stop_after_steps', None, 'Stop after this many steps (then resume later).'
      ),
  }


def main(args: dict[str, flags.FlagHolder]) -> None:
  distributed.initialize()
  try:
    run(
        args['config'].value,
        args['workdir'].value,
        stop_after_steps=args['stop_after_steps'].value,
    )
  except (
      ValueError,
      FileNotFoundError,
      TrainingDivergedError,
      checkpoint_lib.UnreadableCheckpointsError,
      lock_lib.LockedError,
      storage.StorageError,
  ) as e:  # refused or stopped: one clear line, exit status 1, no traceback
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(1)


def console_main() -> None:
  """`python -m capture_jax.train` / `capture-train`."""
  args = define_flags()
  flags.mark_flags_as_required(['config', 'workdir'])
  cli.run(lambda argv: main(args))


if __name__ == '__main__':
  console_main()
