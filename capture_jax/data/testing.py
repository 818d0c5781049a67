"""A complete tiny dataset on disk, for tests of anything that reads data.

    config = testing.tiny_dataset(tmp_path)           # ~1 s
    batch = next(train_input.make_train_iterator(config, process_index=0, process_count=1))

Runs the real chain (synthetic world -> annotation files + features -> WordPiece
vocab -> TFDS ArrayRecords) and returns a config whose `data` fields point at
the result; the caller keeps model sizes consistent (`feature_dim` is the
preset's, 32 for `tiny`).
"""

from __future__ import annotations

import os

import ml_collections

from capture_jax import config as config_lib
from capture_jax.data import product1m_tfds
from capture_jax.data import synthetic
from capture_jax.data import tokenizer as tokenizer_lib


def tiny_dataset(
    root: str | os.PathLike,
    *,
    preset: str = 'tiny',
    seed: int = 0,
    feature_format: str = 'tsv',
    storage_dtype: str = 'float16',
    config: ml_collections.ConfigDict | None = None,
    vocab_size: int = 500,
) -> ml_collections.ConfigDict:
  """Generates, tokenises and builds a dataset under `root`; returns its config.

  Args:
    root: folder for `data/`, `vocab.txt` and `tfds/`.
    preset: synthetic preset ('tiny' for unit tests).
    config: a config to fill in (default `base_config()`); its `data`
      fields are overwritten, and model.v_feature_size / v_target_size are
      set to the world's feature width.
  """
  root = os.fspath(root)
  p = synthetic.PRESETS[preset]
  c = config if config is not None else config_lib.base_config()
  d = c.data
  d.data_dir = os.path.join(root, 'data')
  d.tfds_dir = os.path.join(root, 'tfds')
  d.vocab_file = os.path.join(root, 'vocab.txt')
  d.feature_dim = p.feature_dim
  d.max_regions = p.max_regions
  d.storage_dtype = storage_dtype
  d.synthetic_preset = preset
  d.synthetic_seed = seed
  d.feature_format = feature_format
  d.batch_size = 8
  d.eval_batch_size = 8
  if 'model' in c:
    c.model.v_feature_size = p.feature_dim
    c.model.v_target_size = p.feature_dim
  synthetic.generate(d.data_dir, preset, seed=seed, feature_format=feature_format, progress=False)
  tokenizer_lib.train_vocab(tokenizer_lib.iter_titles(d.data_dir), vocab_size, d.vocab_file)
  product1m_tfds.build(
      d.data_dir,
      d.tfds_dir,
      storage_dtype=storage_dtype,
      max_regions=p.max_regions,
      feature_dim=p.feature_dim,
      progress=False,
  )
  return c
