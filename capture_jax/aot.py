r"""Ahead-of-time compilation for accelerators this host does not have: memory fit and FLOPs.

    python -m capture_jax.aot --config=configs/capture_paper.py --target=v5e-16 \
        [--steps=train,export] [--json=PATH] [--find_max_batch] [--config.FIELD=value ...]

Compiles the real train step (`training/steps.build_train_step`, the one the
trainer runs) and the embedding-export step (`evaluation/embedding_lib.build_export_step`)
for a target's compile-only devices (`accelerators.target`: `v4-8` ... `v5p-64`,
`h100x8`, `h200x8`, `2xv5e-256`), with the config checked against the
target's device and process counts, not this host's. It prints, and writes
with `--json`, per step:

- compile seconds;
- per-device argument, output, temporary and total bytes against the chip's HBM;
- FLOPs per device: XLA's count of the compiled program on TPU; on GPU (where
  XLA gives none) XLA's count of the same global step lowered for this host,
  divided by the device count;
- the step time and samples/s those FLOPs take at 100% and at 50% of the chip's peak;
- with `--config.data.resident=True`, the training split resident in device memory
  (`training/resident.py`) of `--resident_records` records counted in the fit: its tables are
  the step's arguments. A split above `data.resident_memory_fraction` of a device's usable
  memory is refused before compiling, with the figures.

A step that does not fit exits 1 with the shortfall and what to try.
`--find_max_batch` searches the largest global train batch that fits
(memory is close to affine in the batch: two compiles predict it, compiles
around the prediction confirm it).

Needs the compilers, not the chips: `pip install -e .[aot]` (libtpu and the
CUDA PJRT plugin without the CUDA libraries). The host computes on its CPU
(`cli.run` picks the CPU backend on a host without accelerators; the target's
devices come from `jax.experimental.topologies`, whatever `JAX_PLATFORMS` says).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

from capture_jax import accelerators
from capture_jax import cli
from capture_jax import storage

STEPS = ('train', 'export')


@dataclasses.dataclass(frozen=True)
class Fit:
  """One compiled step on one target. Bytes are per device."""

  step: str
  target: str
  chip: str
  batch: int  # global: data.batch_size (train) or data.eval_batch_size (export)
  compile_s: float
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  alias_bytes: int
  code_bytes: int
  hbm_bytes: int  # usable per device (`Target.usable_bytes`)
  flops_per_device: float | None
  flops_source: str
  peak_flops: float
  refused: str = ''  # XLA's own out-of-memory refusal (TPU compilers check HBM themselves)
  resident_bytes: int = 0  # of `argument_bytes`: the resident training split's tables

  @property
  def total_bytes(self) -> int:
    """Live at the step's peak: arguments + outputs (less those aliased to donated arguments)
    + temporaries + the program."""
    return (
        self.argument_bytes
        + self.output_bytes
        - self.alias_bytes
        + self.temp_bytes
        + self.code_bytes
    )

  @property
  def fits(self) -> bool:
    return not self.refused and self.total_bytes <= self.hbm_bytes

  def step_seconds(self, mfu: float) -> float | None:
    return self.flops_per_device / (mfu * self.peak_flops) if self.flops_per_device else None

  def as_dict(self) -> dict[str, Any]:
    row = dataclasses.asdict(self)
    row.update(total_bytes=self.total_bytes, fits=self.fits)
    for mfu in (1.0, 0.5):
      seconds = self.step_seconds(mfu)
      row[f'step_s_at_{int(mfu * 100)}pct'] = seconds
      row[f'samples_per_s_at_{int(mfu * 100)}pct'] = self.batch / seconds if seconds else None
    return row


FIT_FIELDS = tuple(f.name for f in dataclasses.fields(Fit))


def _gib(n: float) -> str:
  return f'{n / 2**30:.2f} GiB'


def describe(fit: Fit) -> str:
  """The lines `aot` prints for one compiled step."""
  if fit.refused:
    return (
        f'{fit.step} step on {fit.target} ({fit.chip}), global batch {fit.batch}: XLA refused it '
        f'after {fit.compile_s:.1f} s: {fit.refused}'
    )
  lines = [
      f'{fit.step} step on {fit.target} ({fit.chip}), global batch {fit.batch}: compiled in '
      f'{fit.compile_s:.1f} s',
      f'  per device: arguments {_gib(fit.argument_bytes)}, outputs {_gib(fit.output_bytes)} '
      f'(aliased {_gib(fit.alias_bytes)}), temporaries {_gib(fit.temp_bytes)}, program '
      f'{_gib(fit.code_bytes)}; total {_gib(fit.total_bytes)} of {_gib(fit.hbm_bytes)} usable '
      f'({100 * fit.total_bytes / fit.hbm_bytes:.0f}%)',
  ]
  if fit.resident_bytes:
    lines.append(f'  of the arguments, the resident training split: {_gib(fit.resident_bytes)}')
  if fit.flops_per_device:
    t100, t50 = fit.step_seconds(1.0), fit.step_seconds(0.5)
    lines.append(
        f'  {fit.flops_per_device / 1e9:,.1f} GFLOP per device ({fit.flops_source}); at '
        f'{fit.peak_flops / 1e12:.0f} TFLOP/s peak: {t100 * 1e3:.3g} ms/step '
        f'({fit.batch / t100:,.0f} samples/s) at 100%, {t50 * 1e3:.3g} ms/step '
        f'({fit.batch / t50:,.0f} samples/s) at 50% MFU'
    )
  return '\n'.join(lines)


def advice(fit: Fit, config: ml_collections.ConfigDict) -> str:
  """Why it does not fit, by how much, and what to try (one line)."""
  tries = []
  if fit.step == 'train':
    if config.mesh.fsdp == 1:
      tries.append('--config.mesh.fsdp=N (shard parameters and optimizer state)')
    if not config.model.remat:
      tries.append('--config.model.remat=True')
    tries.append(f'--config.train.microbatches={2 * config.train.microbatches}')
    if config.model.dtype == 'float32':
      tries.append("--config.model.dtype='bfloat16'")
  tries.append(
      'a smaller per-device batch (--find_max_batch finds the largest that fits)'
      if fit.step == 'train'
      else 'a smaller --config.data.eval_batch_size'
  )
  if fit.refused:
    return (
        f'the {fit.step} step at global batch {fit.batch} does not fit on {fit.target} '
        f'({fit.chip}, {_gib(fit.hbm_bytes)} per device): {fit.refused}; try ' + ', '.join(tries)
    )
  over = fit.total_bytes - fit.hbm_bytes
  return (
      f'the {fit.step} step at global batch {fit.batch} needs {_gib(fit.total_bytes)} per '
      f'device on {fit.target}, {_gib(over)} more than the {_gib(fit.hbm_bytes)} of a '
      f'{fit.chip} ({100 * over / fit.hbm_bytes:.0f}% over); try ' + ', '.join(tries)
  )


# --------------------------------------------------------------------------
# Compiling.


def host_flops(build, config: ml_collections.ConfigDict) -> float | None:
  """XLA's FLOP count of the global step lowered (not compiled) for one host CPU device.

  XLA counts a loop's body once, so the count is of the same computation without loops: one
  micro-batch, unscanned layers and the unrolled dropout bits (the same FLOPs per step).
  """
  import jax  # pylint: disable=import-outside-toplevel

  from capture_jax.training import sharding  # pylint: disable=import-outside-toplevel

  host_config = config.copy_and_resolve_references()
  host_config.mesh.update(data=1, fsdp=1, tensor=1)
  host_config.train.update(microbatches=1, cpu_unrolled_threefry=True)
  host_config.model.scan_layers = False
  host_config.data.resident = False  # the model's FLOPs; the gather adds none
  mesh = sharding.make_mesh(host_config.mesh, jax.devices('cpu')[:1])
  analysis = build(host_config, mesh).lower().cost_analysis()
  return float(analysis.get('flops', 0.0)) or None if analysis else None


def check_traceable_here(config: ml_collections.ConfigDict, target: accelerators.Target) -> None:
  """Refuses `model.attention_impl='cudnn'` without a local GPU: at jax 0.10.2 tracing
  `jax.nn.dot_product_attention(implementation='cudnn')` asks the local cuDNN library for its
  version and the local GPU for its compute capability, so it cannot be compiled ahead of time
  from a CPU host (run the command on a GPU host, or compile with 'xla' for the memory fit)."""
  import jax  # pylint: disable=import-outside-toplevel

  if config.model.attention_impl != 'cudnn' or target.chip.platform != 'gpu':
    return
  try:
    has_gpu = bool(jax.devices('gpu'))
  except RuntimeError:
    has_gpu = False
  if not has_gpu:
    raise ValueError(
        "model.attention_impl='cudnn' cannot be compiled ahead of time on a host without a GPU: "
        'JAX queries the local cuDNN and GPU while tracing the fused attention. Run this command '
        'on a GPU host, or use --config.model.attention_impl=xla for the memory fit'
    )


def compile_step(
    step: str,
    config: ml_collections.ConfigDict,
    target: accelerators.Target,
    devices,
    resident_records: int = 0,
) -> Fit:
  """Compiles `step` ('train' or 'export') of `config` for `target`'s compile-only `devices`
  (with `data.resident`, the train step over a resident split of `resident_records` records).

  Raises ValueError (the config's problems against the target, a resident split that does not
  fit) before compiling.
  """
  import jax  # pylint: disable=import-outside-toplevel

  from capture_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from capture_jax import train  # pylint: disable=import-outside-toplevel
  from capture_jax.retrieval import embedding as embedding_lib  # pylint: disable=import-outside-toplevel
  from capture_jax.training import sharding  # pylint: disable=import-outside-toplevel
  from capture_jax.training import state as state_lib  # pylint: disable=import-outside-toplevel
  from capture_jax.training import steps as steps_lib  # pylint: disable=import-outside-toplevel

  config_lib.validate(config)
  mesh = sharding.make_mesh(config.mesh, devices)
  check_traceable_here(config, target)
  resident_bytes = 0
  if step == 'train':
    train.validate_config(config, mesh)
    resident_bytes = _check_resident(config, mesh, target, resident_records)
    build = functools.partial(steps_lib.build_train_step, resident_records=resident_records)
    batch = config.data.batch_size
  else:
    build, batch = embedding_lib.build_export_step, config.data.eval_batch_size
  common = dict(
      step=step,
      target=target.name,
      chip=target.chip.name,
      batch=batch,
      hbm_bytes=target.usable_bytes(),
      peak_flops=target.chip.peak_bf16_flops,
      resident_bytes=resident_bytes,
  )
  start = time.perf_counter()
  try:
    compiled = build(config, mesh).lower().compile(dict(target.compiler_options))
  except jax.errors.JaxRuntimeError as e:
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    nothing = dict(argument_bytes=0, output_bytes=0, temp_bytes=0, alias_bytes=0, code_bytes=0)
    return Fit(
        **common,
        **nothing,
        compile_s=time.perf_counter() - start,
        flops_per_device=None,
        flops_source='',
        refused=str(e).split('\n', 1)[0],
    )
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  # XLA's count of the compiled program is per device, but counts a loop's body once: only
  # a TPU program without micro-batch or layer loops is counted as compiled.
  loops = config.train.microbatches > 1 or config.model.scan_layers
  flops = state_lib.count_flops(compiled) if target.chip.platform == 'tpu' and not loops else None
  source = 'XLA, compiled for the target'
  if flops is None:
    global_flops = host_flops(build, config)
    flops = global_flops / target.num_devices if global_flops else None
    source = 'XLA, global step lowered for the host / devices'
  return Fit(
      **common,
      compile_s=compile_s,
      argument_bytes=int(memory.argument_size_in_bytes),
      output_bytes=int(memory.output_size_in_bytes),
      temp_bytes=int(memory.temp_size_in_bytes),
      alias_bytes=int(memory.alias_size_in_bytes),
      code_bytes=int(memory.generated_code_size_in_bytes),
      flops_per_device=flops,
      flops_source=source,
  )


def _check_resident(config, mesh, target: accelerators.Target, records: int) -> int:
  """The resident split's bytes per device (0 without `data.resident`); refuses a split that
  does not fit `data.resident_memory_fraction` of the target's usable memory."""
  if not config.data.resident:
    return 0
  from capture_jax import batch as batch_lib  # pylint: disable=import-outside-toplevel
  from capture_jax.training import resident  # pylint: disable=import-outside-toplevel

  if records <= 0:
    raise ValueError(
        'data.resident: pass --resident_records, the records of the resident training split '
        "(Product1M's training pairs: about 1,000,000)"
    )
  rows = batch_lib.BatchLayout.from_config(config).row_shapes()
  fraction = config.data.resident_memory_fraction
  return resident.check_fits(rows, records, mesh, target.usable_bytes(), fraction)


