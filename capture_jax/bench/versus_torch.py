r"""Our train step against the PyTorch peer (and optionally an older tree), alternating.

    python -m capture_jax.bench.versus_torch                       # the table of docs/BENCHMARKS.md
    python -m capture_jax.bench.versus_torch --cases=demo:64 --old_tree=/tmp/old --repeats=8

Each implementation runs in its own worker process (one process tree): `ours`
(this tree's jitted step), `torch` (`capture_jax.bench.torch_peer`: forward,
losses, backward, clip, `AdamW(foreach=True)`) and, with `--old_tree`, `old`
(the same jitted-step code imported from another checkout, e.g. `git archive` of
main). Workers build and warm up, then the parent asks them for one timed step
in turn (ours, torch, old, ours, ...), so load changes on a shared machine hit
every implementation alike. Printed per case: each median step time, samples/s,
the ratios, and achieved GFLOP/s against the matmul rate measured at start.

FLOPs per step are the peer's forward + backward counted by
`torch.utils.flop_counter` (matmuls and attention; the same model work for
every implementation, whatever each skips); XLA's own count of our compiled
step is printed beside it.
"""

from __future__ import annotations

import datetime
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

from absl import flags

THIS = Path(__file__).resolve()
REPO = THIS.parents[2]
SECTION = '## Train step versus PyTorch (one process tree, alternating)'


# --------------------------------------------------------------------------
# Workers: `python versus_torch.py --worker KIND CONFIG BATCH WARMUP`, one JSON line per answer
# on stdout. Positional, not flags, and no `capture_jax.cli`: a worker of `--old_tree` imports
# that older checkout, which may not have the helpers this tree has.


def _load_config(name: str):
  """A named config of the imported tree (the worker also runs an older checkout, whose loader
  was `demo.load_config`)."""
  from capture_jax import config as config_lib  # pylint: disable=import-outside-toplevel

  path = REPO / 'configs' / f'{name}.py'
  if hasattr(config_lib, 'load_config_file'):
    config = config_lib.load_config_file(path)
    if hasattr(config_lib, 'check_or_exit'):
      config_lib.check_or_exit(config)
    return config
  from capture_jax import demo as demo_lib  # pylint: disable=import-outside-toplevel

  return demo_lib.load_config(path)


def _random_batch(config, batch_size: int):
  """Numpy batch of the config's shapes (valid masks, ~15% MLM and MRM labels).

  Written out here rather than `batch.BatchLayout.random`: the same worker runs an older
  checkout (`--old_tree`) that has no batch module.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel

  m, d = config.model, config.data
  b, t, r1 = batch_size, d.max_text_len, d.max_regions + 1
  rng = np.random.default_rng(0)
  return {
      'input_ids': rng.integers(1, m.vocab_size, (b, t)).astype(np.int32),
      'input_mask': np.ones((b, t), np.int32),
      'segment_ids': np.zeros((b, t), np.int32),
      'image_feat': rng.normal(size=(b, r1, m.v_feature_size)).astype(np.float32),
      'image_loc': rng.uniform(size=(b, r1, 5)).astype(np.float32),
      'image_mask': np.ones((b, r1), np.int32),
      'lm_label_ids': np.where(
          rng.uniform(size=(b, t)) < 0.15, rng.integers(1, m.vocab_size, (b, t)), -1
      ).astype(np.int32),
      'image_label': np.where(rng.uniform(size=(b, r1 - 1)) < 0.15, 1, -1).astype(np.int32),
      'image_target': rng.normal(size=(b, r1 - 1, m.v_target_size)).astype(np.float32),
  }


def _jax_worker(config, batch_size: int):
  """Builds the jitted step with whichever module layout the imported tree has."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from capture_jax import train  # pylint: disable=import-outside-toplevel
  from capture_jax.training import sharding  # pylint: disable=import-outside-toplevel
  from capture_jax.training import train_step as train_step_lib  # pylint: disable=import-outside-toplevel

  try:  # the state layout is moving from train.py into training/
    from capture_jax.training import state as state_lib  # pylint: disable=import-outside-toplevel

    layout = state_lib.train_state_layout
  except ImportError:
    layout = train.train_state_layout
  config = config.copy_and_resolve_references()
  config.data.batch_size = batch_size
  mesh = sharding.make_mesh(config.mesh)
  optimizer, init_state, _, state_shardings = layout(config, mesh)
  state = jax.jit(init_state, out_shardings=state_shardings)(jax.random.PRNGKey(config.seed))
  batch_sharding = sharding.batch_sharding(mesh)
  args, host = (), _random_batch(config, batch_size)
  if 'masking' in inspect.signature(train_step_lib.make_train_step).parameters:
    # A tree whose step takes the host (storage) batch and masks it on the device.
    from capture_jax import batch as batch_lib  # pylint: disable=import-outside-toplevel
    from capture_jax.data import masking as masking_lib  # pylint: disable=import-outside-toplevel

    args = (masking_lib.MaskingSpec.from_config(config),)
    host = batch_lib.BatchLayout.from_config(config).host_random(
        batch_size, config.model.vocab_size
    )
  batch = jax.device_put(host, batch_sharding)
  jitted = jax.jit(
      train_step_lib.make_train_step(config, mesh, optimizer, *args),
      in_shardings=(state_shardings, batch_sharding),
      out_shardings=(state_shardings, None),
      donate_argnums=(0,),
  )
  start = time.perf_counter()
  compiled = jitted.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  try:
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    xla_flops = float(analysis.get('flops', 0.0))
  except Exception:  # pylint: disable=broad-except
    xla_flops = 0.0
  holder = {'state': state}

  def step():
    holder['state'], metrics = compiled(holder['state'], batch)
    return float(metrics['loss/total'])  # fetching the loss waits for the step

  a = jnp.ones((2048, 2048), jnp.float32)
  mm = jax.jit(lambda x, y: x @ y)
  info = {
      'compile_s': compile_s,
      'xla_flops': xla_flops,
      'matmul_s': median_seconds(lambda: mm(a, a)),
  }
  return step, info


