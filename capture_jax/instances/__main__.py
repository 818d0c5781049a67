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

from absl import app, flags
from ml_collections import config_flags

from capture_jax import cli
from capture_jax import config as config_lib

COMMANDS = ('train', 'propose')


def main() -> None:
  config_flag = config_flags.DEFINE_config_file(
      'config', None, 'Config file (e.g. configs/demo.py).'
  )
  workdir_flag = flags.DEFINE_string(
      'workdir', None, 'Run folder (the proposer: {workdir}/instances).'
  )
  split_flag = flags.DEFINE_string('split', 'dev', 'propose: the split to propose.')
  methods_flag = flags.DEFINE_string(
      'methods', 'boxes,learned,oracle', 'propose: comma-separated proposers.'
  )
  out_flag = flags.DEFINE_string(
      'out', None, 'propose: output folder (default {workdir}/instances).'
  )
  stop_flag = flags.DEFINE_integer(
      'stop_after', None, 'train: stop (with a checkpoint) after this many steps.'
  )
  flags.mark_flags_as_required(['config', 'workdir'])

  def run(argv) -> None:
    if len(argv) != 2 or argv[1] not in COMMANDS:
      raise app.UsageError(f'expected one command, one of {COMMANDS}; got {argv[1:]}')
    # Imported here: --help stays fast and JAX starts only for a command.
    from capture_jax import instances  # pylint: disable=import-outside-toplevel

    from capture_jax import storage  # pylint: disable=import-outside-toplevel
    from capture_jax.training import lock  # pylint: disable=import-outside-toplevel

    config = config_flag.value
    config_lib.check_or_exit(config)
    if argv[1] == 'train':
      try:
        result = instances.train(config, workdir_flag.value, stop_after=stop_flag.value)
      except (ValueError, FileNotFoundError, lock.LockedError, storage.StorageError) as e:
        print(f'error: {e}', file=sys.stderr, flush=True)  # refused: one line, exit status 1
        sys.exit(1)
      print(
          f'proposer at step {result.step} in {instances.checkpoint_dir(workdir_flag.value)}: '
          + json.dumps({k: round(v, 4) for k, v in result.metrics.items()}),
          flush=True,
      )
      return
    methods = [m.strip() for m in methods_flag.value.split(',') if m.strip()]
    for m in methods:
      if m not in instances.METHODS:
        raise app.UsageError(f'--methods: unknown proposer {m!r}; expected {instances.METHODS}')
    results = instances.evaluate_proposers(
        config, split_flag.value, methods, workdir_flag.value, out_flag.value
    )
    print(f'proposal quality on {split_flag.value} (region-set IoU >= 0.5):')
    if results and 'recall' in next(iter(results.values())):
      print(instances.quality_table(results))
    else:
      print(json.dumps(results, indent=1))

  cli.run(run)


if __name__ == '__main__':
  main()
