r"""The training loop on 2 processes x 4 CPU devices: dispatch lead and step time, two trees side by side.

    python -m capture_jax.bench.step_loop --old_tree=/work/main [--steps=40 --slow_ms=150]

For each tree (`--old_tree`, then this one, alternating `--repeats` times)
and each input (as is; slowed by `--slow_ms` per batch on process 1 only)
it runs the real `train.run` of that tree (`configs/demo.py` of this tree,
on the demo world under `--work_dir`) as two processes of one job (Gloo,
`--devices` simulated CPU devices each) and reports, from process 0:

  - the dispatch lead: each time the host dispatches a train step, how many
    dispatched steps (that one included) have not finished on its devices
    (`jax.Array.is_ready` of a metric of each step; nothing waits). 1 means
    the host waits for every step before dispatching the next;
  - the step time: the median of the loop's own `step_time_s` over its
    `log_every`-step windows, the first (warm-up) window left out.

The tree is chosen by putting it first on PYTHONPATH (the worker prints the
`capture_jax` it imported); the slowing and the measurement are patches
applied inside the worker (`_TrainBatchLoader.__call__`, `Compiled.__call__`),
so both trees run unmodified.
"""

from __future__ import annotations

import collections
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

from absl import flags

THIS_TREE = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------
# Worker: one process of the job.


def _worker(out_json: str, workdir: str, steps: int, log_every: int, slow_ms: float) -> None:
  from capture_jax.training import distributed  # pylint: disable=import-outside-toplevel

  distributed.initialize()
  import capture_jax  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from jax import stages  # pylint: disable=import-outside-toplevel

  from capture_jax import train  # pylint: disable=import-outside-toplevel
  from capture_jax.data import train_input  # pylint: disable=import-outside-toplevel

  config = json.loads(os.environ['CAPTURE_BENCH_CONFIG'])
  import ml_collections  # pylint: disable=import-outside-toplevel

  config = ml_collections.ConfigDict(config)
  config.train.update(num_steps=steps, log_every=log_every, progress_bar=False)
  config.checkpoint.every_steps = 10 * steps  # only the final save

  if slow_ms and jax.process_index() == 1:
    load = train_input._TrainBatchLoader.__call__  # pylint: disable=protected-access

    def slow_load(self, batch_index):
      time.sleep(slow_ms / 1000)
      return load(self, batch_index)

    train_input._TrainBatchLoader.__call__ = slow_load  # pylint: disable=protected-access

  leads: list[int] = []
  recent: collections.deque = collections.deque(maxlen=256)
  call = stages.Compiled.__call__

  def measured_call(self, *args, **kwargs):
    out = call(self, *args, **kwargs)
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict):
      if 'skipped_updates' in out[1]:  # the train step
        recent.append(out[1]['skipped_updates'])
        leads.append(sum(not x.is_ready() for x in recent))
    return out

  stages.Compiled.__call__ = measured_call
  start = time.perf_counter()
  train.run(config, workdir)
  wall = time.perf_counter() - start
  result = {
      'tree': str(Path(capture_jax.__file__).resolve().parents[1]),
      'process': jax.process_index(),
      'leads': leads,
      'wall_s': wall,
  }
  if jax.process_index() == 0:
    rows = [json.loads(line) for line in Path(workdir, 'metrics.jsonl').read_text().splitlines()]
    result['step_times'] = [r['step_time_s'] for r in rows]
  Path(out_json).write_text(json.dumps(result))


# --------------------------------------------------------------------------
# Driver.


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def run_job(tree: Path, config_json: str, out_dir: Path, args, slow_ms: float) -> dict:
  """Both processes of one job on `tree`; returns process 0's result (+ process 1's leads)."""
  port = _free_port()
  procs = []
  for i in range(2):
    env = {
        **os.environ,
        'PYTHONPATH': str(tree),
        'JAX_PLATFORMS': 'cpu',
        'XLA_FLAGS': f'--xla_force_host_platform_device_count={args.devices}',
        'CAPTURE_COORDINATOR': f'localhost:{port}',
        'CAPTURE_NUM_PROCESSES': '2',
        'CAPTURE_PROCESS_ID': str(i),
        'CAPTURE_BENCH_CONFIG': config_json,
    }
    log = open(out_dir / f'log.{i}', 'w', encoding='utf-8')  # pylint: disable=consider-using-with
    cmd = [sys.executable, __file__, '--worker', str(out_dir / f'result.{i}.json')]
    cmd += [str(out_dir / 'run'), str(args.steps), str(args.log_every), str(slow_ms)]
    procs.append(subprocess.Popen(cmd, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT))
  for i, p in enumerate(procs):
    if p.wait(timeout=900):
      raise RuntimeError(f'process {i} failed: see {out_dir}/log.{i}')
  r0, r1 = (json.loads((out_dir / f'result.{i}.json').read_text()) for i in range(2))
  if Path(r0['tree']) != tree.resolve():
    raise RuntimeError(f'imported capture_jax from {r0["tree"]}, expected {tree}')
  r0['leads_1'] = r1['leads']
  return r0