def _torch_worker(config, batch_size: int):
  import torch  # pylint: disable=import-outside-toplevel
  from torch.utils import flop_counter  # pylint: disable=import-outside-toplevel

  from capture_jax.bench import torch_peer  # pylint: disable=import-outside-toplevel

  torch.set_num_threads(os.cpu_count())
  _, step = torch_peer.make_train_step(config)
  batch = torch_peer.to_torch_batch(_random_batch(config, batch_size))
  counter = flop_counter.FlopCounterMode(display=False)
  with counter:
    step(batch)
  a = torch.ones(2048, 2048)
  info = {
      'flops': float(counter.get_total_flops()),
      'matmul_s': median_seconds(lambda: (a @ a).sum()),
  }
  return (lambda: step(batch)), info


def median_seconds(fn, repeats: int = 5) -> float:
  """Median wall time of `fn()` (device synchronised) over `repeats` calls after one warm-up.

  Here, not in a shared module: a worker of `--old_tree` runs this file against an older tree.
  """
  import jax  # pylint: disable=import-outside-toplevel

  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def worker_main(kind: str, config_name: str, batch_size: int, warmup: int) -> None:
  config = _load_config(config_name)
  step, info = (_torch_worker if kind == 'torch' else _jax_worker)(config, batch_size)
  for _ in range(warmup):
    step()
  info['kind'] = kind
  print(json.dumps(info), flush=True)
  for line in sys.stdin:
    if line.strip() != 'step':
      break
    start = time.perf_counter()
    loss = step()
    print(json.dumps({'s': time.perf_counter() - start, 'loss': loss}), flush=True)


# --------------------------------------------------------------------------
# Parent.


