r"""What installed TPU and GPU plugins cost a command on a host without accelerators.

    python -m capture_jax.bench.platform_probe [--compilers=.venv/aot-compilers] [--repeats=5]

Starts JAX in fresh processes (`import jax; jax.devices()`), alternating:
- `none`: the environment without the plugins;
- `plugins`: with libtpu and the CUDA PJRT plugin on the path (`requirements-aot.txt`), as
  plain JAX sees them (it probes both);
- `plugins + cli`: the same, started as every command starts (`cli.run` calls
  `accelerators.default_to_cpu_without_accelerators` first).
Prints the median wall seconds and the lines written to stderr of each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROGRAMS = {
    'none': 'import jax; jax.devices()',
    'plugins': 'import jax; jax.devices()',
    'plugins + cli': (
        'from capture_jax import accelerators; accelerators.default_to_cpu_without_accelerators(); '
        'import jax; jax.devices()'
    ),
}


def start(program: str, compilers: str | None) -> tuple[float, int]:
  env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
  if compilers:
    env['PYTHONPATH'] = os.pathsep.join(p for p in (compilers, env.get('PYTHONPATH', '')) if p)
  begin = time.perf_counter()
  result = subprocess.run(
      [sys.executable, '-c', program], capture_output=True, text=True, env=env, check=True
  )
  return time.perf_counter() - begin, len(result.stderr.splitlines())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--compilers', default=str(Path('.venv') / 'aot-compilers'))
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()
  times: dict[str, list[float]] = {k: [] for k in PROGRAMS}
  lines: dict[str, int] = {}
  for _ in range(args.repeats):
    for name, program in PROGRAMS.items():
      seconds, count = start(program, None if name == 'none' else args.compilers)
      times[name].append(seconds)
      lines[name] = count
  print('| start | median s | stderr lines |\n|---|---:|---:|')
  for name in PROGRAMS:
    print(f'| {name} | {statistics.median(times[name]):.2f} | {lines[name]} |')


if __name__ == '__main__':
  main()
