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
import functools
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
from capture_jax import convert
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
from capture_jax.training import loop as loop_lib
from capture_jax.training import metrics as metrics_lib
from capture_jax.training import preemption as preemption_lib
from capture_jax.training import resident as resident_lib
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
  # One trainer per workdir (process 0 holds the lock for the whole run).
  with loop_lib.locked(workdir, workdir, 'trainer'):
    return _run_locked(config, workdir, mesh, stop_after_steps)


def _run_locked(
    config: ml_collections.ConfigDict, workdir: storage.Path, mesh, stop_after_steps: int | None
) -> RunResult:
  # Checkpoints: refuse a workdir of another model (or another batch size, or num_steps below
  # the saved step) before compiling anything.
  manager = checkpoint_lib.make_manager(workdir, config.checkpoint)
  try:
    checkpoint_lib.check_compatible(manager, config)  # the model, batch size and vocab
    if not manager.all_steps():  # a fresh run: its vocab must be the one train.init's rows use
      convert.check_init_vocab(config)
    # What `_train` opens (the stop-request handlers, the metric writer, the prefetch thread),
    # closed however the run ends.
    with contextlib.ExitStack() as closers:
      return _train(config, workdir, mesh, stop_after_steps, manager, closers)
  finally:
    # Wait for the saves in flight (also when stopping on an error: they hold good states),
    # then checksum them.
    with checkpoint_lib.saving(manager):
      manager.wait_until_finished()
    checkpoint_lib.record_checksums(manager)
    manager.close()


def _train(
    config: ml_collections.ConfigDict,
    workdir: storage.Path,
    mesh,
    stop_after_steps: int | None,
    manager,
    closers: contextlib.ExitStack,
) -> RunResult:
  """Open the input -> restore or initialise -> compile -> the loop -> finish."""
  inputs = open_input(config, mesh)
  step_program = steps_lib.build_train_step(config, mesh, resident_records=inputs.num_records)
  start = restore_or_initialise(config, workdir, manager, step_program, inputs.iterator)
  # Stop requests from here on (also while compiling): every process stops at the same step.
  stop = closers.enter_context(preemption_lib.Preemption())
  stop.reached(start.step)
  compiled = compile_step(step_program, inputs.tables)
  end = loop_lib.end_step(start.step, config.train.num_steps, stop_after_steps)
  loop = setup_loop(config, workdir, mesh, manager, start, end, compiled, inputs.iterator, closers)
  step, preempted = loop_lib.run_steps(loop, start.step, end, stop, BETWEEN_SYNC_POINTS)
  return finish(loop, step, preempted)


# --------------------------------------------------------------------------
# The input.


@dataclasses.dataclass(frozen=True)
class Input:
  """What the loop reads: this process's iterator of batches (its share of each global batch)
  and, with `data.resident`, the training split's tables in device memory."""

  iterator: Any
  tables: dict[str, jax.Array] | None = None
  num_records: int | None = None  # of the resident split


def open_input(config: ml_collections.ConfigDict, mesh) -> Input:
  """The host input; or, with `data.resident`, the split loaded into the devices' memory (each
  process reads its devices' rows) and an iterator of index batches. A split that does not
  fit is refused before anything is loaded or compiled (`resident.check_fits`)."""
  if not config.data.resident:
    return Input(train_input.make_train_iterator(config))
  source = source_lib.make_source(config, 'train')
  rows = batch_lib.BatchLayout.from_config(config).row_shapes()
  device_bytes = resident_lib.device_memory_bytes(mesh.local_devices[0])
  fraction = config.data.resident_memory_fraction
  need = resident_lib.check_fits(rows, len(source), mesh, device_bytes, fraction)
  if distributed.is_main_process():
    print(f'loading {source} into device memory: {need / 2**30:.2f} GiB per device', flush=True)
  tables = resident_lib.load_tables(
      train_input.resident_rows(config, source), rows, len(source), mesh
  )
  iterator = train_input.make_train_iterator(config, source=source)
  return Input(iterator, tables, len(source))


# --------------------------------------------------------------------------
# Restore or initialise.


@dataclasses.dataclass
class Start:
  """Where the loop starts: the state, its step, and the loop counters saved with it."""

  state: Any
  step: int
  counters: dict[str, int]


