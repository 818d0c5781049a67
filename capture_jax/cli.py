"""How every command starts: one style, absl flags through `run`.

A command module reads, in this order:

    def define_flags() -> dict[str, flags.FlagHolder]:
      '''The command's flags (defined when the command runs, not on import).'''
      return {'workdir': flags.DEFINE_string('workdir', None, 'Run directory.'), ...}

    def main(args: dict[str, flags.FlagHolder]) -> int | None:
      ...  # the command: reads args['workdir'].value, calls the library
      # returns the exit status (None: 0)

    def console_main() -> None:  # `python -m ...` and the pyproject console script
      args = define_flags()
      flags.mark_flags_as_required(['workdir'])
      run(lambda argv: main(args))

    if __name__ == '__main__':
      console_main()

Flags are defined on absl's global `FLAGS` when the command runs, never on import, so every
module of the package can be imported together (several commands have a `--config` or a
`--split`). `run` gives every command the same command line:

- `--help`, `--helpshort`, `-?` and `-h` print the module's docstring and its own flags
  (also under a console script, where absl's `--helpshort` would list none) and exit 0;
  `--helpfull` adds absl's and the libraries' flags, also exit 0;
- `--flag=value` and `--flag value`; booleans as `--name`, `--noname`, `--name=false`;
- a refused flag (unknown, a bad value, a missing required flag, an unknown `--config.X`
  field) or a stray positional argument is one `error:` line on stderr and exit status 1,
  before the command runs and without a traceback;
- refused input (a bad file, a locked folder) is the command's own `error:` line naming the
  file and line or id, and exit status 1; other statuses are the command's, in its docstring;
- library INFO logs kept quiet unless `--verbosity` is given, and JAX on its CPU backend
  without probing TPU or GPU plugins on a host without accelerators.

Tests run a command as its user does, `python -m ...` in a subprocess
(`tests/test_cli.py` runs `--helpshort` of every one), and test what it does in-process
through the library functions `main` calls (`metrics.run`, `product1m_tfds.build`, ...).
Private helper processes of a benchmark that run against another checkout (`--old_tree` of
`bench.versus_torch` and `bench.step_loop`) are not commands: they take positional arguments
after `--worker` and import nothing of this module, which an older tree may not have.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Sequence

from absl import app, flags, logging

from capture_jax import accelerators

HELP_ARGS = ('-?', '-h', '--help', '--helpshort', '-help', '-helpshort')


def bad_input_exits(run: Callable[[], Any]) -> Any:
  """`run()`, with bad input (a missing or refused file, a bad value, a held lock, an unreachable
  bucket) printed as one `error:` line and exit status 1, without a traceback."""
  from capture_jax import storage  # pylint: disable=import-outside-toplevel
  from capture_jax.training import lock as lock_lib  # pylint: disable=import-outside-toplevel

  try:
    return run()
  except (FileNotFoundError, ValueError, KeyError, lock_lib.LockedError, storage.StorageError) as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(1)


def checkpoint_command(args: dict, command: Callable[..., Any], **options: Any) -> Any:
  """The body of a command that reads a run's checkpoint (`export`, `evaluate`): checks
  `--config`, joins the job's processes, then `command(config, workdir, split,
  step=--checkpoint, **options)`, with bad input as one `error:` line (`bad_input_exits`)."""
  # pylint: disable=import-outside-toplevel
  from capture_jax import config as config_lib
  from capture_jax.training import distributed

  config_lib.check_or_exit(args['config'].value)
  distributed.initialize()
  return bad_input_exits(
      lambda: command(
          args['config'].value,
          args['workdir'].value,
          args['split'].value,
          step=args['checkpoint'].value,
          **options,
      )
  )


def flag_values(args: dict, names: Sequence[str]) -> dict[str, Any]:
  """`{name: --name}` for the flags `names` of a command's `define_flags()`."""
  return {name: args[name].value for name in names}


def run_command(
    define_flags: Callable[[], dict],
    main: Callable[[dict], Any],
    required: Sequence[str] = ('config', 'workdir'),
) -> None:
  """The entry of a command whose flags `define_flags()` defines (the `required` ones must be
  given): `run(lambda argv: main(flags))`."""
  args = define_flags()
  if required:
    flags.mark_flags_as_required(list(required))
  run(lambda argv: main(args), module=main.__module__)


def quiet_libraries() -> None:
  """Under `absl.app.run`, libraries' INFO logs (Orbax logs every save and delete) reach stderr
  and bury the command's own lines in a log; keep WARNING and above unless `--verbosity` was
  given."""
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)


def short_help(module: str) -> str:
  """The docstring of the command module `module` and the help of the flags it defined.

  Under `python -m`, the command module is `__main__` and absl files its flags under the
  script's path (`sys.argv[0]`); under a console script, under the module's name.
  """
  doc = (sys.modules[module].__doc__ or '').strip('\n')
  owner = sys.argv[0] if module == '__main__' else module
  own = flags.FLAGS.module_help(owner).strip('\n')
  return f'{doc}\n\nflags:\n\n{own or "(none of its own)"}\n\nTry --helpfull for all flags.'


def parse_flags_or_exit(
    argv: list[str], module: str = '__main__', accepts_arguments: bool = False
) -> list[str]:
  """absl's flag parsing for `app.run`: the help of the command `module` (exit 0), and a
  refused flag as one `error:` line and exit status 1 (no traceback): a bad value, a stray
  positional argument (unless `accepts_arguments`), and a `--config.X=V` override of a field
  that does not exist (ml_collections raises AttributeError or KeyError there, with its
  suggestion on another line; `config.unknown_override` names the field and the nearest one).
  Returns the arguments left after the flags, the program name first."""
  from capture_jax import config as config_lib  # pylint: disable=import-outside-toplevel

  if any(a in HELP_ARGS for a in argv[1:]):
    try:
      print(short_help(module), flush=True)
    except BrokenPipeError:  # `--help | head`: the reader has what it wanted
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(0)
  try:
    rest = flags.FLAGS(argv)
  except SystemExit:  # absl's --helpfull and --helpxml print, then exit 1: help is not a failure
    sys.exit(0)
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
  else:
    if accepts_arguments or len(rest) <= 1:
      return rest
    message = f'unexpected arguments {rest[1:]}'
  print(f'error: {message} (see --help)', file=sys.stderr, flush=True)
  sys.exit(1)


def run(
    main: Callable[[list[str]], Any], accepts_arguments: bool = False, module: str | None = None
) -> None:
  """`absl.app.run(main)`, the entry of every command (see the module docstring): the help of
  the module that defines `main`, flag errors as one `error:` line (`parse_flags_or_exit`),
  library INFO logs kept quiet (`quiet_libraries`) and, on a host without accelerators, JAX on
  its CPU backend without probing TPU or GPU plugins. `main` gets the arguments left after the
  flags (the program name first; with `accepts_arguments`, positional words too) and returns
  the exit status (None: 0). `module`: the command module whose help to print, when `main` was
  defined elsewhere (`run_command`)."""
  module = module or main.__module__

  def quiet_main(argv: list[str]) -> Any:
    quiet_libraries()
    accelerators.default_to_cpu_without_accelerators()
    return main(argv)

  app.run(
      quiet_main,
      flags_parser=lambda argv: parse_flags_or_exit(argv, module, accepts_arguments),
  )
