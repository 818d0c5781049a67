"""Helpers the tests share: tiny configs, random batches, datasets and reference implementations.

A complete tiny dataset on disk, for tests of anything that reads data:

    config = testing.tiny_dataset(tmp_path)           # ~1 s
    batch = next(train_input.make_train_iterator(config, process_index=0, process_count=1))

Runs the real chain (synthetic world -> annotation files + features -> WordPiece
vocab -> TFDS ArrayRecords) and returns a config whose `data` fields point at
the result; the caller keeps model sizes consistent (`feature_dim` is the
preset's, 32 for `tiny`).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from capture_jax import batch as batch_lib
from capture_jax import config as config_lib
from capture_jax import convert
from capture_jax.data import collate as collate_lib
from capture_jax.data import masking as masking_lib
from capture_jax.data import product1m_tfds
from capture_jax.data import synthetic
from capture_jax.data import tokenizer as tokenizer_lib

# Titles the build tests' vocab is trained on: CJK, latin, digits (their own titles may be others:
# a word the vocab lacks becomes [UNK], which a build test does not mind).
VOCAB_TITLES = (
    '兰蔻小黑瓶精华肌底液 Lancome Advanced Genifique 50ml',
    'SK-II 神仙水 230ml 护肤精华露',
    '雅诗兰黛 Estee Lauder 面霜 Night Repair 100ml',
    'title 1 面霜 2 3 4 5 6 7 8 9 0 product item',
)


@functools.cache
def build_vocab() -> str:
  """A small vocab.txt for the tests that build datasets (trained once per test process)."""
  path = os.path.join(tempfile.mkdtemp(prefix='capture_test_vocab_'), 'vocab.txt')
  tokenizer_lib.train_vocab(VOCAB_TITLES, 120, path, min_frequency=1)
  return path


def build_dataset(data_dir: str, tfds_dir: str, **kwargs: Any) -> dict:
  """`product1m_tfds.build` with the tests' vocab (`build_vocab`) unless `vocab_file` is given."""
  kwargs.setdefault('vocab_file', build_vocab())
  return product1m_tfds.build(data_dir, tfds_dir, **kwargs)


def build_dataset_of(config, tfds_dir: str, data_dir: str | None = None) -> dict:
  """The dataset `config.data` describes (its vocab, storage dtype and sizes) built into
  `tfds_dir` from `data_dir` (default `config.data.data_dir`)."""
  d = config.data
  return product1m_tfds.build(
      data_dir or d.data_dir,
      tfds_dir,
      vocab_file=d.vocab_file,
      storage_dtype=d.storage_dtype,
      max_regions=d.max_regions,
      feature_dim=d.feature_dim,
      progress=False,
  )


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
  tokenizer_lib.train_vocab(tokenizer_lib.vocab_titles(d), vocab_size, d.vocab_file)
  product1m_tfds.build(
      d.data_dir,
      d.tfds_dir,
      vocab_file=d.vocab_file,
      storage_dtype=storage_dtype,
      max_regions=p.max_regions,
      feature_dim=p.feature_dim,
      progress=False,
  )
  return c


# --------------------------------------------------------------------------
# Tiny models and batches.

B, T, R = 3, 10, 6  # `random_batch`: batch, text length, regions


def tiny_config(**overrides):
  """A small model of the demo's architecture (fast on CPU)."""
  cfg = config_lib.base_config()
  m = cfg.model
  m.update(
      vocab_size=97,
      max_position_embeddings=32,
      hidden_size=32,
      num_attention_heads=4,
      intermediate_size=48,
      num_hidden_layers=2,
      v_feature_size=24,
      v_target_size=24,
      v_hidden_size=32,
      v_num_attention_heads=2,
      v_intermediate_size=40,
      v_num_hidden_layers=2,
      bi_hidden_size=16,
      bi_num_attention_heads=2,
      co_num_layers=2,
      cross_hidden_size=32,
      cross_num_attention_heads=4,
      cross_num_layers=2,
      cross_max_position_embeddings=32,
      max_text_len=16,
  )
  m.update(overrides)
  return cfg


