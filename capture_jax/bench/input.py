"""Input-pipeline throughput: training batches per second per CPU core.

Builds the demo training data once (synthetic world -> WordPiece vocab ->
TFDS ArrayRecords) under `--work_dir`, pins this process to `--cores` CPU cores
(so wall-clock throughput is per-core throughput, every thread of the
reader and the tokenizer included), warms up, then times `--repeats` windows
of `--batches` training batches and prints the medians: samples/s per core
by the wall clock, and samples per CPU-second (user + system time of the
process and of its Grain worker processes, robust to other load on the
machine).

    python -m capture_jax.bench.input [--config=configs/demo.py] [--cores=1] [--num_workers=0]

Target: 2,000 samples/s per core (one 16-core host feeding 8 accelerators at
batch 256 each).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import sys
import time

import ml_collections
import psutil
from absl import flags
from ml_collections import config_flags

from capture_jax import cli
from capture_jax import config as config_lib
from capture_jax.data import train_input
from capture_jax.data import product1m_tfds
from capture_jax.data import synthetic
from capture_jax.data import tokenizer as tokenizer_lib

TARGET_PER_CORE = 2000.0


def prepare_data(
    config: ml_collections.ConfigDict, work_dir: str, num_train: int | None = None
) -> None:
  """Points config.data at synthetic training data under work_dir (the
  config's preset, feature_dim and max_regions), creating what is missing."""
  d = config.data
  d.data_dir = d.data_dir or os.path.join(work_dir, 'data')
  d.tfds_dir = d.tfds_dir or os.path.join(work_dir, 'tfds')
  d.vocab_file = d.vocab_file or os.path.join(work_dir, 'vocab.txt')
  if not os.path.exists(os.path.join(d.data_dir, 'synthetic_world.json')):
    print(f'generating the {d.synthetic_preset} world in {d.data_dir}', file=sys.stderr)
    preset = dataclasses.replace(
        synthetic.PRESETS[d.synthetic_preset], feature_dim=d.feature_dim, max_regions=d.max_regions
    )
    if num_train:
      preset = dataclasses.replace(preset, num_train=num_train)
    synthetic.generate(
        d.data_dir, preset, seed=d.synthetic_seed, splits=['train'], feature_format=d.feature_format
    )
  tokenizer_lib.ensure_vocab(d)
  if not os.path.isdir(product1m_tfds.dataset_dir(d.tfds_dir, d.storage_dtype)):
    product1m_tfds.build_from_config(config)


def pin_to_cores(cores: int) -> list[int]:
  """Restricts this process (and threads it starts) to its first `cores` CPUs."""
  available = sorted(os.sched_getaffinity(0))
  if cores > len(available):
    raise ValueError(f'asked for {cores} cores, {len(available)} available')
  chosen = available[:cores]
  os.sched_setaffinity(0, chosen)
  return chosen


def tree_cpu_seconds() -> float:
  """User + system CPU seconds of this process and its live descendants (Grain's workers):
  `os.times()` counts children only once they have been waited for."""
  me = psutil.Process()
  total = 0.0
  for p in [me, *me.children(recursive=True)]:
    try:
      t = p.cpu_times()
    except psutil.NoSuchProcess:  # a worker that ended in the window: its time is lost
      continue
    total += t.user + t.system
  return total


def measure(
    config: ml_collections.ConfigDict, *, warmup: int, batches: int, repeats: int
) -> dict[str, float]:
  """Times training batches; returns median samples/s (wall) and per CPU-second (this process
  and its Grain workers, `tree_cpu_seconds`), and the bytes per sample of the host batch (what
  crosses to the devices)."""
  it = train_input.make_train_iterator(config, process_index=0, process_count=1)
  batch = config.data.batch_size
  first = next(it)
  bytes_per_sample = sum(v.nbytes for v in first.values()) / batch
  for _ in range(warmup):
    next(it)
  wall, cpu = [], []
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), tree_cpu_seconds()
    for _ in range(batches):
      next(it)
    t1, c1 = time.perf_counter(), tree_cpu_seconds()
    wall.append(batch * batches / (t1 - t0))
    cpu_s = c1 - c0
    cpu.append(batch * batches / max(cpu_s, 1e-9))
  if hasattr(it, 'close'):
    it.close()  # Grain worker processes
  return {
      'bytes_per_sample': bytes_per_sample,
      'wall_samples_per_s': statistics.median(wall),
      'samples_per_cpu_s': statistics.median(cpu),
      'wall_min': min(wall),
      'wall_max': max(wall),
  }


