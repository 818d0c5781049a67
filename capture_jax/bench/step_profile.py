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
  * JAX operation within a pass, with the name stem of the XLA op it became (`ynn_fusion`,
    `copy`, `dot`, ...),
  * model scope (`text_stream`, `coattention`, ...),

plus the op count per step: on a small model the number of ops, not their
arithmetic, can be what costs. Ops without metadata (copies XLA inserts,
loop bookkeeping) are listed under `(xla)`.

`--optimizer` also times the optimizer update alone (the optax chain on the
config's parameters) against the memory-bandwidth bound of a clipped Adam
update: the clip's norm reads the gradients, the update reads gradients,
both moments and the parameters and writes back the moments and the
parameters, 8 float32 passes over the parameters, at the streaming bandwidth
measured on a donated `x + y` of the same size.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile
import time
import types
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from absl import flags

from capture_jax import cli
from capture_jax.bench import harness
from capture_jax.bench.versus_torch import median_seconds
from capture_jax.training import sharding
from capture_jax.training import state as state_lib

# Ops whose trace span contains the spans of the ops they run (a loop body, a branch, a call):
# summed, their time would be counted twice.
CONTROL_FLOW_OPCODES = frozenset({'while', 'conditional', 'call'})


class Instruction(NamedTuple):
  opcode: str
  op_name: str | None  # the metadata's JAX operation path; None for ops XLA added (copies, ...)


class OpTime(NamedTuple):
  ms_per_step: float
  ops_per_step: float


def _split_shape(rest: str) -> str:
  """`'(f32[2], s32[]) tuple(...)'` or `'f32[2]{0} add(...)'` -> what follows the shape."""
  if not rest.startswith('('):
    return rest.split(' ', 1)[1] if ' ' in rest else ''
  depth = 0
  for i, ch in enumerate(rest):
    depth += {'(': 1, ')': -1}.get(ch, 0)
    if depth == 0:
      return rest[i + 1 :].lstrip()
  return ''


def hlo_instructions(hlo_text: str) -> dict[str, Instruction]:
  """Compiled HLO text -> {instruction name: (opcode, metadata op_name or None)}."""
  out = {}
  for m in re.finditer(r'^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$', hlo_text, re.M):
    opcode = re.match(r'([\w\-]+)\(', _split_shape(m.group(2)))
    op_name = re.search(r'metadata=\{[^}]*op_name="([^"]*)"', m.group(2))
    out[m.group(1)] = Instruction(
        opcode.group(1) if opcode else '?', op_name.group(1) if op_name else None
    )
  return out


def classify(op_name: str | None) -> tuple[str, str, str]:
  """An op's metadata -> (pass, JAX operation, model scope).

  Ops recomputed in the backward pass (`model.remat`) carry `transpose(...)` and count as
  backward.
  """
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


def read_trace(trace_dir: Path) -> list[dict]:
  """The events of the one perfetto trace under `trace_dir` (a fresh folder per profile)."""
  paths = glob.glob(str(trace_dir / 'plugins' / 'profile' / '*' / 'perfetto_trace.json.gz'))
  if len(paths) != 1:
    raise FileNotFoundError(f'expected one perfetto trace under {trace_dir}, found {len(paths)}')
  with gzip.open(paths[0]) as f:
    data = json.load(f)
  return data['traceEvents'] if isinstance(data, dict) else data


def op_spans(events: list[dict], instructions: dict[str, Instruction]) -> list[tuple[str, float]]:
  """`(instruction, microseconds)` for every executed op of the program, control flow excluded.

  Only events named after an instruction of the compiled program count (runtime bookkeeping and
  Python frames have other names). An op that completes asynchronously (e.g. an Eigen dot on
  the intra-op pool) has a span covering its dispatch and an `end: NAME` marker when it is done:
  its time runs to that marker.
  """
  pending: dict[str, list] = collections.defaultdict(list)  # spans not yet ended, by name
  spans: list[list] = []
  for event in sorted((e for e in events if e.get('ph') == 'X'), key=lambda e: e['ts']):
    name = event['name']
    if name.startswith('end: ') and pending[name[5:]]:
      # The latest start of that name: each op runs once per step, a step at a time.
      span = pending[name[5:]].pop()
      pending[name[5:]].clear()
      span[1] = max(span[1], event['ts'] - span[2])
    elif name in instructions and instructions[name].opcode not in CONTROL_FLOW_OPCODES:
      span = [name, float(event.get('dur', 0.0)), event['ts']]
      spans.append(span)
      pending[name].append(span)
  return [(name, dur) for name, dur, _ in spans]


def summarize(
    spans: list[tuple[str, float]], instructions: dict[str, Instruction], steps: int
) -> dict[str, dict[str, OpTime]]:
  """Per-step op time and count, keyed by pass, by (pass, operation, name stem) and by scope.

  The name stem is the instruction's name without its number (`ynn_fusion`, `copy`, ...): what
  XLA made of the operation.
  """
  tables = {name: collections.defaultdict(lambda: [0.0, 0.0]) for name in ('pass', 'op', 'scope')}
  for instruction, microseconds in spans:
    phase, primitive, scope = classify(instructions[instruction].op_name)
    stem = re.sub(r'\.\d+$', '', instruction)
    for table, key in (
        ('pass', phase),
        ('op', f'{phase:8s} {primitive} [{stem}]'),
        ('scope', f'{phase:8s} {scope}'),
    ):
      tables[table][key][0] += microseconds / 1e3 / steps
      tables[table][key][1] += 1 / steps
  return {name: {k: OpTime(*v) for k, v in t.items()} for name, t in tables.items()}


def format_table(title: str, table: dict[str, OpTime], top: int) -> str:
  """The `top` rows of one `summarize` table, largest op time first, with shares."""
  total = sum(ms for ms, _ in table.values()) or 1.0
  lines = [f'{title}', f'{"ms/step":>9} {"share":>6} {"ops/step":>9}  what']
  for key, (ms, count) in sorted(table.items(), key=lambda kv: -kv[1][0])[:top]:
    lines.append(f'{ms:9.2f} {100 * ms / total:5.1f}% {count:9.0f}  {key}')
  return '\n'.join(lines)


def profile_step(config, batch_size: int, steps: int, warmup: int) -> dict:
  """Traces `steps` train steps after `warmup` untraced ones (both >= 1).

  Returns `traced_wall_s` (per step, with the profiler on and the device synchronised after each
  step), `ops_per_step` and the `summarize` tables.
  """
  if warmup < 1 or steps < 1:
    raise ValueError(f'--warmup and --steps must be >= 1, got {warmup} and {steps}')
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
    events = read_trace(Path(tmp))
  instructions = hlo_instructions(compiled.as_text())
  spans = op_spans(events, instructions)
  return {
      'traced_wall_s': wall,
      'ops_per_step': len(spans) / steps,
      'tables': summarize(spans, instructions, steps),
  }


def optimizer_against_bandwidth(config) -> dict:
  """The optax update alone, and the memory-bandwidth bound of the same parameters.

  The bound: 8 float32 passes over the parameters (the clip's global norm reads the gradients;
  the update reads gradients, both moments and the parameters and writes both moments and the
  parameters), at the streaming bandwidth of a donated `x + y` of the same size (read two arrays,
  write one in place).
  """
  config = config.copy_and_resolve_references()
  mesh = sharding.make_mesh(config.mesh)
  optimizer, init_state, _, _ = state_lib.train_state_layout(config, mesh)
  state = jax.jit(init_state)(jax.random.PRNGKey(0))
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), state.params)

  def update(params, opt_state, grads):
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  jitted = jax.jit(update, donate_argnums=(0, 1))
  holder = [state.params, state.opt_state]

  def step():
    holder[:] = jitted(holder[0], holder[1], grads)
    return holder

  update_s = median_seconds(step)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  add = jax.jit(lambda x, y: x + y, donate_argnums=0)
  arrays = [jnp.ones((num_params,), jnp.float32), jnp.full((num_params,), 2.0, jnp.float32)]

  def stream():
    arrays[0] = add(arrays[0], arrays[1])
    return arrays[0]

  add_s = median_seconds(stream)
  bandwidth = 3 * 4 * num_params / add_s
  return {
      'params_m': num_params / 1e6,
      'update_s': update_s,
      'bandwidth_gb_s': bandwidth / 1e9,
      'bound_s': 8 * 4 * num_params / bandwidth,
  }


