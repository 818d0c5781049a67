"""The product1m TFDS builder: ArrayRecord splits, read back, bad input, skip_bad."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from capture_jax.data import formats
from capture_jax.data import source as source_lib
from capture_jax.data import train_input
from capture_jax.data import product1m_schema
from capture_jax.data import product1m_tfds
from capture_jax.data import synthetic
from capture_jax.data import tokenizer as tokenizer_lib
from tests import helpers
from tests.helpers import run_module

TINY = synthetic.PRESETS['tiny']


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  """A tiny world with one npz per image (easy to corrupt one image)."""
  root = str(tmp_path_factory.mktemp('world'))
  synthetic.generate(root, 'tiny', feature_format='npz', progress=False)
  return root


@pytest.fixture(scope='module')
def built(world, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('tfds'))
  report = helpers.build_dataset(world, out, max_regions=TINY.max_regions, progress=False)
  return out, report


def _lines(root, split):
  return [
      a for _, a in formats.read_annotations(os.path.join(root, formats.annotation_filename(split)))
  ]


def test_builds_every_split_without_tensorflow(built, world):
  if importlib.util.find_spec('tensorflow') is not None:
    pytest.skip('TensorFlow is installed here; this checks the build without it')
  out, report = built
  assert report['dataset_dir'] == product1m_tfds.dataset_dir(out, 'float16')
  assert report['feature_dim'] == TINY.feature_dim  # inferred from the first image
  for split in formats.SPLITS:
    assert report['splits'][split] == {
        'examples': len(_lines(world, split)),
        'skipped': 0,
        'by_kind': {},
        'truncated': 0,
    }
  files = os.listdir(report['dataset_dir'])
  assert any(f.startswith('product1m-train.array_record') for f in files)
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel

  shard = next(f for f in files if f.startswith('product1m-train.array_record'))
  reader = array_record_module.ArrayRecordReader(os.path.join(report['dataset_dir'], shard))
  options = reader.writer_options_string().split(',')
  reader.close()
  assert 'group_size:1' in options and 'uncompressed' in options  # the codec measured best
  saved = json.load(open(os.path.join(report['dataset_dir'], product1m_tfds.REPORT_NAME)))
  assert saved['splits'] == report['splits']


def test_read_back_with_tfds_data_source(built, world):
  out, _ = built
  sources = tfds.data_source('product1m/float16', data_dir=out)
  assert set(sources) == set(formats.SPLITS)
  anns = _lines(world, 'dev')
  assert len(sources['dev']) == len(anns)
  for i, ann in enumerate(anns):  # file order is kept
    ex = sources['dev'][i]
    assert ex['item_id'].decode() == ann.item_id and ex['title'].decode() == ann.title
    assert tuple(l.decode() for l in ex['labels']) == ann.labels
    rf = formats.read_npz(os.path.join(world, 'features', f'{ann.item_id}.npz'))
    assert ex['features'].dtype == np.float16
    np.testing.assert_array_equal(ex['features'], rf.features.astype(np.float16))
    np.testing.assert_array_equal(ex['boxes'], rf.boxes)
    assert (ex['image_w'], ex['image_h']) == (rf.image_w, rf.image_h)
  # Also through the read-only builder, as a process without this module would.
  ro = tfds.builder_from_directory(product1m_tfds.dataset_dir(out, 'float16'))
  assert len(ro.as_data_source()['gallery']) == len(_lines(world, 'gallery'))


def test_fast_decoder_matches_tfds_decoding(built):
  out, _ = built
  src = source_lib.Product1MSource(out, 'train')
  assert src._use_fast  # the layout check passed
  ref = tfds.data_source('product1m/float16', data_dir=out)['train']
  for i in range(len(src)):
    assert source_lib._records_equal(src[i], source_lib._tfds_to_record(ref[i]))


@pytest.mark.parametrize('with_cls_prob', [False, True])
def test_wire_decoder_matches_tfds_on_edge_records(with_cls_prob):
  """The decoder walks the protobuf wire format itself: lengths of 1 to 3 varint bytes, empty
  values and lists, many labels, float32 storage, all as TFDS decodes them."""
  features = product1m_schema.features_dict('float32', with_cls_prob)
  serializer = tfds.core.example_serializer.ExampleSerializer(features.get_serialized_info())
  decoder = source_lib._FastDecoder(np.float32, with_cls_prob)
  rng = np.random.default_rng(0)
  for title, n, labels in [
      ('', 2, []),
      ('面霜' * 200, 1, ['a']),
      ('x', 36, [f'l{i}' for i in range(300)]),
  ]:
    example = {
        'item_id': 'item' + 'é' * 70,
        'title': title,
        'token_ids': rng.integers(0, 30000, len(title), dtype=np.int32),
        'labels': labels,
        'image_w': 2**20,
        'image_h': 1,
        'boxes': rng.random((n, 4), dtype=np.float32),
        'features': rng.random((n, 2048), dtype=np.float32),
    }
    if with_cls_prob:
      example['cls_prob'] = rng.random((n, 1601), dtype=np.float32)
    raw = serializer.serialize_example(features.encode_example(example))
    want = source_lib._tfds_to_record(features.deserialize_example_np(raw))
    assert source_lib._records_equal(decoder(raw), want)
  with pytest.raises(ValueError, match='runs past the end'):
    decoder(raw[:-1])


def test_records_carry_their_titles_token_ids_and_the_dataset_names_its_vocab(built, world):
  out, _ = built
  vocab = helpers.build_vocab()
  titles = tokenizer_lib.TitleTokenizer(vocab)
  src = source_lib.Product1MSource(out, 'dev', vocab_file=vocab)
  records = src.read_records(range(len(src)))
  assert [r['item_id'] for r in records] == [a.item_id for a in _lines(world, 'dev')]
  for r, ann in zip(records, _lines(world, 'dev')):
    assert r['token_ids'].dtype == np.int32 and r['title'] == ann.title
    np.testing.assert_array_equal(r['token_ids'], titles.ids(ann.title))
  # The identity, as TFDS's own metadata of the dataset (read back without this module's code).
  info = tfds.builder_from_directory(product1m_tfds.dataset_dir(out)).info
  assert info.metadata['vocab_fingerprint'] == tokenizer_lib.vocab_fingerprint(vocab)
  assert info.metadata['do_lower_case'] is True
  assert info.metadata['layout'] == product1m_schema.LAYOUT


def test_a_split_of_another_vocab_is_refused_naming_both_and_the_rebuild(built, world, tmp_path):
  out, _ = built
  other = str(tmp_path / 'other.txt')
  tokenizer_lib.train_vocab(['完全不同的词表 other words'], 40, other, min_frequency=1)
  with pytest.raises(ValueError) as err:
    source_lib.Product1MSource(out, 'train', vocab_file=other)
  msg = str(err.value)
  assert '\n' not in msg and helpers.build_vocab() in msg and other in msg
  assert f'{product1m_schema.BUILD_COMMAND} --data_dir DATA --out {out} --vocab {other}' in msg
  # The same tokens in another file are the same vocab.
  same = str(tmp_path / 'same.txt')
  shutil.copy(helpers.build_vocab(), same)
  assert len(source_lib.Product1MSource(out, 'train', vocab_file=same)) == TINY.num_train
  # The build does not pass the dataset off as one of the other vocab either.
  with pytest.raises(ValueError, match='rebuild it: .* --overwrite'):
    helpers.build_dataset(world, out, vocab_file=other, max_regions=TINY.max_regions)


def test_a_dataset_of_the_older_layout_is_refused_with_the_rebuild_command(built, tmp_path):
  out, _ = built
  # Version 1.0.0: what the build wrote before titles carried their token ids.
  old = str(tmp_path / 'old')
  shutil.copytree(
      product1m_tfds.dataset_dir(out), product1m_schema.dataset_dir(old, version='1.0.0')
  )
  with pytest.raises(ValueError, match=r'older layout \(version 1\.0\.0.*rebuild it: python -m'):
    source_lib.Product1MSource(old, 'train')
  # The current version without its identity (metadata.json).
  bare = str(tmp_path / 'bare')
  shutil.copytree(product1m_tfds.dataset_dir(out), product1m_tfds.dataset_dir(bare))
  os.remove(os.path.join(product1m_tfds.dataset_dir(bare), 'metadata.json'))
  with pytest.raises(ValueError, match=f'older layout.*--out {bare} --vocab VOCAB'):
    source_lib.Product1MSource(bare, 'train')


def test_float32_storage_and_absent_split(world, tmp_path):
  data = tmp_path / 'data'
  shutil.copytree(world, data)
  os.remove(data / formats.annotation_filename('test'))
  report = helpers.build_dataset(
      str(data),
      str(tmp_path / 'out'),
      storage_dtype='float32',
      max_regions=TINY.max_regions,
      progress=False,
  )
  assert set(report['splits']) == {'train', 'gallery', 'dev'}  # no file, no split
  sources = tfds.data_source('product1m/float32', data_dir=str(tmp_path / 'out'))
  assert 'test' not in sources
  ann = _lines(world, 'gallery')[0]
  rf = formats.read_npz(os.path.join(world, 'features', f'{ann.item_id}.npz'))
  np.testing.assert_array_equal(sources['gallery'][0]['features'], rf.features)  # exact
  with pytest.raises(ValueError, match="split 'test' was not built"):
    source_lib.Product1MSource(str(tmp_path / 'out'), 'test', 'float32')


def _corrupt_npz(data, item_id, **changes):
  path = os.path.join(data, 'features', f'{item_id}.npz')
  rf = formats.read_npz(path)
  for key, fn in changes.items():
    setattr(rf, key, fn(getattr(rf, key)))
  formats.write_npz(path, rf)
  return path


def _set_line(data, split, index, line):
  path = os.path.join(data, formats.annotation_filename(split))
  lines = open(path, encoding='utf-8').read().splitlines()
  lines[index] = line
  open(path, 'w', encoding='utf-8').write('\n'.join(lines) + '\n')
  return path


def _first_ids(world, split, n):
  return [a.item_id for a in _lines(world, split)[:n]]


def _nan(f):
  f = f.copy()
  f[0, 3] = np.nan
  return f


def _flat(b):
  b = b.copy()
  b[0, 2] = b[0, 0]
  return b


def _outside(b):
  b = b.copy()
  b[0, 3] = 5000.0
  return b


CASES = {
    'malformed_line': lambda data, ids: (
        _set_line(data, 'gallery', 1, f'{ids[1]}#####a title#####u#####u'),
        'expected 5 fields',
    ),
    'empty_title': lambda data, ids: (
        _set_line(data, 'gallery', 2, f'{ids[2]}#####   #####u#####v#####Foo 面霜'),
        'empty title',
    ),
    'missing_features': lambda data, ids: (
        os.remove(os.path.join(data, 'features', f'{ids[3]}.npz')),
        f'image {ids[3]} has no region features',
    ),
    'wrong_width': lambda data, ids: (
        _corrupt_npz(data, ids[4], features=lambda f: np.pad(f, ((0, 0), (0, 1)))),
        f'image {ids[4]}: features have width {TINY.feature_dim + 1}, expected {TINY.feature_dim}',
    ),
    'nonfinite_features': lambda data, ids: (
        _corrupt_npz(data, ids[5], features=_nan),
        f'image {ids[5]}: features contain NaN',
    ),
    'zero_area_box': lambda data, ids: (
        _corrupt_npz(data, ids[6], boxes=_flat),
        f'image {ids[6]}: box 0',
    ),
    'box_outside_image': lambda data, ids: (
        _corrupt_npz(data, ids[7], boxes=_outside),
        f'image {ids[7]}: box 0',
    ),
}


CASE_INDEX = {
    'malformed_line': 1,
    'empty_title': 2,
    'missing_features': 3,
    'wrong_width': 4,
    'nonfinite_features': 5,
    'zero_area_box': 6,
    'box_outside_image': 7,
}


@pytest.mark.parametrize('kind', sorted(CASES))
def test_bad_input_stops_with_file_line_and_id(world, tmp_path, kind):
  data = str(tmp_path / 'data')
  shutil.copytree(world, data)
  ids = _first_ids(world, 'gallery', 8)
  _, fragment = CASES[kind](data, ids)
  with pytest.raises(formats.BadInputError) as err:
    helpers.build_dataset(
        data,
        str(tmp_path / 'out'),
        max_regions=TINY.max_regions,
        feature_dim=TINY.feature_dim,
        progress=False,
    )
  assert err.value.kind == kind
  # Case k corrupts the k-th gallery sample (0-based), on line k + 1.
  line = CASE_INDEX[kind] + 1
  where = f'{os.path.join(data, formats.annotation_filename("gallery"))}:{line}:'
  assert str(err.value).startswith(where) and fragment in str(err.value), str(err.value)


def test_skip_bad_counts_every_kind_and_builds_the_rest(world, tmp_path):
  data = str(tmp_path / 'data')
  shutil.copytree(world, data)
  ids = _first_ids(world, 'gallery', 8)
  for case in CASES.values():
    case(data, ids)
  report = helpers.build_dataset(
      data,
      str(tmp_path / 'out'),
      max_regions=TINY.max_regions,
      feature_dim=TINY.feature_dim,
      skip_bad=True,
      progress=False,
  )
  gallery = report['splits']['gallery']
  assert gallery['by_kind'] == {kind: 1 for kind in CASES}
  assert gallery['skipped'] == len(CASES)
  assert gallery['examples'] == len(_lines(world, 'gallery')) - len(CASES)
  built_ids = {
      r['item_id']
      for r in source_lib.Product1MSource(str(tmp_path / 'out'), 'gallery').read_records(
          range(gallery['examples'])
      )
  }
  assert built_ids.isdisjoint(ids[1:8]) and ids[0] in built_ids


def test_more_regions_than_the_maximum_are_truncated_and_counted(world, tmp_path):
  report = helpers.build_dataset(world, str(tmp_path / 'out'), max_regions=4, progress=False)
  src = source_lib.Product1MSource(str(tmp_path / 'out'), 'dev')
  expected = 0
  for i, ann in enumerate(_lines(world, 'dev')):
    n = formats.read_npz(os.path.join(world, 'features', f'{ann.item_id}.npz')).num_boxes
    expected += n > 4
    assert src[i]['features'].shape[0] == min(n, 4)
  assert expected > 0 and report['splits']['dev']['truncated'] == expected
  assert report['splits']['dev']['skipped'] == 0


def test_float16_overflow_is_an_error(world, tmp_path):
  data = str(tmp_path / 'data')
  shutil.copytree(world, data)
  item = _first_ids(world, 'train', 1)[0]
  _corrupt_npz(data, item, features=lambda f: f + 1e6)
  with pytest.raises(formats.BadInputError, match=f'image {item}: features overflow float16'):
    helpers.build_dataset(data, str(tmp_path / 'out'), progress=False)


def test_cli(world, tmp_path):
  out = str(tmp_path / 'out')
  proc = run_module(
      'capture_jax.data.product1m_tfds',
      *('--data_dir', world, '--out', out, '--max_regions', 8, '--vocab', helpers.build_vocab()),
      *('--storage_dtype', 'float32', '--skip_bad'),
  )
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip().splitlines()[-1] == product1m_tfds.dataset_dir(out, 'float32')
  assert f'dev: {TINY.num_dev} examples, 0 bad skipped' in proc.stderr
  # Without a vocab: one line saying what to pass.
  proc = run_module('capture_jax.data.product1m_tfds', '--data_dir', world, '--out', out + '2')
  assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith(
      'error: pass --vocab'
  )


def test_python_dash_m_with_two_workers(world, tmp_path):
  """`python -m capture_jax.data.product1m_tfds` (the README's command): run as `__main__`,
  with workers spawned as `__mp_main__`, the builder is registered once (was: "Dataset with
  name product1m already registered")."""
  out = str(tmp_path / 'out')
  proc = subprocess.run(
      [
          sys.executable,
          '-m',
          'capture_jax.data.product1m_tfds',
          f'--data_dir={world}',
          f'--out={out}',
          f'--vocab={helpers.build_vocab()}',
          f'--max_regions={TINY.max_regions}',
          '--num_workers=2',
          '--examples_per_shard=32',
      ],
      capture_output=True,
      text=True,
      env={**os.environ, 'PYTHONPATH': str(pathlib.Path(__file__).parents[1])},
      timeout=300,
      check=False,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip().splitlines()[-1] == product1m_tfds.dataset_dir(out, 'float16')
  assert f'train: {TINY.num_train} examples' in proc.stderr


def test_detector_class_distributions_feed_the_class_target(world, tmp_path):
  """`*_cls_prob` configs store cls_prob; model.mrm_target='class' makes it the target."""
  from capture_jax import config as config_lib

  data = str(tmp_path / 'data')
  shutil.copytree(world, data)
  rng = np.random.default_rng(0)
  for name in os.listdir(os.path.join(data, 'features')):
    path = os.path.join(data, 'features', name)
    rf = formats.read_npz(path)
    rf.cls_prob = rng.dirichlet(np.ones(6), rf.num_boxes).astype(np.float32)
    formats.write_npz(path, rf)
  out = str(tmp_path / 'out')
  vocab = str(tmp_path / 'vocab.txt')
  from capture_jax.data import tokenizer

  tokenizer.train_vocab(tokenizer.iter_titles(data), 300, vocab)
  helpers.build_dataset(
      data, out, with_cls_prob=True, storage_dtype='float32', progress=False, vocab_file=vocab
  )
  c = config_lib.base_config()
  c.data.update(
      dict(
          data_dir=data,
          tfds_dir=out,
          storage_dtype='float32',
          max_regions=8,
          feature_dim=TINY.feature_dim,
          batch_size=4,
      )
  )
  c.data.vocab_file = vocab
  c.model.update(dict(mrm_target='class', v_target_size=6, max_text_len=24))
  host = next(train_input.make_train_iterator(c, process_index=0, process_count=1))
  assert host['region_target'].shape == (4, 8, 6) and host['region_target'].dtype == np.float32
  batch = helpers.model_batch(c, host)
  assert batch['image_target'].shape == (4, 8, 6)
  valid = batch['image_mask'][:, 1:] == 1
  np.testing.assert_allclose(batch['image_target'][valid].sum(-1), 1.0, rtol=1e-5)