def random_batch(cfg, key=0, text_valid=None, regions_valid=None):
  """Random inputs; sample i has `text_valid[i]` tokens and `regions_valid[i]` regions (+ global token)."""
  layout = batch_lib.BatchLayout.for_model(cfg.model, T, R)
  batch = layout.random(
      B,
      cfg.model.vocab_size,
      seed=key,
      text_valid=text_valid,
      regions_valid=regions_valid,
      label_fraction=0.3,
  )
  return {k: jnp.asarray(v) for k, v in batch.items()}


def trainer_config(data_root: Path, **train_overrides):
  """The tiny model (one layer per stack: these tests are compile-bound) on the tiny synthetic
  dataset, checkpointing every 2 steps."""
  cfg = tiny_config(num_hidden_layers=1, v_num_hidden_layers=1, co_num_layers=1, cross_num_layers=1)
  tiny_dataset(data_root, config=cfg)
  cfg.model.vocab_size = 500
  cfg.model.max_text_len = cfg.data.max_text_len = 16
  cfg.train.update(num_steps=6, log_every=1, progress_bar=False, **train_overrides)
  cfg.checkpoint.update(every_steps=2, keep_last=5, async_save=True)
  return cfg


def release_state_dict(model_cfg, seed=0):
  """A complete release-format state_dict for `model_cfg`, built by inverting the name map."""
  shapes = convert.param_shapes(model_cfg)
  r = np.random.default_rng(seed)
  out = {}
  for path, (name, _) in convert.release_name_map(model_cfg).items():
    shape = shapes[path]
    if name.endswith('in_proj_weight'):
      out[name] = r.normal(
          size=(3 * model_cfg.cross_hidden_size, model_cfg.cross_hidden_size)
      ).astype(np.float32)
    elif name.endswith('in_proj_bias'):
      out[name] = r.normal(size=(3 * model_cfg.cross_hidden_size,)).astype(np.float32)
    elif path[-1] == 'kernel':
      out[name] = r.normal(size=shape[::-1]).astype(np.float32)
    else:
      out[name] = r.normal(size=shape).astype(np.float32)
  out['cls.predictions.decoder.weight'] = out['bert.embeddings.word_embeddings.weight'].copy()
  return out