def restore_or_initialise(
    config: ml_collections.ConfigDict,
    workdir: storage.Path,
    manager,
    step_program: steps_lib.TrainStep,
    data_iterator: Any,
) -> Start:
  """The newest readable checkpoint (state, data position, loop counters), else a new state.

  Unreadable checkpoints are moved aside (`checkpoint.restore_latest`);
  when there were some and none is readable, `loop.require_readable` decides.
  """
  is_main = distributed.is_main_process()
  had_checkpoints = bool(manager.all_steps())
  restored = checkpoint_lib.restore_latest(
      manager, step_program.abstract_state, data_iterator, move_unreadable=True
  )
  where = checkpoint_lib.checkpoint_dir(workdir)
  corrupt = checkpoint_lib.corrupt_checkpoints(workdir)
  loop_lib.require_readable(
      restored is not None,
      had_checkpoints,
      corrupt,
      config.checkpoint.restart_if_unreadable,
      where,
      is_main,
  )
  if restored is None:
    return Start(initialise(config, step_program), 0, {})
  state, step = restored
  if is_main:
    print(f'resumed from the checkpoint at step {step} in {where}', flush=True)
  if step > config.train.num_steps:
    raise checkpoint_lib.IncompatibleCheckpointError(
        f'train.num_steps={config.train.num_steps} is below the restored checkpoint step {step} '
        f'in {where}; raise num_steps or use another --workdir'
    )
  return Start(state, step, checkpoint_lib.saved_loop(manager, step))


def initialise(config: ml_collections.ConfigDict, step_program: steps_lib.TrainStep) -> Any:
  """A new train state, created directly in its shardings (with `model.pretrained`'s
  parameters, and an optimizer state for them, when given)."""
  shardings = step_program.state_shardings
  key = jax.random.PRNGKey(config.seed)
  state = jax.jit(step_program.init_state, out_shardings=shardings)(key)
  pretrained = state_lib.pretrained_params(config)
  if pretrained:
    params = state_lib.place_pretrained(state.params, pretrained, shardings.params)
    init_opt = jax.jit(step_program.optimizer.init, out_shardings=shardings.opt_state)
    state = state.replace(params=params, opt_state=init_opt(params))
  return state


# --------------------------------------------------------------------------
# Compile.


@dataclasses.dataclass(frozen=True)
class CompiledStep:
  """The train step compiled ahead of time, and XLA's FLOP count of it per device (None:
  unknown)."""

  step_fn: Any
  flops_per_step: float | None


def compile_step(
    step_program: steps_lib.TrainStep, tables: dict[str, jax.Array] | None = None
) -> CompiledStep:
  """The compiled step as the loop calls it, `(state, batch) -> (state, metrics)`: with a
  resident split, its tables are the third argument of every call."""
  compiled, compile_s = step_program.compile()
  flops_per_step = state_lib.count_flops(compiled)
  step_fn = compiled if tables is None else functools.partial(_with_tables, compiled, tables)
  if distributed.is_main_process():
    print(
        f'compiled the train step in {compile_s:.1f} s'
        + (f'; {flops_per_step / 1e9:.1f} GFLOP per step and device' if flops_per_step else ''),
        flush=True,
    )
  return CompiledStep(step_fn, flops_per_step)


def _with_tables(compiled, tables, state, batch):
  return compiled(state, batch, tables)


# --------------------------------------------------------------------------
# The loop: step, log, checkpoint, stop request (`loop.run_steps` calls the hooks).


@dataclasses.dataclass
class TrainLoop:
  """What the loop needs (built by `setup_loop`), and the hooks `loop.run_steps` calls
  (`loop.LoopHooks`): a step, the checkpoint interval, the sync point, a save."""

  config: ml_collections.ConfigDict
  workdir: storage.Path
  manager: Any
  compiled: CompiledStep
  state: Any
  end: int
  batches: device_prefetch.DevicePrefetch
  writer: metrics_lib.MetricWriter
  skips: SkipMonitor
  progress: progress_lib.Progress
  check_every: int  # steps between skip checks
  peak: float | None  # the device's peak FLOP/s (None: unknown)
  is_main: bool
  metrics: Any = None  # the last step's, on the devices
  last_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
  window_start: float = dataclasses.field(default_factory=time.perf_counter)
  window_steps: int = 0  # steps since the last log
  profiling: bool = False

  def dispatch(self, step: int) -> None:
    t = self.config.train
    if step == t.profile_start_step and self.is_main:
      jax.profiler.start_trace(str(self.workdir / 'profile'))
      self.profiling = True
    self.state, self.metrics = take_step(self.compiled.step_fn, self.state, self.batches)
    self.window_steps += 1
    self.skips.add(step + 1, self.metrics['skipped_updates'])
    self.progress.update(1)

  def save_due(self, step: int) -> bool:
    return self.manager.should_save(step)

  def sync(self, step: int) -> None:
    t = self.config.train
    if step % self.check_every == 0:
      self.skips.check()
    if self.profiling and step >= t.profile_start_step + t.profile_num_steps:
      jax.block_until_ready(self.state.params)
      jax.profiler.stop_trace()
      self.profiling = False
    if step % t.log_every == 0 or step == self.end:
      log_metrics(self, step)

  def save(self, step: int, stopping: bool) -> None:
    save_checkpoint(self, step, force=stopping)