def summarise(r: dict) -> dict:
  warm = r['step_times'][1:] or r['step_times']
  leads = r['leads'][5:] or r['leads']  # past the first steps
  return {
      'step_time_s': statistics.median(warm),
      'lead_median': statistics.median(leads),
      'lead_max': max(leads),
      'lead_median_p1': statistics.median(r['leads_1'][5:] or r['leads_1']),
  }


def define_flags() -> dict[str, flags.FlagHolder]:
  """The command's flags (defined when the command runs, not on import)."""
  return {
      'old_tree': flags.DEFINE_string('old_tree', None, 'A checkout of the loop to compare with.'),
      'work_dir': flags.DEFINE_string(
          'work_dir', '/tmp/capture_jax_step_loop_benchmark', 'Demo world and runs.'
      ),
      'steps': flags.DEFINE_integer('steps', 40, 'Train steps per run.'),
      'log_every': flags.DEFINE_integer('log_every', 10, 'Steps per logged window.'),
      'slow_ms': flags.DEFINE_float('slow_ms', 150.0, 'Extra ms per batch, process 1.'),
      'devices': flags.DEFINE_integer('devices', 4, 'Simulated CPU devices per process.'),
      'repeats': flags.DEFINE_integer('repeats', 1, 'Runs of each tree and input.'),
      'inputs': flags.DEFINE_enum(
          'inputs', 'both', ['both', 'as_is', 'slowed'], 'Which inputs to run.'
      ),
  }


def main(args: dict[str, flags.FlagHolder]) -> None:
  args = types.SimpleNamespace(**{k: h.value for k, h in args.items()})
  sys.path.insert(0, str(THIS_TREE))
  from capture_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from capture_jax.bench import input as input_bench  # pylint: disable=import-outside-toplevel

  config = config_lib.load_config_file(THIS_TREE / 'configs' / 'demo.py')
  input_bench.prepare_data(config, args.work_dir)
  with open(config.data.vocab_file, encoding='utf-8') as f:  # the trained vocab's size
    config.model.vocab_size = sum(1 for _ in f)
  base = config.to_dict()
  base['data'].pop('prefetch_to_device', None)  # each tree's default: the old one has none

  trees = {'old': Path(args.old_tree).resolve(), 'new': THIS_TREE}
  results = collections.defaultdict(list)
  out = Path(args.work_dir) / 'runs'
  for rep in range(args.repeats):
    for slow in {'both': (0.0, args.slow_ms), 'as_is': (0.0,), 'slowed': (args.slow_ms,)}[
        args.inputs
    ]:
      for name, tree in trees.items():
        d = out / f'{name}_slow{int(slow)}_{rep}'
        subprocess.run(['rm', '-rf', str(d)], check=True)
        d.mkdir(parents=True)
        cfg = json.loads(json.dumps(base))
        if name == 'new':
          cfg['data']['prefetch_to_device'] = config_lib.base_config().data.prefetch_to_device
        s = summarise(run_job(tree, json.dumps(cfg), d, args, slow))
        results[(name, slow)].append(s)
        print(f'rep {rep} {name:3s} slow_ms={slow:g}: {s}', flush=True)
  print('\n| input | loop | step time (s) | dispatch lead, process 0 (median / max) | process 1 |')
  print('| --- | --- | --- | --- | --- |')
  for (name, slow), rows in results.items():
    med = lambda k, rows=rows: statistics.median(r[k] for r in rows)
    print(
        f'| {"slowed " + format(slow, "g") + " ms on process 1" if slow else "as is"} | {name} | '
        f'{med("step_time_s"):.3f} | {med("lead_median"):g} / {max(r["lead_max"] for r in rows)} '
        f'| {med("lead_median_p1"):g} |'
    )


def console_main() -> None:
  """`python -m capture_jax.bench.step_loop`."""
  # Imported here, not at the top: a worker runs this file against the tree on its PYTHONPATH.
  from capture_jax import cli  # pylint: disable=import-outside-toplevel

  args = define_flags()
  flags.mark_flags_as_required(['old_tree'])
  cli.run(lambda argv: main(args))


if __name__ == '__main__':
  if len(sys.argv) > 1 and sys.argv[1] == '--worker':  # a worker (`run_job`) of one tree: no cli
    sys.path.pop(0)  # this script's folder: the tree on PYTHONPATH provides capture_jax
    _worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]))
  else:
    console_main()