def batch_granularity(config: ml_collections.ConfigDict, mesh_devices: int) -> int:
  """The global train batch must be a multiple of this: the mesh's batch devices times the
  micro-batches (`train.validate_config` says why a batch is refused)."""
  return mesh_devices * config.train.microbatches


def find_max_batch(
    config: ml_collections.ConfigDict,
    target: accelerators.Target,
    devices,
    log=print,
    max_compiles: int = 8,
    tolerance: float = 1 / 16,
    resident_records: int = 0,
) -> tuple[Fit | None, list[Fit]]:
  """The largest global train batch that fits on `target`, and every compile it took.

  Memory per device is close to affine in the batch (parameters and optimizer state are fixed,
  activations grow with it): compiles at the config's batch and at twice it fit the line, the
  prediction and its neighbour a batch granularity away are compiled, then the bracket of the
  largest fit and the smallest miss is bisected until it is one granularity (or `tolerance` of
  the batch) wide, or `max_compiles` compiles were spent. The smallest miss is in the list.
  """
  from capture_jax.training import sharding  # pylint: disable=import-outside-toplevel

  mesh = sharding.make_mesh(config.mesh, devices)
  unit = batch_granularity(config, sharding.batch_devices(mesh))
  tried: dict[int, Fit] = {}

  def fit_at(batch: int) -> Fit:
    if batch not in tried:
      trial = config.copy_and_resolve_references()
      trial.data.batch_size = batch
      tried[batch] = compile_step('train', trial, target, devices, resident_records)
      f = tried[batch]
      log(
          f'  batch {batch}: '
          + (
              f'refused by XLA ({f.refused})'
              if f.refused
              else f'{_gib(f.total_bytes)} per device, fits: {f.fits}'
          )
      )
    return tried[batch]

  a = max(unit, config.data.batch_size // unit * unit)
  b = 2 * a
  fa, fb = fit_at(a), fit_at(b)
  slope = (fb.total_bytes - fa.total_bytes) / (b - a)
  if fa.refused:  # already too big: halve from here
    guess = max(unit, a // 2 // unit * unit)
  elif fb.refused:  # XLA gave no figure at b: bisect between a and b
    guess = (a + b) // 2 // unit * unit
  elif slope > 0:
    guess = a + (target.usable_bytes() - fa.total_bytes) / slope
    guess = max(unit, int(guess) // unit * unit)
  else:
    guess = b
  lo = max((k for k, f in tried.items() if f.fits), default=0)  # fits
  hi = min((k for k, f in tried.items() if not f.fits), default=None)  # does not fit
  probe = guess
  while len(tried) < max_compiles:
    if hi is not None and hi - lo <= max(unit, int(lo * tolerance) // unit * unit):
      break
    if probe <= lo or (hi is not None and probe >= hi):  # bisect the bracket (or double)
      probe = lo * 2 if hi is None else (lo + hi) // 2 // unit * unit
      if probe <= lo:
        break
    if fit_at(probe).fits:
      lo = probe
    else:
      hi = probe
    # After the prediction, its neighbour a unit away usually closes the bracket; then bisect.
    probe = (probe + unit if probe == lo else probe - unit) if probe == guess else 0
  best = tried.get(lo)
  return best, [tried[k] for k in sorted(tried)]


# --------------------------------------------------------------------------
# Command line.


def run(
    config: ml_collections.ConfigDict,
    target_name: str,
    steps: tuple[str, ...] = STEPS,
    max_batch: bool = False,
    log=print,
    resident_records: int = 0,
) -> dict[str, Any]:
  """Compiles `steps` for `target_name`; returns the report dict (`--json`).

  A step that does not fit sets `report['error']` (the advice); raises ValueError on a bad
  config or target, accelerators.TargetUnavailableError when this host lacks the compilers.
  """
  target = accelerators.target(target_name)
  unknown = [s for s in steps if s not in STEPS]
  if unknown:
    raise ValueError(f'--steps: unknown {unknown}; steps are {STEPS}')
  devices = target.devices()
  log(
      f'target {target.name}: {target.num_devices} x {target.chip.name} over '
      f'{target.num_processes} host(s), {_gib(target.chip.hbm_bytes)} HBM and '
      f'{target.chip.peak_bf16_flops / 1e12:.0f} bf16 TFLOP/s per device'
  )
  report: dict[str, Any] = {
      'target': target.name,
      'chip': target.chip.name,
      'num_devices': target.num_devices,
      'num_processes': target.num_processes,
      'steps': {},
  }
  misfits = []
  for step in steps:
    fit = compile_step(step, config, target, devices, resident_records)
    log(describe(fit))
    report['steps'][step] = fit.as_dict()
    if not fit.fits:
      misfits.append(advice(fit, config))
  if max_batch:
    log('searching the largest global train batch that fits')
    best, tried = find_max_batch(config, target, devices, log, resident_records=resident_records)
    report['max_batch'] = best.batch if best else None
    misses = [f.batch for f in tried if not f.fits and (not best or f.batch > best.batch)]
    report['smallest_miss'] = min(misses, default=None)
    report['max_batch_compiles'] = [f.as_dict() for f in tried]
    log(
        f'largest global train batch that fits on {target.name}: {best.batch} '
        f'({_gib(best.total_bytes)} per device; smallest that does not: '
        f'{report["smallest_miss"]}; {len(tried)} compiles)'
        if best
        else f'no train batch fits on {target.name}'
    )
  if misfits:
    report['error'] = '; '.join(misfits)
  return report


def define_flags() -> dict[str, flags.FlagHolder]:
  """The command's flags (defined when the command runs, not on import)."""
  return {
      'config': config_flags.DEFINE_config_file(
          'config', None, 'A configs/*.py file.', lock_config=True
      ),
      'target': flags.DEFINE_string(
          'target',
          None,
          f'The accelerators to compile for, e.g. {", ".join(accelerators.TARGET_EXAMPLES)}.',
      ),
      'steps': flags.DEFINE_list('steps', list(STEPS), 'Which steps to compile.'),
      'json': flags.DEFINE_string('json', None, 'Also write the report as JSON here.'),
      'find_max_batch': flags.DEFINE_bool(
          'find_max_batch', False, 'Search the largest global train batch that fits.'
      ),
      'resident_records': flags.DEFINE_integer(
          'resident_records',
          0,
          'With --config.data.resident=True: the records of the training split resident in '
          "device memory (Product1M's training pairs: about 1,000,000).",
      ),
  }


def main(args: dict[str, flags.FlagHolder]) -> int:
  """Returns the exit status: 0, or 1 (one `error:` line) when a step does not fit or the
  config, the target or the compilers are refused."""
  import jax  # pylint: disable=import-outside-toplevel

  target = args['target'].value
  try:
    report = run(
        args['config'].value,
        target,
        tuple(args['steps'].value),
        args['find_max_batch'].value,
        resident_records=args['resident_records'].value,
    )
  except (ValueError, accelerators.TargetUnavailableError) as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    return 1
  except jax.errors.JaxRuntimeError as e:  # XLA refused the program for this target
    print(f'error: XLA could not compile for {target}: {e}', file=sys.stderr)
    return 1
  if args['json'].value:
    storage.write_text(args['json'].value, json.dumps(report, indent=2, sort_keys=True) + '\n')
  if 'error' in report:
    print(f'error: {report["error"]}', file=sys.stderr, flush=True)
    return 1
  return 0


def console_main() -> None:
  """`python -m capture_jax.aot` / `capture-aot`."""
  args = define_flags()
  flags.mark_flags_as_required(['config', 'target'])
  cli.run(lambda argv: main(args))


if __name__ == '__main__':
  console_main()