def setup_loop(
    config: ml_collections.ConfigDict,
    workdir: storage.Path,
    mesh,
    manager,
    start: Start,
    end: int,
    compiled: CompiledStep,
    data_iterator: Any,
    closers: contextlib.ExitStack,
) -> TrainLoop:
  """The loop's state from `start` to `end`: the metric writer, the skip monitor, the progress
  bar, and the global batches, built by a thread `data.prefetch_to_device` steps ahead
  (checkpoints record the data position of the batches the steps consumed). `closers` closes
  the writer and the thread."""
  t = config.train
  is_main = distributed.is_main_process()
  writer = metrics_lib.MetricWriter(workdir, start_step=start.step)
  closers.callback(writer.close)
  skips = SkipMonitor(
      t.max_consecutive_skipped,
      int(jax.device_get(start.state.skipped)),
      start.counters.get('consecutive_skipped', 0),
  )
  limit = t.max_consecutive_skipped
  progress = progress_lib.Progress(
      end - start.step,
      'pretraining',
      'step',
      enabled=is_main and t.progress_bar and end > start.step,
      log_every=t.log_every,
  )
  peak = metrics_lib.peak_flops(jax.devices()[0])
  keys = (
      batch_lib.INDEX_KEYS
      if config.data.resident
      else batch_lib.BatchLayout.from_config(config).host_keys
  )
  batches = device_prefetch.DevicePrefetch(
      data_iterator,
      lambda local: sharding.global_batch_from_local({k: local[k] for k in keys}, mesh),
      config.data.prefetch_to_device,
  )
  closers.callback(batches.close)
  return TrainLoop(
      config=config,
      workdir=workdir,
      manager=manager,
      compiled=compiled,
      state=start.state,
      end=end,
      batches=batches,
      writer=writer,
      skips=skips,
      progress=progress,
      check_every=min(t.log_every, limit) if limit else t.log_every,
      peak=peak,
      is_main=is_main,
  )


def take_step(step_fn, state: Any, batches: device_prefetch.DevicePrefetch) -> tuple[Any, Any]:
  """One train step on the next global batch: `(state, metrics)`, both left on the devices."""
  batch = next(batches)
  return step_fn(state, batch)


def log_metrics(loop: TrainLoop, step: int) -> None:
  """Fetches the last step's metrics, adds the step time, throughput and MFU over the steps
  since the last log, and writes them (metrics.jsonl, TensorBoard, the progress bar)."""
  metrics = jax.device_get(loop.metrics)
  step_time = (time.perf_counter() - loop.window_start) / loop.window_steps
  last = {k: float(v) for k, v in metrics.items()}
  last.update({'step_time_s': step_time, 'samples_per_s': loop.config.data.batch_size / step_time})
  flops = loop.compiled.flops_per_step
  if flops and loop.peak:
    last['mfu'] = flops / step_time / loop.peak  # XLA counts per device
  loop.writer.write(step, last)
  loop.progress.set_postfix(loss=f'{last["loss/total"]:.3f}', skipped=int(last['skipped_updates']))
  loop.last_metrics = last
  loop.window_start, loop.window_steps = time.perf_counter(), 0


def save_checkpoint(loop: TrainLoop, step: int, force: bool) -> None:
  """Never a diverged state; the metric rows up to a checkpoint are durable before it; the
  data position of the consumed batches and the consecutive-skip count go with it."""
  check_before_save(loop.state, step, loop.skips)
  # Fencing: a trainer whose lock was taken over (or cannot be confirmed) stops here.
  lock_lib.confirm(loop.workdir, lock_lib.TRAIN_LOCK_FILE)
  loop.writer.flush()
  checkpoint_lib.save(
      loop.manager,
      step,
      loop.state,
      loop.batches,
      loop.config,
      force=force,
      loop={'consecutive_skipped': loop.skips.consecutive},
  )


# --------------------------------------------------------------------------
# Finish.


def finish(loop: TrainLoop, step: int, preempted: bool) -> RunResult:
  """A final checkpoint (forced: also when the interval is not due); the `_run_locked` caller
  waits for the async saves."""
  loop.progress.close()
  if loop.manager.latest_step() != step:
    save_checkpoint(loop, step, force=True)
  if preempted and loop.is_main:
    print(
        f'stopped at step {step} on request; checkpoint saved in '
        f'{checkpoint_lib.checkpoint_dir(loop.workdir)}. Run the same command again to resume.',
        flush=True,
    )
  return RunResult(state=loop.state, last_metrics=loop.last_metrics, preempted=preempted)


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
