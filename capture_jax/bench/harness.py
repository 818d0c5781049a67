r"""Benchmarks on whatever devices are present; appends dated rows to docs/BENCHMARKS.md.

    python -m capture_jax.bench --what=train --configs=demo,capture_paper --batch_sizes=8,32
    python -m capture_jax.bench --what=train --configs=capture_paper --batch_sizes=256 \
        --dtype=bfloat16 --attention_impl=dot_product_attention          # on an accelerator

Train step: the full jitted, sharded step (forward, backward, global-batch
contrastive loss, AdamW) on random inputs of the config's shapes, compiled
ahead of time (compile time reported), warmed up, then `--repeats` timed steps
with the device synchronised; the median step time is reported, with
samples/s, peak memory (device memory stats on accelerators; the compiled
program's argument + temp + output bytes on CPU) and, on accelerators, model
FLOP utilisation from XLA's counted FLOPs against the device's peak.

Export (`--what=export`): `capture_jax.export` of the demo world's gallery
and dev instance rows with the demo model (random weights: the same compute as
a checkpoint), on the data `make demo` builds in `--data_workdir` (built first
if missing); median samples/s of `--repeats` exports after one warm-up export.

Other parts have their own benchmark modules, which this command runs with
`--what`: `input` (`capture_jax.bench.input`), `search`
(`capture_jax.bench.search`).
"""

from __future__ import annotations

import datetime
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Iterator

import jax
from absl import flags

from capture_jax import batch as batch_lib
from capture_jax import cli
from capture_jax import config as config_lib
from capture_jax import demo as demo_lib
from capture_jax import train
from capture_jax.training import metrics as metrics_lib
from capture_jax.training import sharding
from capture_jax.training import state as state_lib
from capture_jax.training import steps as steps_lib

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS_MD = REPO / 'docs' / 'BENCHMARKS.md'
TRAIN_SECTION = '## Train step'


def machine() -> str:
  devices = jax.devices()
  kind = devices[0].device_kind
  return f'{len(devices)} x {kind} ({devices[0].platform}), {os.cpu_count()} CPU cores'


def peak_memory_bytes(compiled) -> tuple[float, str]:
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return float(stats['peak_bytes_in_use']), 'device peak'
  analysis = compiled.memory_analysis()
  total = (
      analysis.argument_size_in_bytes
      + analysis.output_size_in_bytes
      + analysis.temp_size_in_bytes
      - analysis.alias_size_in_bytes
  )
  return float(total), 'compiled args+temp+out'


def build_train_step(config, batch_size: int):
  """The compiled train step, an initial state and a device batch for `config` at `batch_size`.

  Returns `(compiled, state, batch, host_batch, compile_s)`; `compiled(state, batch)`
  donates `state`.
  """
  config = config.copy_and_resolve_references()
  config.data.batch_size = batch_size
  config_lib.validate(config)
  mesh = sharding.make_mesh(config.mesh)
  train.validate_config(config, mesh)
  program = steps_lib.build_train_step(config, mesh)
  state = jax.jit(program.init_state, out_shardings=program.state_shardings)(
      jax.random.PRNGKey(config.seed)
  )
  layout = batch_lib.BatchLayout.from_config(config)
  host_batch = layout.host_random(batch_size, config.model.vocab_size)
  batch = jax.device_put(host_batch, program.batch_sharding)
  compiled, compile_s = program.compile()
  return compiled, state, batch, host_batch, compile_s


