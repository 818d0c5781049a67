r"""Product-instance proposals from the command line.

    python -m capture_jax.instances train --config=configs/demo.py --workdir=runs/demo \
        [--config.data.tfds_dir=... --config.instances.num_steps=600]
    python -m capture_jax.instances propose --config=configs/demo.py --workdir=runs/demo \
        [--split=dev] [--methods=boxes,learned,oracle] [--out=DIR]

`train` trains the learned proposer on copy-and-paste pseudo-samples of
`instances.donor_splits` (Orbax checkpoints in `{workdir}/instances/`,
resumed when present). `propose` writes `{out}/{method}/proposals_{split}.jsonl`
(default out: `{workdir}/instances`) for each method and prints the proposal
quality table when the data folder has an instance sidecar.
"""

from __future__ import annotations

import json
import sys

from absl import flags
from ml_collections import config_flags

from capture_jax import cli
from capture_jax import config as config_lib

COMMANDS = ('train', 'propose')


def define_flags() -> dict[str, flags.FlagHolder]:
  """The command's flags (defined when the command runs, not on import)."""
  return {
      'config': config_flags.DEFINE_config_file(
          'config', None, 'Config file (e.g. configs/demo.py).'
      ),
      'workdir': flags.DEFINE_string(
          'workdir', None, 'Run folder (the proposer: {workdir}/instances).'
      ),
      'split': flags.DEFINE_string('split', 'dev', 'propose: the split to propose.'),
      'methods': flags.DEFINE_string(
          'methods', 'boxes,learned,oracle', 'propose: comma-separated proposers.'
      ),
      'out': flags.DEFINE_string(
          'out', None, 'propose: output folder (default {workdir}/instances).'
      ),
      'stop_after': flags.DEFINE_integer(
          'stop_after', None, 'train: stop (with a checkpoint) after this many steps.'
      ),
  }


def main(args: dict[str, flags.FlagHolder], words: list[str]) -> int:
  """Runs the command `words` (`['train']` or `['propose']`); returns the exit status: 0, or 1
  with one `error:` line when the command, a proposer or the input is refused."""
  if len(words) != 1 or words[0] not in COMMANDS:
    print(f'error: expected one command, one of {COMMANDS}; got {words}', file=sys.stderr)
    return 1
  # Imported here: --help stays fast and JAX starts only for a command.
  from capture_jax import instances  # pylint: disable=import-outside-toplevel

  from capture_jax import storage  # pylint: disable=import-outside-toplevel
  from capture_jax.training import lock  # pylint: disable=import-outside-toplevel

  config, workdir = args['config'].value, args['workdir'].value
  config_lib.check_or_exit(config)
  if words[0] == 'train':
    try:
      result = instances.train(config, workdir, stop_after=args['stop_after'].value)
    except (ValueError, FileNotFoundError, lock.LockedError, storage.StorageError) as e:
      print(f'error: {e}', file=sys.stderr, flush=True)  # refused: one line, exit status 1
      return 1
    print(
        f'proposer at step {result.step} in {instances.checkpoint_dir(workdir)}: '
        + json.dumps({k: round(v, 4) for k, v in result.metrics.items()}),
        flush=True,
    )
    return 0
  methods = [m.strip() for m in args['methods'].value.split(',') if m.strip()]
  unknown = [m for m in methods if m not in instances.METHODS]
  if unknown:
    print(
        f'error: --methods: unknown proposer {unknown[0]!r}; expected {instances.METHODS}',
        file=sys.stderr,
    )
    return 1
  split = args['split'].value
  results = instances.evaluate_proposers(config, split, methods, workdir, args['out'].value)
  print(f'proposal quality on {split} (region-set IoU >= 0.5):')
  if results and 'recall' in next(iter(results.values())):
    print(instances.quality_table(results))
  else:
    print(json.dumps(results, indent=1))
  return 0


def console_main() -> None:
  """`python -m capture_jax.instances train|propose`."""
  args = define_flags()
  flags.mark_flags_as_required(['config', 'workdir'])
  cli.run(lambda argv: main(args, argv[1:]), accepts_arguments=True)


if __name__ == '__main__':
  console_main()