def model_batch(
    config: ml_collections.ConfigDict, host: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
  """The device stage of `config` (`masking.model_batch`, jitted) on a host batch, as numpy."""
  import jax  # pylint: disable=import-outside-toplevel

  spec = masking_lib.MaskingSpec.from_config(config)
  if spec not in _DEVICE_STAGES:
    _DEVICE_STAGES[spec] = jax.jit(lambda h: masking_lib.model_batch(h, spec))
  return {k: np.asarray(v) for k, v in _DEVICE_STAGES[spec](host).items()}


_DEVICE_STAGES: dict = {}


# --------------------------------------------------------------------------
# Reference implementations (what the fused library code must equal).


def reference_mask_regions(
    feat: np.ndarray, region_mask: np.ndarray, keys, spec: masking_lib.MaskingSpec
) -> tuple[np.ndarray, np.ndarray]:
  """MRM: each valid region is chosen with p; a chosen region is zeroed with p0.

  Args:
    feat: [B, R, F] float32 region features (not modified).
    region_mask: [B, R] 1 for valid regions.
    keys: [B] record keys (`masking.record_keys`).
  Returns:
    masked features [B, R, F] float32 and image_label [B, R] int32 (1 where
    chosen, -1 elsewhere). The regression target is `feat` itself.
  """
  zero, image_label = masking_lib.choose_regions(jnp.asarray(region_mask), keys, spec)
  zero = np.asarray(zero)
  return feat * (~zero)[..., None].astype(feat.dtype), np.asarray(image_label)


def reference_instance_inputs(
    record: dict[str, Any], region_indices: Sequence[int], spec: collate_lib.BatchSpec
) -> dict[str, np.ndarray]:
  """The unmasked model inputs (batch of 1) of one instance of a sample: the
  full title, and as visual input only that instance's regions (their mean as
  the global token)."""
  return collate_lib.eval_batch([collate_lib.restrict_regions(record, region_indices)], spec)


# --------------------------------------------------------------------------
# The release fixture (`../shared/reference/release_fixture`).

# The outputs the fixture stores for each case, in `CaptureModel`'s names.
RELEASE_OUTPUT_KEYS = (
    'enc_pooled_text',
    'enc_pooled_visual',
    'text_after_coattention',
    'visual_after_coattention',
    'sequence_text',
    'sequence_visual',
    'pooled_text',
    'pooled_visual',
    'mlm_logits',
    'mrm_pred',
)


def rel_err(a, b) -> float:
  """||a - b|| / ||b|| in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def release_run_config(fixture_dir, state_dict):
  """Our config of the fixture's model (`config.json` + the state_dict's shapes)."""
  release = json.loads((Path(fixture_dir) / 'config.json').read_text())
  cfg = config_lib.base_config()
  cfg.model = convert.model_config_from_release(
      release['model'],
      release['cross_encoder'],
      release['co_transformer_mlp_ratio'],
      state_dict=state_dict,
      max_text_len=release['text_len'],
  )
  return cfg


REPO = Path(__file__).resolve().parents[1]


def write_config_module(path: Path, cfg: ml_collections.ConfigDict) -> Path:
  """A `configs/*.py`-style file whose `get_config()` returns `cfg`, for the commands' --config."""
  path.write_text(
      'import json, ml_collections\n\n\ndef get_config(arg=None):\n'
      f'  return ml_collections.ConfigDict(json.loads({cfg.to_json()!r}))\n'
  )
  return path


DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'