def define_flags() -> dict[str, flags.FlagHolder]:
  """The command's flags (defined when the command runs, not on import)."""
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  demo = os.path.join(repo, 'configs', 'demo.py')
  return {
      'config': config_flags.DEFINE_config_file(
          'config',
          demo if os.path.exists(demo) else None,
          'A configs/*.py file (default: configs/demo.py; the base config where that is absent).',
          lock_config=False,
      ),
      'work_dir': flags.DEFINE_string(
          'work_dir', '/tmp/capture_jax_data_benchmark', 'Where the benchmark data is (or goes).'
      ),
      'batch_size': flags.DEFINE_integer('batch_size', 256, 'Training batch size.'),
      'cores': flags.DEFINE_integer('cores', 1, 'CPU cores to pin this process to.'),
      'num_workers': flags.DEFINE_integer(
          'num_workers',
          0,
          'Grain worker processes (data.num_workers; they share the pinned cores, and the '
          'CPU-second rate counts their CPU).',
      ),
      'warmup': flags.DEFINE_integer('warmup', 5, 'Untimed batches first.'),
      'batches': flags.DEFINE_integer('batches', 20, 'Batches per timed window.'),
      'repeats': flags.DEFINE_integer('repeats', 7, 'Timed windows (the median is reported).'),
      # Other data sizes, e.g. the paper's: --preset=small --feature_dim=2048
      # --max_regions=36 --num_train=2000 (use a separate --work_dir).
      'preset': flags.DEFINE_enum(
          'preset', None, sorted(synthetic.PRESETS), "Synthetic world (default: the config's)."
      ),
      'feature_dim': flags.DEFINE_integer(
          'feature_dim', None, "Region feature width (default: the config's)."
      ),
      'max_regions': flags.DEFINE_integer(
          'max_regions', None, "Regions per image (default: the config's)."
      ),
      'num_train': flags.DEFINE_integer(
          'num_train', None, "Training pairs of the world (default: the preset's)."
      ),
  }


def main(args: dict[str, flags.FlagHolder]) -> None:
  config = args['config'].value if args['config'].value is not None else config_lib.base_config()
  d = config.data
  if args['preset'].value:
    d.synthetic_preset = args['preset'].value
  if args['feature_dim'].value:
    d.feature_dim = config.model.v_feature_size = args['feature_dim'].value
  if args['max_regions'].value:
    d.max_regions = args['max_regions'].value
  prepare_data(config, args['work_dir'].value, args['num_train'].value)
  d.batch_size = args['batch_size'].value
  d.num_workers = args['num_workers'].value
  config_lib.check_or_exit(config)
  n = args['cores'].value
  # One core: reader threads cannot run in parallel with the main thread, so
  # read synchronously; with more cores, one reader thread per extra core.
  d.read_threads = max(0, n - 1)
  d.prefetch_batches = max(1, n - 1) if n > 1 else 0
  cores = pin_to_cores(n)
  warmup, batches, repeats = (args[k].value for k in ('warmup', 'batches', 'repeats'))
  res = measure(config, warmup=warmup, batches=batches, repeats=repeats)
  per_core = res['wall_samples_per_s'] / n
  print(
      f'machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs '
      f'visible, pinned to {cores}'
  )
  print(
      f'data: {d.tfds_dir} (train, {d.storage_dtype}), T={d.max_text_len} '
      f'R={d.max_regions} F={d.feature_dim}, batch {d.batch_size}, {d.num_workers} workers, '
      f'{repeats} x {batches} batches after {warmup} warm-up'
  )
  print(
      f'samples/s per core (wall, median): {per_core:,.0f} '
      f'[min {res["wall_min"] / n:,.0f}, max {res["wall_max"] / n:,.0f}]'
  )
  print(f'samples per CPU-second (median):   {res["samples_per_cpu_s"]:,.0f}')
  print(f'host batch bytes per sample:       {res["bytes_per_sample"]:,.0f}')
  verdict = 'meets' if per_core >= TARGET_PER_CORE else 'BELOW'
  print(f'target {TARGET_PER_CORE:,.0f} samples/s per core: {verdict}')


def console_main() -> None:
  """`python -m capture_jax.bench.input`."""
  args = define_flags()
  cli.run(lambda argv: main(args))


if __name__ == '__main__':
  console_main()
