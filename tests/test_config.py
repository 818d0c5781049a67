"""The config schema (`capture_jax.config`): every field has a rule, every rule refuses what it
should with one line, and every command refuses a bad config or an unknown field with one
`error:` line and exit status 1, before anything compiles."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from capture_jax import config as config_lib

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((REPO / 'configs').glob('*.py'))


def nested(config) -> dict:
  """A plain nested dict of `config` (no ConfigDict type locking: any value can be tried)."""
  return config.copy_and_resolve_references().to_dict()


def with_value(base: dict, path: str, value) -> dict:
  out = copy.deepcopy(base)
  node = out
  *sections, name = path.split('.')
  for s in sections:
    node = node[s]
  node[name] = value
  return out


def test_every_field_has_a_rule_and_every_rule_a_field():
  fields = set(config_lib.flatten(config_lib.base_config()))
  assert fields - set(config_lib.SCHEMA) == set(), 'fields without a declared type and range'
  assert set(config_lib.SCHEMA) - fields == set(), 'rules of fields that do not exist'


@pytest.mark.parametrize('path', CONFIG_FILES, ids=lambda p: p.name)
def test_the_config_files_satisfy_the_schema(path):
  config = config_lib.load_config_file(path)
  assert config_lib.problems(config) == []
  assert set(config_lib.flatten(config)) == set(config_lib.SCHEMA)


@pytest.mark.parametrize('path', sorted(config_lib.SCHEMA))
def test_every_field_refuses_a_wrong_value_with_one_line(path):
  """Walks the schema: each field's out-of-range and wrong-typed values are refused, naming the
  field, the value and what is allowed; its default (and every config file's value) passes."""
  rule = config_lib.SCHEMA[path]
  bad = rule.bad_values()
  assert bad, path
  if rule.lo is not None or rule.hi is not None:  # a bounded number is tried out of its range
    assert any(isinstance(b, (int, float)) and math.isfinite(b) and b != 1.5 for b in bad), bad
  for base_config in [config_lib.base_config()] + [
      config_lib.load_config_file(f) for f in CONFIG_FILES
  ]:
    base = nested(base_config)
    for value in bad:
      with pytest.raises(config_lib.ConfigError) as err:
        config_lib.validate(with_value(base, path, value))
      message = str(err.value)
      assert '\n' not in message
      assert f'config.{path}={value!r} is not allowed: expected {rule.allowed()}' in message


def test_refusals_say_what_is_allowed():
  base = nested(config_lib.base_config())
  cases = {
      ('train.learning_rate', -1.0): 'config.train.learning_rate=-1.0 is not allowed: expected a '
      'finite number > 0',
      ('data.mlm_probability', 1.5): 'expected a finite number in [0, 1]',
      ('model.hidden_dropout_prob', 2.0): 'expected a finite number in [0, 1)',
      ('mesh.data', 0): 'expected an integer >= 1, or -1',
      ('model.dtype', 'float16'): "expected one of 'float32', 'bfloat16'",
      ('mesh.rules', 'fsdp,sharded'): "comma-separated names among 'replicated', 'fsdp', 'tensor'",
      ('train.num_steps', True): 'config.train.num_steps=True is not allowed: expected an integer',
  }
  for (path, value), expected in cases.items():
    with pytest.raises(config_lib.ConfigError, match='^bad configuration: ') as err:
      config_lib.validate(with_value(base, path, value))
    assert expected in str(err.value), (path, str(err.value))


@pytest.mark.parametrize(
    'changes, expected',
    [
        ({'data.feature_dim': 100}, 'data.feature_dim=100 differs from model.v_feature_size=2048'),
        (
            {'model.num_attention_heads': 5},
            'model.hidden_size=768 is not a multiple of model.num_attention_heads=5',
        ),
        (
            {'data.max_regions': 600},
            'model.max_text_len=36 + data.max_regions=600 + 1 = 637 positions exceed '
            'model.cross_max_position_embeddings=512',
        ),
        (
            {'model.max_text_len': 600, 'data.max_text_len': 600},
            'model.max_text_len=600 must be <= model.max_position_embeddings=512',
        ),
        ({'data.max_text_len': 20}, 'data.max_text_len=20 differs from model.max_text_len=36'),
        (
            {'data.mlm_mask_probability': 0.8, 'data.mlm_random_probability': 0.3},
            'data.mlm_mask_probability=0.8 + data.mlm_random_probability=0.3 exceed 1',
        ),
        ({'train.init': 'bert'}, "train.init='bert' needs train.init_path"),
        ({'mesh.data': -1, 'mesh.fsdp': -1}, 'at most one mesh axis may be -1'),
        (
            {'instances.min_products': 8},
            'instances.min_products=8 must be <= instances.max_products=7',
        ),
        (
            {'instances.boxes_min_area': 0.9},
            'instances.boxes_min_area=0.9 must be < instances.boxes_max_area=0.9',
        ),
        (
            {'instances.warmup_steps': 500},
            'instances.warmup_steps=500 must be <= instances.num_steps=400',
        ),
        ({'data.vocab_splits': ' , '}, 'data.vocab_splits names no split'),
    ],
)
def test_fields_that_must_agree_are_checked_together(changes, expected):
  config = nested(config_lib.base_config())
  for path, value in changes.items():
    config = with_value(config, path, value)
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate(config)
  assert expected in str(err.value)


def test_an_unknown_or_missing_field_is_refused_with_the_nearest_name():
  config = config_lib.base_config()
  config.train.num_step = 5  # a config file's typo adds a field: refused, not ignored
  with pytest.raises(
      config_lib.ConfigError,
      match=r'unknown config field train.num_step \(did ' r'you mean train.num_steps\?\)',
  ):
    config_lib.validate(config)
  plain = nested(config_lib.base_config())
  del plain['eval']['shard_size']
  with pytest.raises(config_lib.ConfigError, match='config.eval.shard_size is missing'):
    config_lib.validate(plain)


def test_choices_are_those_of_the_modules_that_own_them():
  from capture_jax import losses  # pylint: disable=import-outside-toplevel
  from capture_jax.data import formats, product1m_tfds, synthetic  # pylint: disable=import-outside-toplevel
  from capture_jax.retrieval import embedding as embeddings, instance_merge  # pylint: disable=import-outside-toplevel
  from capture_jax.instances import proposals  # pylint: disable=import-outside-toplevel
  from capture_jax.models import layers  # pylint: disable=import-outside-toplevel
  from capture_jax.training import sharding, state  # pylint: disable=import-outside-toplevel

  s = config_lib.SCHEMA
  assert s['train.init'].choices == state.INIT_KINDS
  assert s['model.attention_impl'].choices == layers.ATTENTION_IMPLS
  assert s['loss.contrastive'].choices == losses.CONTRASTIVE_KINDS
  assert s['eval.embedding'].choices == embeddings.EMBEDDING_KINDS
  assert s['eval.query_mode'].choices == instance_merge.MERGE_MODES
  assert set(s['eval.instances'].choices) == {''} | set(proposals.METHODS)
  assert s['mesh.rules'].choices == sharding.KNOWN_RULES
  assert set(s['data.storage_dtype'].choices) == set(product1m_tfds.STORAGE_DTYPES)
  assert set(s['data.synthetic_preset'].choices) == set(synthetic.PRESETS)
  assert s['data.vocab_splits'].choices == formats.SPLITS


# --------------------------------------------------------------------------
# The commands: one `error:` line, exit status 1, no traceback.


def run_command(args: list[str]) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, '-m', *args],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=120,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )


