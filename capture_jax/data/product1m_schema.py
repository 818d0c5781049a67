"""The product1m dataset's schema and identity, shared by its TFDS builder and its streaming build.

`product1m_tfds` (the `tfds` builder and the build command) and
`product1m_stream` (the build itself) both import this module and not each
other. It owns:

* the names: `NAME`, `DATASET_VERSION`, the builder configs (`config_name`),
  the folder of a config (`dataset_dir`), the build report's file name;
* the features of one example (`features_dict`) and the `DatasetInfo`
  (`dataset_info`);
* one example of an annotation (`make_example`), its title's WordPiece ids
  included (`token_ids`, tokenised once here instead of in every batch);
* the dataset's identity in TFDS's `metadata.json` (`identity`): the layout
  version, the vocab's fingerprint (`tokenizer.vocab_fingerprint`) and its
  lower-casing. `check_identity` refuses a dataset of another vocab or of the
  older layout, naming the command that rebuilds it.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from capture_jax import storage
from capture_jax.data import formats
from capture_jax.data import tokenizer as tokenizer_lib

NAME = 'product1m'
# 2.0.0: each example carries its title's WordPiece ids (`token_ids`) and the dataset names its
# vocab (metadata.json). 1.0.0 (no token ids) is refused by `check_identity`'s callers.
DATASET_VERSION = '2.0.0'
OLDER_VERSIONS = ('1.0.0',)
LAYOUT = 2  # metadata.json's `layout`: what a reader of this module can read
STORAGE_DTYPES = {'float16': np.float16, 'float32': np.float32}
REPORT_NAME = 'product1m_build_report.json'
BUILD_COMMAND = 'python -m capture_jax.data.product1m_tfds'
DO_LOWER_CASE = True  # the tokenizer's (bert-base-chinese's) behaviour; recorded in the identity

RELEASE_NOTES = {
    '1.0.0': 'Annotation files + region features, regions truncated to max_regions, features in '
    "the config's storage dtype.",
    '2.0.0': "Each example holds its title's WordPiece ids (token_ids); metadata.json names the "
    'vocab (its fingerprint) they were made with.',
}
DESCRIPTION = (
    'Product1M (or a Product1M-like synthetic world): titles, their WordPiece ids, labels and '
    'detector region features per item.'
)
CITATION = """@inproceedings{zhan2021product1m,
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


def config_description(storage_dtype: str, with_cls_prob: bool) -> str:
  return f'features stored as {storage_dtype}' + (
      ', with detector class distributions' if with_cls_prob else ''
  )


def dataset_dir(
    tfds_dir: str,
    storage_dtype: str = 'float16',
    with_cls_prob: bool = False,
    version: str = DATASET_VERSION,
) -> str:
  """Where the builder writes (and `tfds.data_source` reads) a config."""
  return os.path.join(tfds_dir, NAME, config_name(storage_dtype, with_cls_prob), version)


def features_dict(storage_dtype: str, with_cls_prob: bool) -> tfds.features.FeaturesDict:
  """The features of one example (see `make_example`)."""
  dtype = STORAGE_DTYPES[storage_dtype]
  # BYTES encoding: the array buffer as is (fast to decode, any shape).
  raw = tfds.features.Encoding.BYTES
  feats: dict[str, Any] = {
      'item_id': tfds.features.Text(),
      'title': tfds.features.Text(),
      'token_ids': tfds.features.Tensor(shape=(None,), dtype=np.int32, encoding=raw),
      'labels': tfds.features.Sequence(tfds.features.Text()),
      'image_w': np.int32,
      'image_h': np.int32,
      'boxes': tfds.features.Tensor(shape=(None, 4), dtype=np.float32, encoding=raw),
      'features': tfds.features.Tensor(shape=(None, None), dtype=dtype, encoding=raw),
  }
  if with_cls_prob:
    feats['cls_prob'] = tfds.features.Tensor(shape=(None, None), dtype=dtype, encoding=raw)
  return tfds.features.FeaturesDict(feats)


def dataset_info(
    builder: Any, storage_dtype: str, with_cls_prob: bool, metadata: Mapping | None = None
) -> tfds.core.DatasetInfo:
  """The `DatasetInfo` of a config; `builder` is the TFDS builder or a `DatasetIdentity`."""
  return tfds.core.DatasetInfo(
      builder=builder,
      description=DESCRIPTION,
      features=features_dict(storage_dtype, with_cls_prob),
      homepage='https://github.com/zhanxlin/Product1M',
      citation=CITATION,
      disable_shuffling=True,  # keep the annotation files' order
      metadata=None if metadata is None else tfds.core.MetadataDict(metadata),
  )


def dataset_identity(
    tfds_dir: str, storage_dtype: str, with_cls_prob: bool
) -> tfds.core.DatasetIdentity:
  """What the builder's `DatasetInfo` says about itself, without a builder (the stream's)."""
  return tfds.core.DatasetIdentity(
      name=NAME,
      version=tfds.core.Version(DATASET_VERSION),
      data_dir=dataset_dir(tfds_dir, storage_dtype, with_cls_prob),
      module_name='capture_jax.data.product1m_tfds',
      config_name=config_name(storage_dtype, with_cls_prob),
      config_description=config_description(storage_dtype, with_cls_prob),
      release_notes=RELEASE_NOTES,
  )


# ----------------------------------------------------------------------------
# The vocab the token ids were made with.


def identity(vocab_file: str) -> dict[str, Any]:
  """The dataset's metadata.json: layout, the vocab's fingerprint and lower-casing."""
  return {
      'layout': LAYOUT,
      'vocab_fingerprint': tokenizer_lib.vocab_fingerprint(vocab_file),
      'do_lower_case': DO_LOWER_CASE,
      'vocab_file': str(storage.absolute(vocab_file)),  # where it was, for the messages only
  }


def rebuild_command(
    tfds_dir: str, storage_dtype: str, with_cls_prob: bool, vocab_file: str | None
) -> str:
  """The build command that (re)writes a config for `vocab_file`."""
  parts = [BUILD_COMMAND, '--data_dir DATA', f'--out {tfds_dir}']
  parts.append(f'--vocab {vocab_file}' if vocab_file else '--vocab VOCAB')
  if storage_dtype != 'float16':
    parts.append(f'--storage_dtype {storage_dtype}')
  if with_cls_prob:
    parts.append('--with_cls_prob')
  return ' '.join(parts + ['--overwrite'])


def check_identity(
    folder: str,
    metadata: Mapping | None,
    vocab_file: str | None,
    rebuild: str,
) -> None:
  """Raises ValueError (one line, naming both vocabs and `rebuild`) unless the dataset in
  `folder`, whose metadata.json holds `metadata`, was built with this layout and, when
  `vocab_file` is given, with that vocab."""
  metadata = dict(metadata or {})
  if metadata.get('layout') != LAYOUT or 'vocab_fingerprint' not in metadata:
    raise ValueError(
        f'{folder}: a product1m dataset of an older layout (no title token ids, no vocab '
        f'fingerprint; layout {metadata.get("layout")}, this code reads {LAYOUT}); rebuild it: '
        f'{rebuild}'
    )
  if not vocab_file:
    return
  want = tokenizer_lib.vocab_fingerprint(vocab_file)
  have = metadata['vocab_fingerprint']
  if have != want or metadata.get('do_lower_case') != DO_LOWER_CASE:
    raise ValueError(
        f'{folder}: its title token ids were made with the vocab {metadata.get("vocab_file")} '
        f'(fingerprint {have[:12]}, do_lower_case {metadata.get("do_lower_case")}), but '
        f'data.vocab_file is {vocab_file} (fingerprint {want[:12]}, do_lower_case '
        f'{DO_LOWER_CASE}); rebuild it: {rebuild}'
    )


# ----------------------------------------------------------------------------
# Examples.


def annotation_paths(data_dir: str) -> dict[str, str]:
  """{split: annotation file} of the splits `data_dir` has, in `formats.SPLITS` order."""
  if not data_dir:
    raise ValueError('building product1m needs data_dir (the annotation folder)')
  paths = {
      s: os.path.join(data_dir, formats.annotation_filename(s))
      for s in formats.SPLITS
      if storage.exists(os.path.join(data_dir, formats.annotation_filename(s)))
  }
  if not paths:
    raise FileNotFoundError(f'no product1m_{{train,gallery,dev,test}}_ossurl_v2.txt in {data_dir}')
  return paths


def why_empty(path: str, counter: formats.BadInputCounter) -> str:
  """Why the split of annotation file `path` has no example, from its bad-input counts."""
  if not counter.total:
    return f'{path} holds no sample (empty, or blank lines only)'
  return f'{path}: every sample is bad and was skipped ({counter.summary()})'


def infer_feature_dim(store: formats.FeatureStore, ann_paths: Sequence[str]) -> int:
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


def make_example(
    store: Any,
    ann: formats.Annotation,
    titles: tokenizer_lib.TitleTokenizer,
    *,
    dtype: type,
    feature_dim: int | None,
    max_regions: int,
    with_cls_prob: bool,
) -> dict:
  """The example of one annotation (`features_dict`'s fields, plus `_truncated`).

  `store` is a `formats.FeatureStore` (or anything with its `get`); `titles`
  gives the title's WordPiece ids (int32 [L], no [CLS]/[SEP], untruncated).
  Raises `formats.BadInputError` naming the feature source and the image id.
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
      'token_ids': titles.ids(ann.title),
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
