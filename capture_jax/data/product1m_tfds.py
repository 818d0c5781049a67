"""The `product1m` TFDS dataset: annotation files + region features -> ArrayRecord.

A `tfds.core.GeneratorBasedBuilder` that writes one ArrayRecord split per
annotation file present (train, gallery, dev, test; a missing file means no
split), readable with `tfds.data_source` and no TensorFlow install. TFDS
4.9.10 builds `file_format='array_record'` datasets without TensorFlow as
long as the builder returns a `DatasetInfo` directly (not
`dataset_info_from_configs`, which looks for metadata files next to the
module); the examples are serialised by TFDS's own bundled `tf.train.Example`
protos.

Layout: `{out}/product1m/{storage_dtype}[_cls_prob]/1.0.0/`, where the
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
    image_w  int32       image_h  int32
    boxes    [N, 4] float32 pixels (x1, y1, x2, y2), N <= max_regions
    features [N, F] storage dtype
    cls_prob [N, C] storage dtype (only in the `*_cls_prob` configs)

Command line (absl flags; a progress bar per split; exit status 1 with one
`error:` line when the input is refused)::

    python -m capture_jax.data.product1m_tfds --data_dir DIR --out TFDS_DIR
        [--features PATH] [--storage_dtype float16] [--max_regions 36]
        [--feature_dim 2048] [--skip_bad] [--overwrite] [--config configs/demo.py]
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Iterator, Sequence

from absl import flags
from etils import epath
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from capture_jax import cli
from capture_jax import progress as progress_lib
from capture_jax import config as config_lib
from capture_jax.data import formats

NAME = 'product1m'
DATASET_VERSION = '1.0.0'
STORAGE_DTYPES = {'float16': np.float16, 'float32': np.float32}
REPORT_NAME = 'product1m_build_report.json'

_CITATION = """@inproceedings{zhan2021product1m,
  title={Product1M: Towards Weakly Supervised Instance-Level Product Retrieval via
         Cross-Modal Pretraining},
  author={Zhan, Xunlin and Wu, Yangxin and Dong, Xiao and Wei, Yunchao and Lu, Minlong
          and Zhang, Yichi and Xu, Hang and Liang, Xiaodan},
  booktitle={ICCV}, year={2021}}"""


def config_name(storage_dtype: str, with_cls_prob: bool = False) -> str:
  """The builder config (sub-folder) of a storage dtype, e.g. `float16`."""
  if storage_dtype not in STORAGE_DTYPES:
    raise ValueError(
        f'storage_dtype must be one of {sorted(STORAGE_DTYPES)}, got {storage_dtype!r}'
    )
  return storage_dtype + ('_cls_prob' if with_cls_prob else '')


def dataset_dir(tfds_dir: str, storage_dtype: str = 'float16', with_cls_prob: bool = False) -> str:
  """Where the builder writes (and `tfds.data_source` reads) a config."""
  return os.path.join(tfds_dir, NAME, config_name(storage_dtype, with_cls_prob), DATASET_VERSION)


def _infer_feature_dim(store: formats.FeatureStore, ann_paths: Sequence[str]) -> int:
  """Width of the first image that has features, to check all others against."""
  n_samples = 0
  for path in ann_paths:
    for _, ann in formats.read_annotations(path, counter=formats.BadInputCounter(True)):
      n_samples += 1
      if ann.item_id in store:
        try:
          rf, _ = store.get(ann.item_id)
        except formats.BadInputError:
          continue
        if rf.features.ndim == 2:
          return int(rf.features.shape[1])
  if not n_samples:
    raise ValueError(f'no annotation file holds a readable sample: {", ".join(ann_paths)}')
  raise FileNotFoundError(f'no annotated image has readable region features in {store.path}')


# Run as `python -m capture_jax.data.product1m_tfds`, this file is `__main__` (and
# `__mp_main__` in the build's spawned workers) and the build imports it again as
# `capture_jax.data.product1m_tfds`: only that copy registers the name (TFDS refuses a second
# registration: "Dataset with name product1m already registered").
class Product1M(
    tfds.core.GeneratorBasedBuilder, skip_registration=__name__ in ('__main__', '__mp_main__')
):
  """Product1M samples with bottom-up-attention region features."""

  name = NAME
  VERSION = tfds.core.Version(DATASET_VERSION)
  RELEASE_NOTES = {
      DATASET_VERSION: 'Annotation files + region features, regions truncated to '
      "max_regions, features in the config's storage dtype."
  }
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(
          name=config_name(d, c),
          description=f'features stored as {d}'
          + (', with detector class distributions' if c else ''),
      )
      for c in (False, True)
      for d in STORAGE_DTYPES
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
      features: str | None = None,
      feature_dim: int | None = None,
      max_regions: int = 36,
      skip_bad: bool = False,
      **kwargs: Any,
  ):
    """Args beyond TFDS's (`data_dir`, `config`, ...), only needed to build:

    Args:
      source_dir: folder with `product1m_{split}_ossurl_v2.txt`.
      features: feature store (TSV/npz file or folder); default
        `{source_dir}/features`.
      feature_dim: expected feature width; None infers it from the first
        image and checks all others against it.
      max_regions: regions kept per image (the first ones); more are counted.
      skip_bad: skip and count bad samples instead of raising.
    """
    self._source_dir = source_dir
    self._features_path = features or (os.path.join(source_dir, 'features') if source_dir else None)
    self._feature_dim = feature_dim
    self._max_regions = int(max_regions)
    self._skip_bad = skip_bad
    self._store: formats.FeatureStore | None = None
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
    dtype = STORAGE_DTYPES[self._storage_dtype]
    # BYTES encoding: the array buffer as is (fast to decode, any shape).
    raw = tfds.features.Encoding.BYTES
    feats: dict[str, Any] = {
        'item_id': tfds.features.Text(),
        'title': tfds.features.Text(),
        'labels': tfds.features.Sequence(tfds.features.Text()),
        'image_w': np.int32,
        'image_h': np.int32,
        'boxes': tfds.features.Tensor(shape=(None, 4), dtype=np.float32, encoding=raw),
        'features': tfds.features.Tensor(shape=(None, None), dtype=dtype, encoding=raw),
    }
    if self._with_cls_prob:
      feats['cls_prob'] = tfds.features.Tensor(shape=(None, None), dtype=dtype, encoding=raw)
    return tfds.core.DatasetInfo(
        builder=self,
        description='Product1M (or a Product1M-like synthetic world): titles, labels and '
        'detector region features per item.',
        features=tfds.features.FeaturesDict(feats),
        homepage='https://github.com/zhanxlin/Product1M',
        citation=_CITATION,
        disable_shuffling=True,  # keep the annotation files' order
    )

  def _annotation_paths(self) -> dict[str, str]:
    if not self._source_dir:
      raise ValueError('building product1m needs source_dir (the annotation folder)')
    paths = {
        s: os.path.join(self._source_dir, formats.annotation_filename(s)) for s in formats.SPLITS
    }
    return {s: p for s, p in paths.items() if os.path.exists(p)}

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # nothing to download: the inputs are local files
    paths = self._annotation_paths()
    if not paths:
      raise FileNotFoundError(
          f'no product1m_{{train,gallery,dev,test}}_ossurl_v2.txt in {self._source_dir}'
      )
    self._store = formats.FeatureStore(self._features_path)
    if self._feature_dim is None:
      self._feature_dim = _infer_feature_dim(self._store, list(paths.values()))
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
    dtype = STORAGE_DTYPES[self._storage_dtype]
    for lineno, ann in formats.read_annotations(
        path, require_labels=split in formats.LABELLED_SPLITS, counter=counter
    ):
      try:
        self._example(ann, dtype)
        return None
      except formats.BadInputError as err:
        counter.handle(formats.BadInputError(err.kind, f'{path}:{lineno}: {err}'))
    if not counter.total:
      return f'{path} holds no sample (empty, or blank lines only)'
    return f'{path}: every sample is bad and was skipped ({counter.summary()})'

  def _generate_examples(self, split: str, path: str) -> Iterator[tuple[str, dict]]:
    counter = formats.BadInputCounter(self._skip_bad)
    dtype = STORAGE_DTYPES[self._storage_dtype]
    n = 0
    for lineno, ann in formats.read_annotations(
        path, require_labels=split in formats.LABELLED_SPLITS, counter=counter
    ):
      try:
        example = self._example(ann, dtype)
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

  def _example(self, ann: formats.Annotation, dtype: type) -> dict:
    assert self._store is not None
    return make_example(
        self._store,
        ann,
        dtype=dtype,
        feature_dim=self._feature_dim,
        max_regions=self._max_regions,
        with_cls_prob=self._with_cls_prob,
    )


def make_example(
    store: Any,
    ann: formats.Annotation,
    *,
    dtype: type,
    feature_dim: int | None,
    max_regions: int,
    with_cls_prob: bool,
) -> dict:
  """The example of one annotation (the builder's features, plus `_truncated`).

  `store` is a `formats.FeatureStore` (or anything with its `get`). Raises
  `formats.BadInputError` naming the feature source and the image id.
  """
  rf, source = store.get(ann.item_id)
  rf, truncated = formats.validate_regions(
      rf, feature_dim=feature_dim, max_regions=max_regions, source=source
  )
  with np.errstate(over='ignore'):  # overflow is checked (and reported) below
    stored = np.asarray(rf.features).astype(dtype)
  if not np.isfinite(stored).all():
    raise formats.BadInputError(
        'nonfinite_features',
        f'{source}: image {ann.item_id}: '
        f'features overflow {dtype.__name__} (max |x| '
        f'{np.abs(rf.features).max():.3g}); store as float32',
    )
  example = {
      'item_id': ann.item_id,
      'title': ann.title,
      'labels': list(ann.labels),
      'image_w': rf.image_w,
      'image_h': rf.image_h,
      'boxes': rf.boxes.astype(np.float32),
      'features': stored,
      '_truncated': truncated,
  }
  if with_cls_prob:
    if rf.cls_prob is None:
      raise formats.BadInputError(
          'missing_cls_prob',
          f'{source}: image {ann.item_id} has no cls_prob, expected [num_boxes, classes]',
      )
    example['cls_prob'] = np.asarray(rf.cls_prob).astype(dtype)
  return example


def build(
    data_dir: str,
    tfds_dir: str,
    *,
    features: str | None = None,
    storage_dtype: str = 'float16',
    max_regions: int = 36,
    feature_dim: int | None = None,
    skip_bad: bool = False,
    overwrite: bool = False,
    with_cls_prob: bool = False,
    progress: bool = True,
    num_workers: int = 1,
    examples_per_shard: int | None = None,
    beam_options: Sequence[str] | None = None,
) -> dict:
  """Builds the ArrayRecord splits; returns (and writes next to them) a report.

  The build streams (`product1m_stream`): bounded memory and no TensorFlow at
  any split size, `num_workers` processes or an Apache Beam pipeline
  (`beam_options`, e.g. `['--runner=DirectRunner']`), resumable after a kill.

  Returns:
    {'dataset_dir': ..., 'splits': {split: {'examples', 'skipped', 'by_kind',
    'truncated'}}, 'empty_splits': {split: why}, ...} for the splits built (or
    found empty) now; both empty if the dataset existed and `overwrite` is
    False.
  """
  from capture_jax.data import product1m_stream  # pylint: disable=import-outside-toplevel

  return product1m_stream.build(
      data_dir,
      tfds_dir,
      features=features,
      storage_dtype=storage_dtype,
      max_regions=max_regions,
      feature_dim=feature_dim,
      skip_bad=skip_bad,
      overwrite=overwrite,
      with_cls_prob=with_cls_prob,
      progress=progress,
      num_workers=num_workers,
      examples_per_shard=(
          product1m_stream.DEFAULT_EXAMPLES_PER_SHARD
          if examples_per_shard is None
          else examples_per_shard
      ),
      beam_options=beam_options,
  )


def build_from_config(config: ml_collections.ConfigDict, overwrite: bool = False) -> dict:
  """`build` with every field from `config.data` (data_dir, tfds_dir, ...)."""
  d = config.data
  return build(
      d.data_dir,
      d.tfds_dir,
      features=d.features or None,
      storage_dtype=d.storage_dtype,
      max_regions=d.max_regions,
      feature_dim=d.feature_dim or None,
      skip_bad=d.skip_bad,
      overwrite=overwrite,
      with_cls_prob=config.model.get('mrm_target', 'feature') == 'class',
      progress=progress_lib.interactive(),  # TFDS's bars on a terminal only, not in a log
  )


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> dict[str, flags.FlagHolder]:
  """The command's absl flags, defined into `flag_values` when the command runs."""
  fv = flag_values
  holders = {
      'data_dir': flags.DEFINE_string(
          'data_dir', None, 'Annotation files (+ features/).', flag_values=fv
      ),
      'out': flags.DEFINE_string('out', None, 'TFDS data_dir to write into.', flag_values=fv),
      'config': flags.DEFINE_string(
          'config',
          None,
          'Config file whose data.* fields give the defaults of the flags below.',
          flag_values=fv,
      ),
      'features': flags.DEFINE_string(
          'features', None, 'Feature store; default: DATA_DIR/features.', flag_values=fv
      ),
      'storage_dtype': flags.DEFINE_enum(
          'storage_dtype', None, sorted(STORAGE_DTYPES), 'Storage dtype.', flag_values=fv
      ),
      'max_regions': flags.DEFINE_integer(
          'max_regions', None, 'Regions kept per image.', flag_values=fv
      ),
      'feature_dim': flags.DEFINE_integer(
          'feature_dim',
          None,
          "Expected width (default: the config's, else the first image's).",
          flag_values=fv,
      ),
      'with_cls_prob': flags.DEFINE_bool(
          'with_cls_prob', False, 'Store the detector class distributions.', flag_values=fv
      ),
      'skip_bad': flags.DEFINE_bool(
          'skip_bad', False, 'Skip and count bad samples instead of stopping.', flag_values=fv
      ),
      'overwrite': flags.DEFINE_bool(
          'overwrite', False, 'Rebuild an existing dataset.', flag_values=fv
      ),
      'num_workers': flags.DEFINE_integer(
          'num_workers', 1, 'Processes writing shards on this host.', flag_values=fv
      ),
      'examples_per_shard': flags.DEFINE_integer(
          'examples_per_shard',
          None,
          'Examples per ArrayRecord shard (default 2048).',
          flag_values=fv,
      ),
      'beam_pipeline_options': flags.DEFINE_string(
          'beam_pipeline_options',
          None,
          'Build on Apache Beam with these comma-separated pipeline options, e.g. '
          '"runner=DirectRunner,direct_num_workers=2" (see README).',
          flag_values=fv,
      ),
  }
  flags.mark_flags_as_required(['data_dir', 'out'], flag_values=fv)
  return holders


def _beam_options(text: str | None) -> list[str] | None:
  """'runner=DataflowRunner,project=p' -> ['--runner=DataflowRunner', '--project=p']."""
  if text is None:
    return None
  return ['--' + o.strip().lstrip('-') for o in text.split(',') if o.strip()]


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m capture_jax.data.product1m_tfds` (and `capture-build-tfds`).

  The flags are parsed into a `FlagValues` of their own, so the command can be
  run from Python with an `argv` (tests) and never collides with the flags of
  a program that imports this module.

  Returns:
    0 on success; 1 when the input is refused (one `error:` line naming the
    file and line or image id, no traceback); 2 on bad flags.
  """
  argv = list(sys.argv if argv is None else ['product1m_tfds', *argv])
  fv = flags.FlagValues()
  args = define_flags(fv)
  code = cli.parse(fv, argv, __doc__.split('\n\n')[0])
  if code is not None:
    return code
  from capture_jax.training import lock as lock_lib  # pylint: disable=import-outside-toplevel

  config_file = args['config'].value
  if config_file:
    config = config_lib.load_config_file(config_file)
    config_lib.check_or_exit(config)
    d = config.data
  else:
    d = config_lib.data_config()
  try:
    report = build(
        args['data_dir'].value,
        args['out'].value,
        features=args['features'].value,
        storage_dtype=args['storage_dtype'].value or d.storage_dtype,
        max_regions=args['max_regions'].value or d.max_regions,
        feature_dim=args['feature_dim'].value or (d.feature_dim if config_file else None),
        skip_bad=args['skip_bad'].value or d.skip_bad,
        overwrite=args['overwrite'].value,
        with_cls_prob=args['with_cls_prob'].value,
        num_workers=args['num_workers'].value,
        examples_per_shard=args['examples_per_shard'].value,
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


if __name__ == '__main__':
  sys.exit(main())
