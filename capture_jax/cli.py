"""How commands start: `run` (absl `app.run` with library logs kept quiet) and `parse` (flags
into a `FlagValues` of their own, for commands that return an exit code, so tests can run them
from Python with an argv and their flags never collide with those of a program that imports
them)."""

from __future__ import annotations

import sys
from typing import Any, Callable

from absl import app, flags, logging

from capture_jax import accelerators


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


def quiet_libraries() -> None:
  """Under `absl.app.run`, libraries' INFO logs (Orbax logs every save and delete) reach stderr
  and bury the command's own lines in a log; keep WARNING and above unless `--verbosity` was
  given."""
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)


# absl's help flags (`app.define_help_flags`): each prints the usage and exits 1 while parsing.
ABSL_HELP_FLAGS = ('-?', '--help', '--helpshort', '--helpfull', '--helpxml')


def parse_flags_or_exit(argv: list[str]) -> list[str]:
  """absl's flag parsing for `app.run`, with a refused flag as one `error:` line and exit status 1
  (no traceback): a bad value, and a `--config.X=V` override of a field that does not exist
  (ml_collections raises AttributeError or KeyError there, with its suggestion on another line;
  `config.unknown_override` names the field and the nearest one). The help that was asked for
  (`--help`, `--helpshort`, `--helpfull`) exits 0, as `parse` does."""
  from capture_jax import config as config_lib  # pylint: disable=import-outside-toplevel

  try:
    return flags.FLAGS(argv)
  except SystemExit as exit_:
    if exit_.code == 1 and any(a in ABSL_HELP_FLAGS for a in argv[1:]):
      sys.exit(0)  # absl printed the help; asking for it is not a failure
    raise
  except flags.Error as err:
    message = str(err).replace('\n', ' ')
  except (AttributeError, KeyError) as err:
    unknown = [
        m
        for m in map(
            config_lib.unknown_override, (a for a in argv[1:] if a.startswith('--config.'))
        )
        if m
    ]
    message = '; '.join(unknown) or ' '.join(str(err).replace('\\n', ' ').split())
  print(f'error: {message} (see --help)', file=sys.stderr, flush=True)
  sys.exit(1)


def run(main: Callable[[list[str]], Any]) -> None:
  """`absl.app.run(main)` with library INFO logs kept quiet (`quiet_libraries`), flag errors
  as one `error:` line (`parse_flags_or_exit`) and, on a host without accelerators, JAX on its
  CPU backend without probing TPU or GPU plugins: the entry of every command."""

  def quiet_main(argv: list[str]) -> Any:
    quiet_libraries()
    accelerators.default_to_cpu_without_accelerators()
    return main(argv)

  app.run(quiet_main, flags_parser=parse_flags_or_exit)
