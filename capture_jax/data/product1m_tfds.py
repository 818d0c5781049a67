"""The `product1m` TFDS dataset: annotation files + region features -> ArrayRecord.

A `tfds.core.GeneratorBasedBuilder` that writes one ArrayRecord split per
annotation file present (train, gallery, dev, test; a missing file means no
split), readable with `tfds.data_source` and no TensorFlow install. TFDS
4.9.10 builds `file_format='array_record'` datasets without TensorFlow as
long as the builder returns a `DatasetInfo` directly (not
`dataset_info_from_configs`, which looks for metadata files next to the
module); the examples are serialised by TFDS's own bundled `tf.train.Example`
protos.

The schema (features, names, identity) is `product1m_schema`'s; the build
itself streams (`product1m_stream`). Each title is tokenised once, at build
time, with the vocab the command is given (`--vocab`): the examples hold its
WordPiece ids and the dataset its fingerprint (TFDS's `metadata.json`).

Layout: `{out}/product1m/{storage_dtype}[_cls_prob]/2.0.0/`, where the
builder config names the storage dtype of the region features (float16
halves the disk of 1M+ samples; the pipeline computes in float32). Examples
keep the annotation file's order (`disable_shuffling`), so evaluation reads
splits in file order.

A split whose annotation file holds no usable sample (an empty file, only
blank lines, or only bad samples skipped with `skip_bad`) is not built: the
build logs why, lists it under `empty_splits` in its report, and builds the
other splits (TFDS itself would fail the whole build on an empty split).

One example::

    item_id  Text        title  Text        labels  Sequence(Text) (empty for train)
    token_ids [L] int32  the title's WordPiece ids (no [CLS]/[SEP], untruncated)
    image_w  int32       image_h  int32
    boxes    [N, 4] float32 pixels (x1, y1, x2, y2), N <= max_regions
    features [N, F] storage dtype
    cls_prob [N, C] storage dtype (only in the `*_cls_prob` configs)

Command line (absl flags; a progress bar per split; exit status 1 with one
`error:` line when the input is refused)::

    python -m capture_jax.data.product1m_tfds --data_dir DIR --out TFDS_DIR --vocab VOCAB
        [--features PATH] [--storage_dtype float16] [--max_regions 36]
        [--feature_dim 2048] [--skip_bad] [--overwrite] [--config configs/demo.py]
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Iterator

from absl import flags
from etils import epath
import ml_collections
import tensorflow_datasets as tfds

from capture_jax import cli
from capture_jax import progress as progress_lib
from capture_jax import config as config_lib
from capture_jax.data import formats
from capture_jax.data import product1m_schema as schema
from capture_jax.data import product1m_stream
from capture_jax.data import tokenizer as tokenizer_lib

# The schema's names, for the callers that know this module as the dataset's (the schema owns them).
NAME = schema.NAME
STORAGE_DTYPES = schema.STORAGE_DTYPES
REPORT_NAME = schema.REPORT_NAME
config_name = schema.config_name
dataset_dir = schema.dataset_dir
# The build (streaming: `product1m_stream`); this module adds the builder and the command line.
build = product1m_stream.build


# `python -m capture_jax.data.product1m_tfds` runs this file a second time, as `__main__` (and
# as `__mp_main__` in the build's spawned workers), beside the package's copy (imported at the
# end of this file, and by any reader). Only the package's copy registers the builder (TFDS
# refuses a second `product1m`), and the command runs from it.
class Product1M(
    tfds.core.GeneratorBasedBuilder,
    skip_registration=__name__ != 'capture_jax.data.product1m_tfds',
):
  """Product1M samples with bottom-up-attention region features."""

  name = schema.NAME
  VERSION = tfds.core.Version(schema.DATASET_VERSION)
  RELEASE_NOTES = schema.RELEASE_NOTES
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(
          name=schema.config_name(d, c), description=schema.config_description(d, c)
      )
      for c in (False, True)
      for d in schema.STORAGE_DTYPES
  ]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS resolves a packaged builder's file through `importlib_resources`,
    # an optional backport that is not installed here (ModuleNotFoundError in
    # download_and_prepare); the answer is this module's file either way.
    return epath.Path(__file__)

  def __init__(
      self,
      *,
      source_dir: str | None = None,
      vocab_file: str | None = None,
      features: str | None = None,
      feature_dim: int | None = None,
      max_regions: int = 36,
      skip_bad: bool = False,
      **kwargs: Any,
  ):
    """Args beyond TFDS's (`data_dir`, `config`, ...), only needed to build:

    Args:
      source_dir: folder with `product1m_{split}_ossurl_v2.txt`.
      vocab_file: the WordPiece vocab of the titles' `token_ids`.
      features: feature store (TSV/npz file or folder); default
        `{source_dir}/features`.
      feature_dim: expected feature width; None infers it from the first
        image and checks all others against it.
      max_regions: regions kept per image (the first ones); more are counted.
      skip_bad: skip and count bad samples instead of raising.
    """
    self._source_dir = source_dir
    self._vocab_file = vocab_file
    self._features_path = features or (os.path.join(source_dir, 'features') if source_dir else None)
    self._feature_dim = feature_dim
    self._max_regions = int(max_regions)
    self._skip_bad = skip_bad
    self._store: formats.FeatureStore | None = None
    self._titles: tokenizer_lib.TitleTokenizer | None = None
    self.reports: dict[str, dict] = {}
    # split -> why it was not built (no usable sample).
    self.empty_splits: dict[str, str] = {}
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)

  @property
  def _storage_dtype(self) -> str:
    return self.builder_config.name.split('_')[0]

  @property
  def _with_cls_prob(self) -> bool:
    return self.builder_config.name.endswith('_cls_prob')

  def _info(self) -> tfds.core.DatasetInfo:
    metadata = schema.identity(self._vocab_file) if self._vocab_file else None
    return schema.dataset_info(self, self._storage_dtype, self._with_cls_prob, metadata)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # nothing to download: the inputs are local files
    if not self._vocab_file:
      raise ValueError('building product1m needs vocab_file (the titles are tokenised once here)')
    paths = schema.annotation_paths(self._source_dir)
    self._store = formats.FeatureStore(self._features_path)
    self._titles = tokenizer_lib.TitleTokenizer(self._vocab_file, schema.DO_LOWER_CASE)
    if self._feature_dim is None:
      self._feature_dim = schema.infer_feature_dim(self._store, list(paths.values()))
    generators = {}
    for split, path in paths.items():
      why = self._why_empty(split, path)
      if why is None:
        generators[split] = self._generate_examples(split, path)
      else:
        self.empty_splits[split] = why
        logging.warning('product1m: split %s is not built: %s', split, why)
    if not generators:
      raise ValueError(
          'no split has a usable sample, nothing to build: ' + '; '.join(self.empty_splits.values())
      )
    return generators

  def _why_empty(self, split: str, path: str) -> str | None:
    """None if `split` has a usable sample, else why not.

    Stops at the first sample that makes an example, so it costs one feature
    read for a normal split. Without `skip_bad` a bad sample raises here, as
    the build would, before anything is written.
    """
    counter = formats.BadInputCounter(self._skip_bad)
    for lineno, ann in formats.read_annotations(
        path, require_labels=split in formats.LABELLED_SPLITS, counter=counter
    ):
      try:
        self._example(ann)
        return None
      except formats.BadInputError as err:
        counter.handle(formats.BadInputError(err.kind, f'{path}:{lineno}: {err}'))
    return schema.why_empty(path, counter)

  def _generate_examples(self, split: str, path: str) -> Iterator[tuple[str, dict]]:
    counter = formats.BadInputCounter(self._skip_bad)
    n = 0
    for lineno, ann in formats.read_annotations(
        path, require_labels=split in formats.LABELLED_SPLITS, counter=counter
    ):
      try:
        example = self._example(ann)
      except formats.BadInputError as err:
        counter.handle(formats.BadInputError(err.kind, f'{path}:{lineno}: {err}'))
        continue
      if example.pop('_truncated'):
        counter.truncated += 1
      n += 1
      yield ann.item_id, example
    self.reports[split] = {'examples': n, **counter.as_dict()}
    if counter.total or counter.truncated:
      logging.warning('product1m %s: %s', split, counter.summary())

  def _example(self, ann: formats.Annotation) -> dict:
    assert self._store is not None and self._titles is not None
    return schema.make_example(
        self._store,
        ann,
        self._titles,
        dtype=schema.STORAGE_DTYPES[self._storage_dtype],
        feature_dim=self._feature_dim,
        max_regions=self._max_regions,
        with_cls_prob=self._with_cls_prob,
    )


def build_from_config(config: ml_collections.ConfigDict, overwrite: bool = False) -> dict:
  """`build` with every field from `config.data` (data_dir, tfds_dir, vocab_file, ...)."""
  d = config.data
  return build(
      d.data_dir,
      d.tfds_dir,
      vocab_file=d.vocab_file,
      features=d.features or None,
      storage_dtype=d.storage_dtype,
      max_regions=d.max_regions,
      feature_dim=d.feature_dim or None,
      skip_bad=d.skip_bad,
      overwrite=overwrite,
      with_cls_prob=config.model.get('mrm_target', 'feature') == 'class',
      progress=progress_lib.interactive(),  # TFDS's bars on a terminal only, not in a log
  )


def define_flags() -> dict[str, flags.FlagHolder]:
  """The command's flags (defined when the command runs, not on import)."""
  return {
      'data_dir': flags.DEFINE_string(
          'data_dir', None, 'Annotation files (+ features/), a folder or gs://BUCKET/...'
      ),
      'out': flags.DEFINE_string('out', None, 'TFDS data_dir to write into (a folder or gs://).'),
      'vocab': flags.DEFINE_string(
          'vocab',
          None,
          "WordPiece vocab.txt the titles are tokenised with, once (default: the config's "
          'data.vocab_file). Training refuses a dataset of another vocab.',
      ),
      'config': flags.DEFINE_string(
          'config',
          None,
          'Config file whose data.* fields give the defaults of the flags below.',
      ),
      'features': flags.DEFINE_string(
          'features', None, 'Feature store; default: DATA_DIR/features.'
      ),
      'storage_dtype': flags.DEFINE_enum(
          'storage_dtype', None, sorted(STORAGE_DTYPES), 'Storage dtype.'
      ),
      'max_regions': flags.DEFINE_integer('max_regions', None, 'Regions kept per image.'),
      'feature_dim': flags.DEFINE_integer(
          'feature_dim',
          None,
          "Expected width (default: the config's, else the first image's).",
      ),
      'with_cls_prob': flags.DEFINE_bool(
          'with_cls_prob', False, 'Store the detector class distributions.'
      ),
      'skip_bad': flags.DEFINE_bool(
          'skip_bad', False, 'Skip and count bad samples instead of stopping.'
      ),
      'overwrite': flags.DEFINE_bool('overwrite', False, 'Rebuild an existing dataset.'),
      'num_workers': flags.DEFINE_integer(
          'num_workers', 1, 'Processes writing shards on this host.'
      ),
      'examples_per_shard': flags.DEFINE_integer(
          'examples_per_shard',
          None,
          'Examples per ArrayRecord shard (default 2048).',
      ),
      'beam_pipeline_options': flags.DEFINE_string(
          'beam_pipeline_options',
          None,
          'Build on Apache Beam with these comma-separated pipeline options, e.g. '
          '"runner=DirectRunner,direct_num_workers=2" (see README).',
      ),
  }