class Worker:
  """One implementation in its own process; `step()` -> seconds of one synchronised step."""

  def __init__(self, kind: str, tree: Path, config: str, batch: int, warmup: int):
    env = dict(os.environ, PYTHONPATH=str(tree))
    env.setdefault('JAX_PLATFORMS', 'cpu')
    self.proc = subprocess.Popen(
        [sys.executable, str(THIS), '--worker', kind, config, str(batch), str(warmup)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=str(tree),
    )
    self.kind = kind

  def read(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f'{self.kind} worker exited (code {self.proc.wait()})')
    return json.loads(line)

  def step(self) -> float:
    self.proc.stdin.write('step\n')
    self.proc.stdin.flush()
    return self.read()['s']

  def close(self) -> None:
    self.proc.stdin.write('quit\n')
    self.proc.stdin.close()
    self.proc.wait()


def run_case(
    config: str, batch: int, repeats: int, warmup: int, old_tree: Path | None, torch: bool = True
) -> dict:
  trees = [('ours', REPO)] + ([('torch', REPO)] if torch else [])
  trees += [('old', old_tree)] if old_tree else []
  workers, infos = [], {}
  for kind, tree in trees:  # built one after another: compiles do not overlap
    w = Worker(kind, tree, config, batch, warmup)
    infos[kind] = w.read()
    workers.append(w)
  times = {w.kind: [] for w in workers}
  for _ in range(repeats):
    for w in workers:
      times[w.kind].append(w.step())
  for w in workers:
    w.close()
  medians = {k: statistics.median(v) for k, v in times.items()}
  return {'config': config, 'batch': batch, 'medians': medians, 'times': times, 'infos': infos}


def define_flags() -> dict[str, flags.FlagHolder]:
  """The command's flags (defined when the command runs, not on import)."""
  return {
      'cases': flags.DEFINE_string(
          'cases', 'capture_paper:8,capture_paper:32,demo:64', 'config:batch cases.'
      ),
      'repeats': flags.DEFINE_integer('repeats', 6, 'Timed steps per implementation.'),
      'warmup': flags.DEFINE_integer('warmup', 2, 'Untimed steps first.'),
      'old_tree': flags.DEFINE_string('old_tree', '', 'Another checkout to time as `old`.'),
      'old_cases': flags.DEFINE_string(
          'old_cases', 'demo', 'Configs or config:batch cases for which `old` runs too.'
      ),
      'load': flags.DEFINE_string('load', '', 'Load conditions, recorded with the rows.'),
      'without_torch': flags.DEFINE_bool('without_torch', False, 'Ours (and old) only; no row.'),
      'no_record': flags.DEFINE_bool(
          'no_record', False, 'Print only; do not append to docs/BENCHMARKS.md.'
      ),
  }


def main(args: dict[str, flags.FlagHolder]) -> None:
  import jax  # pylint: disable=import-outside-toplevel

  args = types.SimpleNamespace(**{k: h.value for k, h in args.items()})

  machine = f'{os.cpu_count()} CPU cores, {jax.devices()[0].platform}'
  rows = []
  for case in args.cases.split(','):
    name, batch = case.split(':')
    wanted = args.old_cases.split(',')
    old = Path(args.old_tree) if args.old_tree and (name in wanted or case in wanted) else None
    r = run_case(name, int(batch), args.repeats, args.warmup, old, not args.without_torch)
    med, info = r['medians'], r['infos']
    print(json.dumps({k: r[k] for k in ('config', 'batch', 'times', 'medians')}), flush=True)
    if args.without_torch:
      continue
    flops = info['torch']['flops']
    mm = 2 * 2048**3
    xla_rate, torch_rate = mm / info['ours']['matmul_s'], mm / info['torch']['matmul_s']
    ours_rate = flops / med['ours']
    old_txt = ''
    if 'old' in med:
      old_txt = f'{med["old"]:.3f} | {med["old"] / med["ours"]:.2f}x'
    else:
      old_txt = '- | -'
    row = (
        f'| {datetime.date.today().isoformat()} | {machine} | {name} | {batch} | '
        f'{med["ours"]:.3f} | {int(batch) / med["ours"]:.1f} | {med["torch"]:.3f} | '
        f'{med["torch"] / med["ours"]:.2f}x | {old_txt} | {flops / 1e9:.1f} '
        f'({info["ours"]["xla_flops"] / 1e9:.1f}) | {ours_rate / 1e9:.0f} / {xla_rate / 1e9:.0f} '
        f'({100 * ours_rate / xla_rate:.0f}%) | {flops / med["torch"] / 1e9:.0f} / '
        f'{torch_rate / 1e9:.0f} | {args.load} |'
    )
    print(row, flush=True)
    rows.append(row)
  if rows and not args.no_record:
    from capture_jax.bench import harness  # pylint: disable=import-outside-toplevel

    harness.append_rows(SECTION, HEADER, rows, NOTE)


NOTE = """Rows appended by `python -m capture_jax.bench.versus_torch`: each implementation in its own worker
process, timed one step at a time in turn (ours, torch[, old], ours, ...), float32, dropout on, MLM + MRM +
contrastive, backward, clip, AdamW; medians over the timed steps after 2 warm-up steps. `torch` is
`capture_jax.bench.torch_peer` (our PyTorch model, checked against the release fixture) with
`torch.optim.AdamW(foreach=True)`; `old` the same jitted step imported from the tree given by `--old_tree`.
GFLOP per step: the peer's forward + backward counted by `torch.utils.flop_counter` (XLA's count of our
step in brackets). GFLOP/s: that count over the median step time, against a 2048^3 float32 matmul measured
at start in the same worker (XLA for ours, torch for the peer)."""
HEADER = (
    '| date | machine | config | batch | ours s | ours samples/s | torch s | torch/ours | old s | '
    'old/ours | GFLOP/step (XLA) | ours GFLOP/s / matmul | torch GFLOP/s / matmul | load |\n'
    '|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|'
)


def console_main() -> None:
  """`python -m capture_jax.bench.versus_torch`."""
  # Imported here, not at the top: a worker imports this file against an `--old_tree`.
  from capture_jax import cli  # pylint: disable=import-outside-toplevel

  args = define_flags()
  cli.run(lambda argv: main(args))


if __name__ == '__main__':
  if sys.argv[1:2] == ['--worker']:  # a worker (`Worker`), perhaps of an older tree: no cli
    worker_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
  else:
    console_main()
