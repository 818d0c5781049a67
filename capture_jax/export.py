r"""Embedding export: a checkpoint's retrieval embeddings of one split, in sharded `.npz` files.

    python -m capture_jax.export --config=configs/demo.py --workdir=runs/demo --split=gallery \
        [--checkpoint=STEP] [--out=DIR] [--instances] [--random_init] [--overwrite] \
        [--config.eval.embedding=fused|text|visual|encoder]

The program (`capture_jax.retrieval.exporting.export`): checks of the request
(split, kind, the split's data and proposer, the checkpoint and its config)
before anything compiles; mesh over whatever devices are present; the
inference step compiled with explicit shardings; the checkpoint's model
parameters restored onto the mesh; then the loop over the shards still
missing (`capture_jax.retrieval.writer`). Rows are written in the order of
their plan whatever the number of devices or processes. Re-running the same
command skips shards already written, so an interrupted export resumes.

What identifies an export (`capture_jax.retrieval.identity`) includes a
fingerprint of what it embedded and of the checkpoint save. When the output
folder holds an export of something else: in the default folder (ours,
under `{workdir}/embeddings`) it is replaced, saying what changed; in a
folder given with `--out` it is refused unless `--overwrite`. A second
export into a folder is refused while the first writes (a lock), and
non-finite embeddings are refused, naming the split and how many rows.

Output (default `{workdir}/embeddings/step_{STEP}/{kind}/{split}`, with a
`-instances-{proposer}` suffix for instance rows and `random_init` for
`--random_init`): see `capture_jax.retrieval.export_format`.
"""

from __future__ import annotations

from typing import Any

from absl import flags
from ml_collections import config_flags

from capture_jax import cli
from capture_jax.data import formats
from capture_jax.retrieval import exporting


def define_flags() -> dict[str, Any]:
  """The command's flags (defined when the command runs, not on import, so that the package's
  modules can be imported together)."""
  return {
      'config': config_flags.DEFINE_config_file(
          'config', None, 'A configs/*.py file.', lock_config=True
      ),
      'workdir': flags.DEFINE_string(
          'workdir', None, 'Run directory with checkpoints/ (and embeddings/).'
      ),
      'split': flags.DEFINE_enum('split', 'gallery', list(formats.SPLITS), 'Split to embed.'),
      'checkpoint': flags.DEFINE_integer(
          'checkpoint', None, 'Checkpoint step (default: the latest).'
      ),
      'out': flags.DEFINE_string(
          'out', None, 'Output folder (default {workdir}/embeddings/step_{STEP}/{kind}/{split}).'
      ),
      'instances': flags.DEFINE_bool(
          'instances',
          False,
          'One row per product instance (instance queries), from the proposer of '
          '--config.eval.instances (default: learned if trained in the workdir, else boxes).',
      ),
      'random_init': flags.DEFINE_bool(
          'random_init', False, 'Embed with the untrained model (config seed).'
      ),
      'overwrite': flags.DEFINE_bool(
          'overwrite',
          False,
          'Recompute every shard, replacing whatever export the output folder holds.',
      ),
  }


def main(args: dict[str, Any]) -> None:
  cli.checkpoint_command(
      args,
      exporting.export,
      out=args['out'].value,
      rows='instances' if args['instances'].value else 'samples',
      **cli.flag_values(args, ('random_init', 'overwrite')),
  )


def console_main() -> None:
  cli.run_command(define_flags, main)


if __name__ == '__main__':
  console_main()