def bench_train_step(config, batch_size: int, repeats: int, warmup: int) -> dict:
  compiled, state, batch, _, compile_s = build_train_step(config, batch_size)
  for _ in range(warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  step = statistics.median(times)
  flops = state_lib.count_flops(compiled)
  peak = metrics_lib.peak_flops(jax.devices()[0])
  memory, memory_kind = peak_memory_bytes(compiled)
  return {
      'batch': batch_size,
      'step_s': step,
      'samples_per_s': batch_size / step,
      'compile_s': compile_s,
      'memory_gib': memory / 2**30,
      'memory_kind': memory_kind,
      'mfu': (flops / step / peak) if (flops and peak) else None,  # XLA counts per device
      'loss': float(metrics['loss/total']),
  }


EXPORT_SECTION = '## Export (benchmark harness)'
EXPORT_NOTE = """Rows appended by `python -m capture_jax.bench --what=export`: `capture_jax.export` of the demo
world with the demo model (random weights), median samples/s (split rows over the export loop: reading,
collating, the jitted inference step, writing the shard; compilation excluded) of the timed exports after one
warm-up export."""
EXPORT_HEADER = (
    '| date | machine | config | rows | count | samples/s | eval batch |\n'
    '|---|---|---|---|---:|---:|---:|'
)


def bench_export(data_workdir: Path, repeats: int) -> list[dict]:
  """Median export samples/s of the demo gallery (samples) and dev (instances) rows."""
  import tempfile  # pylint: disable=import-outside-toplevel
  from capture_jax.retrieval import exporting as export_lib  # pylint: disable=import-outside-toplevel

  config = load_named_config('demo')
  demo_lib.fill_data_paths(config, data_workdir)
  demo_lib.prepare_data(config)
  results = []
  for split, rows in (('gallery', 'samples'), ('dev', 'instances')):
    with tempfile.TemporaryDirectory() as out:
      rates = []
      for i in range(repeats + 1):
        r = export_lib.export(
            config,
            data_workdir,
            split,
            rows=rows,
            random_init=True,
            out=out,
            overwrite=True,
            progress=False,
        )
        if i:  # the first export is the warm-up
          rates.append(r.samples_per_s)
      results.append(
          {
              'rows': f'{split} ({rows})',
              'count': r.metadata['count'],
              'samples_per_s': statistics.median(rates),
              'batch': config.data.eval_batch_size,
          }
      )
  return results


def load_named_config(name: str):
  path = Path(name) if name.endswith('.py') else REPO / 'configs' / f'{name}.py'
  return config_lib.load_config_file(path)


def append_rows(section: str, header: str, rows: list[str], note: str) -> None:
  """Appends rows under `section` in docs/BENCHMARKS.md (creating the section and its table header)."""
  text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else '# Benchmarks\n'
  if section not in text:
    text = text.rstrip('\n') + f'\n\n{section}\n\n{note}\n\n{header}\n'
  start = text.index(section)
  next_section = text.find('\n## ', start + len(section))
  end = len(text) if next_section < 0 else next_section
  block = text[start:end].rstrip('\n') + '\n' + '\n'.join(rows) + '\n'
  BENCHMARKS_MD.write_text(
      text[:start] + block + ('\n' + text[end:].lstrip('\n') if next_section >= 0 else '')
  )


TRAIN_NOTE = """Full train step (forward, backward, global-batch contrastive loss, AdamW) on random
inputs of the config's shapes, median of the timed steps after warm-up, device
synchronised. Each row is appended by
`python -m capture_jax.bench --what=train --configs=CONFIG --batch_sizes=BATCH --dtype=DTYPE
--attention_impl=IMPL [--remat]` with the row's values. Memory on CPU is the compiled program's arguments +
temporaries + outputs; on accelerators the device's peak bytes in use."""
TRAIN_HEADER = (
    '| date | machine | config | options | batch | step s | samples/s | compile s | memory GiB | MFU |\n'
    '|---|---|---|---|---:|---:|---:|---:|---:|---:|'
)


def define_flags() -> dict[str, flags.FlagHolder]:
  """The command's flags (defined when the command runs, not on import)."""
  return {
      'what': flags.DEFINE_string(
          'what', 'train', 'Comma-separated parts to time: train, export, input, search.'
      ),
      'data_workdir': flags.DEFINE_string(
          'data_workdir', 'runs/demo', 'The demo data for --what=export.'
      ),
      'configs': flags.DEFINE_string(
          'configs', 'demo,capture_paper', 'Comma-separated configs/ names (train).'
      ),
      'batch_sizes': flags.DEFINE_string('batch_sizes', '8,32', 'Comma-separated batch sizes.'),
      'dtype': flags.DEFINE_string('dtype', 'float32', 'model.dtype (train).'),
      'attention_impl': flags.DEFINE_string(
          'attention_impl', 'xla', 'model.attention_impl (train).'
      ),
      'remat': flags.DEFINE_bool('remat', False, 'model.remat (train).'),
      'repeats': flags.DEFINE_integer('repeats', 5, 'Timed steps (train) or exports (export).'),
      'warmup': flags.DEFINE_integer('warmup', 2, 'Untimed steps first (train).'),
      'no_record': flags.DEFINE_bool(
          'no_record', False, 'Print only; do not append to docs/BENCHMARKS.md.'
      ),
  }


def print_and_record(
    rows: Iterator[str], section: str, header: str, note: str, args: types.SimpleNamespace
) -> None:
  """Prints each table row as it is measured, then appends them all to docs/BENCHMARKS.md
  (`append_rows`) unless `--no_record`."""
  done = []
  for row in rows:
    print(row, flush=True)
    done.append(row)
  if not args.no_record:
    append_rows(section, header, done, note)


def _train_rows(args: types.SimpleNamespace, today: str) -> Iterator[str]:
  """One row per config and batch size: the train step's time, throughput, compile time,
  memory and MFU."""
  for name in args.configs.split(','):
    config = load_named_config(name)
    config.model.update(dtype=args.dtype, attention_impl=args.attention_impl, remat=args.remat)
    options = f'{args.dtype}, {args.attention_impl}' + (', remat' if args.remat else '')
    for batch_size in (int(b) for b in args.batch_sizes.split(',')):
      r = bench_train_step(config, batch_size, args.repeats, args.warmup)
      mfu = f'{100 * r["mfu"]:.1f}%' if r['mfu'] is not None else 'n/a'
      yield (
          f'| {today} | {machine()} | {name} | {options} | {r["batch"]} | {r["step_s"]:.3f} | '
          f'{r["samples_per_s"]:.1f} | {r["compile_s"]:.1f} | {r["memory_gib"]:.2f} | {mfu} |'
      )


def _export_rows(args: types.SimpleNamespace, today: str) -> Iterator[str]:
  """One row per export measurement of the demo run in `--data_workdir`."""
  for r in bench_export(Path(args.data_workdir), args.repeats):
    yield (
        f'| {today} | {machine()} | demo | {r["rows"]} | {r["count"]} | {r["samples_per_s"]:.1f} | '
        f'{r["batch"]} |'
    )


def main(args: dict[str, flags.FlagHolder]) -> None:
  args = types.SimpleNamespace(**{k: h.value for k, h in args.items()})
  what = set(args.what.split(','))
  print(f'machine: {machine()}', flush=True)
  today = datetime.date.today().isoformat()

  if 'train' in what:
    print_and_record(_train_rows(args, today), TRAIN_SECTION, TRAIN_HEADER, TRAIN_NOTE, args)
  if 'export' in what:
    print_and_record(_export_rows(args, today), EXPORT_SECTION, EXPORT_HEADER, EXPORT_NOTE, args)
  for part, module in (
      ('input', 'capture_jax.bench.input'),
      ('search', 'capture_jax.bench.search'),
  ):
    if part in what:
      print(f'running python -m {module}', flush=True)
      subprocess.run([sys.executable, '-m', module], check=True)


def console_main() -> None:
  """`python -m capture_jax.bench` and `python -m capture_jax.bench.harness`."""
  args = define_flags()
  cli.run(lambda argv: main(args))


if __name__ == '__main__':
  console_main()
