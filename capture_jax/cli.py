"""Parsing a command's absl flags into its own `FlagValues`, for commands that return an exit
code (so tests can run them from Python with an argv, and their flags never collide with
those of a program that imports them)."""

from __future__ import annotations

import sys

from absl import flags


def parse(fv: flags.FlagValues, argv: list[str], usage: str) -> int | None:
  """Parses `argv` (program name first) into `fv`.

  Returns None to go on, or the exit code to return at once: 0 after printing
  the help (`--help`), 2 after naming a bad flag or an unexpected argument.
  """
  if any(a in ('-h', '--help', '--helpshort', '-?') for a in argv[1:]):
    print(f'{usage}\n\n{fv.get_help()}')
    return 0
  try:
    rest = fv(argv)
  except flags.Error as err:
    print(f'error: {err} (see --help)', file=sys.stderr)
    return 2
  if len(rest) > 1:
    print(f'error: unexpected arguments {rest[1:]} (see --help)', file=sys.stderr)
    return 2
  return None