def with_cpu_devices(n: int, env: dict[str, str] | None = None) -> dict[str, str]:
  """`env` (default: this process's) for a JAX process on `n` CPU devices, keeping the tests'
  other XLA flags (conftest.py's faster compile: a process that drops it compiles the train
  step ~4x slower)."""
  env = without_device_count(dict(os.environ if env is None else env))
  flags = f"{env['XLA_FLAGS']} {DEVICE_COUNT_FLAG}={n}".strip()
  return {**env, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': flags}


def without_device_count(env: dict[str, str]) -> dict[str, str]:
  """`env` without a CPU device count, for a launcher that sets its own (it appends to
  XLA_FLAGS)."""
  flags = [f for f in env.get('XLA_FLAGS', '').split() if not f.startswith(DEVICE_COUNT_FLAG)]
  return {**env, 'XLA_FLAGS': ' '.join(flags)}


def compile_cache_env(cache_dir: str | None = None) -> dict[str, str]:
  """The environment that points a trainer process at the tests' compilation cache (conftest.py),
  or at `cache_dir`: tests that start several processes of one config compile its step once."""
  return {
      'JAX_COMPILATION_CACHE_DIR': cache_dir or jax.config.jax_compilation_cache_dir,
      'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
      'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '-1',
  }


def without_compile_cache(env: dict[str, str]) -> dict[str, str]:
  """`env` without the tests' compilation cache, for the processes of a multi-process (Gloo) run.

  Once in seven two-process runs that loaded the train step from the cache, both processes hung
  inside the step's collectives (the SIGTERM test of test_train.py; not understood, never seen in
  the CI runs without the cache): such runs compile their own programs. The cache saves such a
  run little anyway: JAX writes entries from process 0 only, and on CPU the other processes' keys
  differ from its own (measured: process 1 misses every time), so process 1 compiles in every
  run. The SLURM jobs, which have shared the cache in every CI run so far, keep it."""
  return {k: v for k, v in env.items() if k not in compile_cache_env()}


def run_module(module: str, *args, timeout: float = 300) -> subprocess.CompletedProcess:
  """`python -m module args...` from the repo root on CPU, as a user runs a command; the exit
  status and the text of stdout and stderr."""
  path = os.pathsep.join(p for p in (str(REPO), os.environ.get('PYTHONPATH', '')) if p)
  return subprocess.run(
      [sys.executable, '-m', module, *map(str, args)],
      cwd=REPO,
      capture_output=True,
      text=True,
      env={**os.environ, 'PYTHONPATH': path, 'JAX_PLATFORMS': 'cpu'},
      timeout=timeout,
  )


def start_python(script: str) -> subprocess.Popen:
  """`python -c script` from the repo root on CPU; stdout and stderr together, as text."""
  return subprocess.Popen(
      [sys.executable, '-c', script],
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )


class DeviceFetchError(RuntimeError):
  """A device-to-host fetch where `no_device_fetches` forbids one."""


_no_fetch = __import__('threading').local()
_fetch_guard_installed = []


def no_device_fetches():
  """A context in which fetching a `jax.Array`'s value to the host raises `DeviceFetchError`, in
  this thread: `np.asarray` / `np.array` of one, `jax.device_get`, and Python scalar
  conversions (`float(x)`, ...). For `train.BETWEEN_SYNC_POINTS`.

  JAX's own `transfer_guard_device_to_host('disallow_explicit')` is applied too, but it does not
  fire on CPU devices (their memory is the host's), hence the patched entry points. Not covered:
  a fetch through the buffer protocol from C code (e.g. `memoryview(x)`).
  """
  import contextlib  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel
  from jax._src import array as array_lib  # pylint: disable=import-outside-toplevel

  def forbid(x, what):
    if getattr(_no_fetch, 'on', False) and isinstance(x, jax.Array):
      raise DeviceFetchError(
          f'{what} of a {x.dtype}{list(x.shape)} jax.Array (a device-to-host fetch) between the '
          'sync points'
      )

  if not _fetch_guard_installed:
    value, asarray, array, device_get = (
        array_lib.ArrayImpl._value,  # pylint: disable=protected-access
        np.asarray,
        np.array,
        jax.device_get,
    )

    def checked_value(self):
      forbid(self, 'the value')
      return value.fget(self)

    def checked_asarray(a, *args, **kwargs):
      forbid(a, 'np.asarray')
      return asarray(a, *args, **kwargs)

    def checked_array(a, *args, **kwargs):
      forbid(a, 'np.array')
      return array(a, *args, **kwargs)

    def checked_device_get(x):
      for leaf in jax.tree.leaves(x):
        forbid(leaf, 'jax.device_get')
      return device_get(x)

    array_lib.ArrayImpl._value = property(checked_value)  # pylint: disable=protected-access
    np.asarray, np.array, jax.device_get = checked_asarray, checked_array, checked_device_get
    _fetch_guard_installed.append(True)

  @contextlib.contextmanager
  def guard():
    _no_fetch.on = True
    try:
      with jax.transfer_guard_device_to_host('disallow_explicit'):
        yield
    finally:
      _no_fetch.on = False

  return guard()


def tiny_hf_bert(directory: Path, model_cfg: ml_collections.ConfigDict, vocab_file, seed=0) -> Path:
  """A random `BertForMaskedLM` with `model_cfg`'s text-stream sizes, saved by transformers'
  `save_pretrained` into `directory` (`config.json`, `model.safetensors`), with `vocab_file`
  copied as its `vocab.txt`: a stand-in for bert-base-chinese (no download)."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  m = model_cfg
  hf = transformers.BertConfig(
      vocab_size=m.vocab_size,
      hidden_size=m.hidden_size,
      num_hidden_layers=m.num_hidden_layers,
      num_attention_heads=m.num_attention_heads,
      intermediate_size=m.intermediate_size,
      max_position_embeddings=m.max_position_embeddings,
      type_vocab_size=m.type_vocab_size,
  )
  torch.manual_seed(seed)
  transformers.BertForMaskedLM(hf).save_pretrained(directory)
  (Path(directory) / 'vocab.txt').write_bytes(Path(vocab_file).read_bytes())
  return Path(directory)
