r"""Where a train step's time goes: a `jax.profiler` trace, each executed op mapped to its source.

    python -m capture_jax.bench.step_profile --config=demo --batch=64 [--steps=3] [--top=25]
    python -m capture_jax.bench.step_profile --config=capture_paper --batch=8 --optimizer

Builds the jitted step as `capture_jax.bench` does, warms it up, traces
`--steps` steps and reads the trace back. Every executed XLA op (on CPU a
"thunk": a fusion, a library matmul, a copy, a loop) is named after an
instruction of the compiled HLO, whose metadata holds the JAX operation and
the Flax module path it came from. The tables sum op time per step (on CPU
ops run on several threads, so the sum exceeds the wall time) by

  * pass: `forward` (under `jvp`), `backward` (under `transpose`), and the
    rest (the optimizer update, the norm, bookkeeping), and
  * JAX operation within a pass, with the fusion kind XLA made of it,
  * model scope (`text_stream`, `coattention`, ...),

plus the op count per step: on a small model the number of ops, not their
arithmetic, can be what costs. Ops without metadata (copies XLA inserts,
loop bookkeeping) are listed under `(xla)`.

`--optimizer` also times the optimizer update alone (the optax chain on the
config's parameters) against the memory-bandwidth bound of an Adam update:
reading gradients, both moments and the parameters and writing back the
moments and the parameters, 7 float32 passes over the parameters, at the
streaming bandwidth measured on a `x + y` of the same size.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

from capture_jax.bench import harness
from capture_jax.training import sharding
from capture_jax.training import state as state_lib

# Trace events that are not ops of the program: runtime bookkeeping and Python frames.
RUNTIME_EVENTS = (
    'ThunkExecutor',
    'Pjit',
    'Common',
    'Parse',
    'Slinky',
    'end:',
    'Threadpool',
    'Wait',
    'Handle',
    'Allocate',
    'PythonRefManager',
    '$',
)


def hlo_op_names(hlo_text: str) -> dict[str, str]:
  """Compiled HLO text -> {instruction name: metadata op_name}."""
  pattern = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{[^}]*op_name="([^"]*)"', re.M)
  return {m.group(1): m.group(2) for m in pattern.finditer(hlo_text)}


def classify(op_name: str | None) -> tuple[str, str, str]:
  """An op's metadata -> (pass, JAX operation, model scope)."""
  if op_name is None:
    return 'other', '(xla)', '(xla)'
  if 'transpose(' in op_name:
    phase = 'backward'
  elif 'jvp(' in op_name:
    phase = 'forward'
  else:
    phase = 'other'
  primitive = re.sub(r'\[.*', '', op_name.rsplit('/', 1)[-1]) or '(unnamed)'
  scope = re.search(r'CaptureModel\)*/(\w+)', op_name)
  return phase, primitive, scope.group(1) if scope else '(outside the model)'


def op_events(trace_dir: Path) -> list[dict]:
  """The complete ('X') op events of the newest perfetto trace under `trace_dir`."""
  paths = sorted(glob.glob(str(trace_dir / 'plugins' / 'profile' / '*' / 'perfetto_trace.json.gz')))
  if not paths:
    raise FileNotFoundError(f'no perfetto trace under {trace_dir}')
  with gzip.open(paths[-1]) as f:
    data = json.load(f)
  events = data['traceEvents'] if isinstance(data, dict) else data
  return [e for e in events if e.get('ph') == 'X' and not e['name'].startswith(RUNTIME_EVENTS)]


def summarize(events: list[dict], op_names: dict[str, str], steps: int) -> dict[str, dict]:
  """Per-step op time (ms) and op count, keyed by pass, by (pass, operation, fusion) and by scope."""
  tables = {name: collections.defaultdict(lambda: [0.0, 0.0]) for name in ('pass', 'op', 'scope')}
  for event in events:
    instruction = event['name']
    phase, primitive, scope = classify(op_names.get(instruction))
    fusion = re.sub(r'\.\d+$', '', instruction)
    for table, key in (
        ('pass', phase),
        ('op', f'{phase:8s} {primitive} [{fusion}]'),
        ('scope', f'{phase:8s} {scope}'),
    ):
      tables[table][key][0] += event.get('dur', 0.0) / 1e3 / steps
      tables[table][key][1] += 1 / steps
  return {name: dict(t) for name, t in tables.items()}