def _beam_options(text: str | None) -> list[str] | None:
  """'runner=DataflowRunner,project=p' -> ['--runner=DataflowRunner', '--project=p']."""
  if text is None:
    return None
  return ['--' + o.strip().lstrip('-') for o in text.split(',') if o.strip()]


def main(args: dict[str, flags.FlagHolder]) -> int:
  """Builds the dataset; returns the exit status: 0, or 1 when the input is refused (one
  `error:` line naming the file and line or image id, no traceback)."""
  from capture_jax.training import lock as lock_lib  # pylint: disable=import-outside-toplevel

  config_file = args['config'].value
  if config_file:
    config = config_lib.load_config_file(config_file)
    config_lib.check_or_exit(config)
    d = config.data
  else:
    d = config_lib.data_config()
  vocab = args['vocab'].value or (d.vocab_file if config_file else None)
  if not vocab:
    print(
        'error: pass --vocab VOCAB (or --config with data.vocab_file): the titles are tokenised '
        'once, at build time; train a vocab with `python -m capture_jax.data.tokenizer train '
        '--data_dir DATA --out vocab.txt`',
        file=sys.stderr,
    )
    return 1
  try:
    report = build(
        args['data_dir'].value,
        args['out'].value,
        vocab_file=vocab,
        features=args['features'].value,
        storage_dtype=args['storage_dtype'].value or d.storage_dtype,
        max_regions=args['max_regions'].value or d.max_regions,
        feature_dim=args['feature_dim'].value or (d.feature_dim if config_file else None),
        skip_bad=args['skip_bad'].value or d.skip_bad,
        overwrite=args['overwrite'].value,
        with_cls_prob=args['with_cls_prob'].value,
        num_workers=args['num_workers'].value,
        examples_per_shard=args['examples_per_shard'].value
        or product1m_stream.DEFAULT_EXAMPLES_PER_SHARD,
        beam_options=_beam_options(args['beam_pipeline_options'].value),
    )
  except (OSError, ValueError, lock_lib.LockedError) as err:  # BadInputError is a ValueError
    print(f'error: {err}', file=sys.stderr)
    return 1
  if not report['splits'] and not report['empty_splits']:
    print(f'{report["dataset_dir"]} exists; pass --overwrite to rebuild', file=sys.stderr)
  for split, why in report['empty_splits'].items():
    print(f'{split}: not built, {why}', file=sys.stderr)
  for split, r in report['splits'].items():
    print(
        f'{split}: {r["examples"]} examples, {r["skipped"]} bad skipped '
        f'{r["by_kind"] or ""}, {r["truncated"]} truncated to max_regions',
        file=sys.stderr,
    )
  print(report['dataset_dir'])
  return 0


def console_main() -> None:
  """`python -m capture_jax.data.product1m_tfds` and `capture-build-tfds`."""
  args = define_flags()
  flags.mark_flags_as_required(['data_dir', 'out'])
  cli.run(lambda argv: main(args))


if __name__ == '__main__':
  from capture_jax.data import product1m_tfds  # the package's copy (see Product1M)

  product1m_tfds.console_main()