def define_flags() -> dict[str, flags.FlagHolder]:
  """The command's flags (defined when the command runs, not on import)."""
  return {
      'config': flags.DEFINE_string('config', 'demo', 'A configs/ name.'),
      'batch': flags.DEFINE_integer('batch', 64, 'Global batch size.'),
      'steps': flags.DEFINE_integer('steps', 3, 'Traced steps.'),
      'warmup': flags.DEFINE_integer('warmup', 2, 'Untraced steps first.'),
      'top': flags.DEFINE_integer('top', 25, 'Rows per table.'),
      'optimizer': flags.DEFINE_bool('optimizer', False, 'Also time the update alone.'),
  }


def main(args: dict[str, flags.FlagHolder]) -> None:
  args = types.SimpleNamespace(**{k: h.value for k, h in args.items()})
  config = harness.load_named_config(args.config)
  print(f'machine: {harness.machine()}; {args.config} batch {args.batch}', flush=True)
  result = profile_step(config, args.batch, args.steps, args.warmup)
  tables = result['tables']
  op_ms = sum(ms for ms, _ in tables['pass'].values())
  print(
      f'traced wall {1e3 * result["traced_wall_s"]:.1f} ms/step; op time {op_ms:.1f} ms/step '
      f'summed over threads; {result["ops_per_step"]:.0f} ops/step\n'
  )
  print(format_table('by pass', tables['pass'], args.top) + '\n')
  print(format_table('by model scope', tables['scope'], args.top) + '\n')
  print(format_table('by operation [instruction name stem]', tables['op'], args.top))
  if args.optimizer:
    r = optimizer_against_bandwidth(config)
    print(
        f'\noptimizer update alone ({r["params_m"]:.1f}M parameters): {1e3 * r["update_s"]:.0f} ms; '
        f'streaming bandwidth {r["bandwidth_gb_s"]:.1f} GB/s -> 8 float32 passes need '
        f'{1e3 * r["bound_s"]:.0f} ms'
    )


def console_main() -> None:
  """`python -m capture_jax.bench.step_profile`."""
  cli.run_command(define_flags, main, required=())


if __name__ == '__main__':
  console_main()