def format_table(title: str, table: dict, top: int) -> str:
  total = sum(ms for ms, _ in table.values()) or 1.0
  lines = [f'{title}', f'{"ms/step":>9} {"share":>6} {"ops/step":>9}  what']
  for key, (ms, count) in sorted(table.items(), key=lambda kv: -kv[1][0])[:top]:
    lines.append(f'{ms:9.2f} {100 * ms / total:5.1f}% {count:9.0f}  {key}')
  return '\n'.join(lines)


def profile_step(config, batch_size: int, steps: int, warmup: int) -> dict:
  """Traces `steps` train steps; returns wall time, op tables and op counts."""
  compiled, state, batch, _, _ = harness.build_train_step(config, batch_size)
  for _ in range(warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp, create_perfetto_trace=True)
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = compiled(state, batch)
      jax.block_until_ready((state, metrics))
    wall = (time.perf_counter() - start) / steps
    jax.profiler.stop_trace()
    events = op_events(Path(tmp))
  tables = summarize(events, hlo_op_names(compiled.as_text()), steps)
  return {'wall_s': wall, 'ops_per_step': len(events) / steps, 'tables': tables}


def _median_time(fn, *args, repeats: int = 5):
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - start)
  return statistics.median(times), out


def optimizer_against_bandwidth(config) -> dict:
  """The optax update alone, and the 7-pass memory-bandwidth bound for the same parameters."""
  config = config.copy_and_resolve_references()
  mesh = sharding.make_mesh(config.mesh)
  optimizer, init_state, _, _ = state_lib.train_state_layout(config, mesh)
  state = jax.jit(init_state)(jax.random.PRNGKey(0))
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), state.params)

  def update(params, opt_state):
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  jitted = jax.jit(update, donate_argnums=(0, 1))
  holder = [state.params, state.opt_state]

  def step():
    holder[:] = jitted(*holder)
    return holder

  update_s, _ = _median_time(step)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  a = jnp.ones((num_params,), jnp.float32)
  add_s, _ = _median_time(jax.jit(lambda x, y: x + y), a, a)
  bandwidth = 3 * 4 * num_params / add_s  # read two, write one
  return {
      'params_m': num_params / 1e6,
      'update_s': update_s,
      'bandwidth_gb_s': bandwidth / 1e9,
      'bound_s': 7 * 4 * num_params / bandwidth,
  }


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', default='demo')
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--top', type=int, default=25)
  parser.add_argument('--optimizer', action='store_true', help='also time the update alone')
  args = parser.parse_args(argv)
  config = harness.load_named_config(args.config)
  print(f'machine: {harness.machine()}; {args.config} batch {args.batch}', flush=True)
  result = profile_step(config, args.batch, args.steps, args.warmup)
  tables = result['tables']
  op_ms = sum(ms for ms, _ in tables['pass'].values())
  print(
      f'wall {1e3 * result["wall_s"]:.1f} ms/step; op time {op_ms:.1f} ms/step summed over '
      f'threads; {result["ops_per_step"]:.0f} ops/step\n'
  )
  print(format_table('by pass', tables['pass'], args.top) + '\n')
  print(format_table('by model scope', tables['scope'], args.top) + '\n')
  print(format_table('by operation [XLA op kind]', tables['op'], args.top))
  if args.optimizer:
    r = optimizer_against_bandwidth(config)
    print(
        f'\noptimizer update alone ({r["params_m"]:.1f}M parameters): {1e3 * r["update_s"]:.0f} ms; '
        f'streaming bandwidth {r["bandwidth_gb_s"]:.1f} GB/s -> 7 float32 passes need '
        f'{1e3 * r["bound_s"]:.0f} ms'
    )


if __name__ == '__main__':
  main()
