r"""Synthetic Product1M world: writes a Product1M-like folder in the real on-disk formats.

    python -m capture_jax.data.synthetic --out DIR --preset demo [--seed 0]
        [--annotations product1m_dev_ossurl_v2.txt [--heldout_fraction 0.5]]
        [--feature_format tsv|npz] [--feature_dim 256] [--splits train,gallery,dev,test]
        [--overwrite]

With --annotations, the real queries' labels become the world's products and their lines (real
ids, titles and label sets) become the dev queries. --heldout_fraction F moves a seeded
fraction F of those queries, whole (every line of an id), to the test split instead, so that
dev and test are disjoint halves of the real queries: choices made on dev are judged on real
titles no one chose on. No real title reaches the gallery or the training pairs.

It refuses to replace files in DIR that it did not write (a real annotation file, say) unless
--overwrite is given. Bad input (a refused file, a missing annotation file, --heldout_fraction
without --annotations) is one `error:` line and exit status 1.
"""

from __future__ import annotations

import sys

from absl import flags

from capture_jax import cli
from capture_jax.data import formats
from capture_jax.data.synthetic import world
from capture_jax.data.synthetic import writer


def define_flags() -> dict[str, flags.FlagHolder]:
  """The command's flags (defined when the command runs, not on import)."""
  return {
      'out': flags.DEFINE_string('out', None, 'Output folder.'),
      'preset': flags.DEFINE_enum(
          'preset', 'demo', sorted(world.PRESETS), 'World sizes (`world.PRESETS`).'
      ),
      'seed': flags.DEFINE_integer(
          'seed', 0, 'The whole folder is a deterministic function of the flags.'
      ),
      'annotations': flags.DEFINE_string(
          'annotations', None, 'A real Product1M query file whose titles and labels to use.'
      ),
      'heldout_fraction': flags.DEFINE_float(
          'heldout_fraction',
          0.0,
          'With --annotations: this share of the real query ids becomes the test split '
          '(disjoint from dev, by --seed); 0 renders test from the labels.',
      ),
      'feature_format': flags.DEFINE_enum(
          'feature_format',
          'tsv',
          ['tsv', 'npz'],
          'Region features as one base64 TSV per split or one npz per image.',
      ),
      'feature_dim': flags.DEFINE_integer(
          'feature_dim', None, "Feature width (default: the preset's)."
      ),
      'splits': flags.DEFINE_list('splits', list(formats.SPLITS), 'The splits to write.'),
      'overwrite': flags.DEFINE_bool(
          'overwrite',
          False,
          'Replace files in --out that the generator did not write (e.g. real annotations).',
      ),
  }


def main(args: dict[str, flags.FlagHolder]) -> int:
  """Writes the folder and prints one summary line. Returns the exit status: 0, or 1 with one
  `error:` line (a refused or missing file, a bad value)."""
  out = args['out'].value
  try:
    summary = writer.generate(
        out,
        args['preset'].value,
        seed=args['seed'].value,
        annotations=args['annotations'].value,
        heldout_fraction=args['heldout_fraction'].value,
        feature_format=args['feature_format'].value,
        feature_dim=args['feature_dim'].value,
        splits=[s for s in args['splits'].value if s],
        overwrite=args['overwrite'].value,
    )
  except (OSError, ValueError) as e:  # no traceback for bad input
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(
      f'wrote {out}: {summary["num_products"]} products of {summary["num_brands"]} '
      f'brands; ' + ', '.join(f'{k} {v}' for k, v in summary['counts'].items()),
      file=sys.stderr,
  )
  return 0


def console_main() -> None:
  """`python -m capture_jax.data.synthetic` and the `capture-synthetic` console script."""
  args = define_flags()
  flags.mark_flags_as_required(['out'])
  cli.run(lambda argv: main(args))


if __name__ == '__main__':
  console_main()
