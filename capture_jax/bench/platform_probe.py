r"""What installed TPU and GPU plugins cost a command on a host without accelerators.

    python -m capture_jax.bench.platform_probe [--compilers=.venv/aot-compilers] [--repeats=5]

Starts JAX in fresh processes (`import jax; jax.devices()`), alternating, with nothing, libtpu
alone, or libtpu and the CUDA PJRT plugin (`requirements-aot.txt`) on the path; each as plain
JAX starts (it probes every plugin) and as every command starts (`+ cli`: `cli.run` calls
`accelerators.default_to_cpu_without_accelerators` first). Prints the median wall seconds and
the lines written to stderr of each.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import flags

from capture_jax import cli

PLAIN = 'import jax; jax.devices()'
CLI = (
    'from capture_jax import accelerators; accelerators.default_to_cpu_without_accelerators(); '
    + PLAIN
)
STARTS = (  # name, plugins on the path, program
    ('none', None, PLAIN),
    ('libtpu', 'libtpu', PLAIN),
    ('libtpu + cli', 'libtpu', CLI),
    ('libtpu + CUDA plugin', 'all', PLAIN),
    ('libtpu + CUDA plugin + cli', 'all', CLI),
)


def libtpu_only(compilers: str, into: str) -> str:
  """A folder with only libtpu of the compilers folder (links)."""
  for entry in Path(compilers).iterdir():
    if entry.name.startswith('libtpu'):
      os.symlink(entry, Path(into) / entry.name)
  return into


def start(program: str, compilers: str | None) -> tuple[float, int]:
  env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
  if compilers:
    env['PYTHONPATH'] = os.pathsep.join(p for p in (compilers, env.get('PYTHONPATH', '')) if p)
  begin = time.perf_counter()
  result = subprocess.run(
      [sys.executable, '-c', program], capture_output=True, text=True, env=env, check=True
  )
  return time.perf_counter() - begin, len(result.stderr.splitlines())


def define_flags() -> dict[str, flags.FlagHolder]:
  """The command's flags (defined when the command runs, not on import)."""
  return {
      'compilers': flags.DEFINE_string(
          'compilers',
          str(Path('.venv') / 'aot-compilers'),
          'Folder with libtpu and the CUDA PJRT plugin (requirements-aot.txt; the Makefile puts them '
          'there).',
      ),
      'repeats': flags.DEFINE_integer('repeats', 5, 'Starts of each kind (the median is printed).'),
  }


def main(args: dict[str, flags.FlagHolder]) -> None:
  compilers = args['compilers'].value
  paths = {None: None, 'libtpu': libtpu_only(compilers, tempfile.mkdtemp()), 'all': compilers}
  times: dict[str, list[float]] = {name: [] for name, _, _ in STARTS}
  lines: dict[str, int] = {}
  for _ in range(args['repeats'].value):
    for name, plugins, program in STARTS:
      seconds, count = start(program, paths[plugins])
      times[name].append(seconds)
      lines[name] = count
  print('| start | median s | stderr lines |\n|---|---:|---:|')
  for name, _, _ in STARTS:
    print(f'| {name} | {statistics.median(times[name]):.2f} | {lines[name]} |')


def console_main() -> None:
  """`python -m capture_jax.bench.platform_probe`."""
  args = define_flags()
  cli.run(lambda argv: main(args))


if __name__ == '__main__':
  console_main()