def assert_one_line_refusal(proc: subprocess.CompletedProcess, *expected: str) -> None:
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert 'Traceback' not in proc.stderr, proc.stderr
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error: ')]
  assert len(errors) == 1, proc.stderr
  for e in expected:
    assert e in errors[0], errors[0]


@pytest.mark.parametrize(
    'override, expected',
    [
        ('train.learning_rate=-1', 'config.train.learning_rate=-1.0 is not allowed'),
        ('data.mlm_probability=1.5', 'config.data.mlm_probability=1.5 is not allowed'),
        ('model.hidden_dropout_prob=2.0', 'config.model.hidden_dropout_prob=2.0 is not allowed'),
        (
            'train.num_step=5',
            'unknown config field train.num_step in --config.train.num_step=5 (did you mean '
            'train.num_steps?)',
        ),
        ('train.num_steps=abc', '--config.train.num_steps=abc: invalid literal for int()'),
    ],
)
def test_the_trainer_refuses_a_bad_override_in_one_line(tmp_path, override, expected):
  proc = run_command(
      [
          'capture_jax.train',
          '--config=configs/demo.py',
          f'--workdir={tmp_path / "run"}',
          f'--config.{override}',
      ]
  )
  assert_one_line_refusal(proc, expected)
  assert not (tmp_path / 'run').exists()  # refused before touching the workdir


@pytest.mark.parametrize(
    'command',
    [
        ['capture_jax.export'],
        ['capture_jax.evaluate'],
        ['capture_jax.demo'],
        ['capture_jax.ablation'],
        ['capture_jax.instances', 'train'],
    ],
    ids=lambda c: c[-1].rsplit('.', 1)[-1],
)
def test_every_command_refuses_a_bad_config(tmp_path, command):
  proc = run_command(
      command
      + [
          '--config=configs/demo.py',
          f'--workdir={tmp_path / "run"}',
          '--config.data.mlm_probability=1.5',
      ]
  )
  assert_one_line_refusal(proc, 'config.data.mlm_probability=1.5 is not allowed')
  assert not (tmp_path / 'run').exists()
