"""Fault injection on the data layer: each fault gives a named error or a counted skip.

Issue #11, data part. Every test corrupts a copy of a tiny world (or writes a
few lines) and asserts what the system does: the exception or exit status,
the message naming the file and line or image id, and what is left on disk.
docs/RELIABILITY.md lists these faults with the test that proves each.
"""

from __future__ import annotations

import codecs
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tensorflow_datasets as tfds

from capture_jax.data import formats
from capture_jax.data import product1m_tfds
from capture_jax.data import synthetic
from capture_jax.retrieval import metrics
from tests import official_eval
from tests import helpers
from tests.helpers import run_module

REPO = Path(__file__).resolve().parents[1]
TINY = synthetic.PRESETS['tiny']
BOM = codecs.BOM_UTF8
BUILD = 'capture_jax.data.product1m_tfds'  # the dataset build command


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  """A tiny world with one npz per image (easy to corrupt one image)."""
  root = str(tmp_path_factory.mktemp('world'))
  synthetic.generate(root, 'tiny', feature_format='npz', progress=False)
  return root


@pytest.fixture
def data(world, tmp_path):
  """A private copy of the world to corrupt."""
  path = str(tmp_path / 'data')
  shutil.copytree(world, path)
  return path


def _ann_path(root: str, split: str) -> str:
  return os.path.join(root, formats.annotation_filename(split))


def _ids(root: str, split: str) -> list[str]:
  return [a.item_id for _, a in formats.read_annotations(_ann_path(root, split))]


def _edit_bytes(path: str, fn) -> None:
  with open(path, 'rb') as f:
    raw = f.read()
  with open(path, 'wb') as f:
    f.write(fn(raw))


def _build(data: str, out: str, **kwargs) -> dict:
  return helpers.build_dataset(
      data,
      out,
      max_regions=TINY.max_regions,
      feature_dim=TINY.feature_dim,
      progress=False,
      **kwargs,
  )


def _no_dataset_left(out: str) -> bool:
  """A failed build leaves nothing: no dataset a later run could take as finished."""
  config_dir = os.path.dirname(product1m_tfds.dataset_dir(out))
  return not os.path.isdir(config_dir) or not os.listdir(config_dir)


# ----------------------------------------------------------------------------
# 1. Undecodable annotation lines, truncated or corrupted feature files.
# ----------------------------------------------------------------------------


def test_non_utf8_annotation_line_names_file_line_and_column(tmp_path):
  path = tmp_path / formats.annotation_filename('gallery')
  path.write_bytes(
      'g1#####标题#####u#####v#####A\n'.encode() + b'g2#####t\xff\xfe#####u#####v#####A\n'
  )
  with pytest.raises(formats.BadInputError) as err:
    list(formats.read_annotations(str(path)))
  assert err.value.kind == 'bad_encoding'
  assert str(err.value).startswith(f'{path}:2: byte 0xff at column 9 is not valid utf-8')
  counter = formats.BadInputCounter(skip_bad=True)
  assert [a.item_id for _, a in formats.read_annotations(str(path), counter=counter)] == ['g1']
  assert counter.counts == {'bad_encoding': 1}


def test_build_stops_on_non_utf8_line_and_skip_bad_counts_it(data, tmp_path):
  gallery = _ann_path(data, 'gallery')
  n = len(_ids(data, 'gallery'))
  item = _ids(data, 'gallery')[2]
  # Line 3 gets a Latin-1 byte after its id (a line edited by a tool in another encoding).
  _edit_bytes(gallery, lambda raw: raw.replace(item.encode() + b'#', item.encode() + b'\xe9#', 1))
  out = str(tmp_path / 'out')
  column = len(item) + 1
  with pytest.raises(formats.BadInputError, match=rf'{gallery}:3: byte 0xe9 at column {column} '):
    _build(data, out)
  assert _no_dataset_left(out)
  report = _build(data, str(tmp_path / 'out2'), skip_bad=True)
  assert report['splits']['gallery']['by_kind'] == {'bad_encoding': 1}
  assert report['splits']['gallery']['examples'] == n - 1


@pytest.mark.parametrize(
    'damage, cause',
    [
        (lambda raw: raw[: len(raw) // 2], 'BadZipFile'),  # truncated copy
        (lambda raw: b'', 'EOFError'),  # zero-byte file (disk full)
        (lambda raw: raw[:60] + bytes(16) + raw[76:], 'BadZipFile: Bad CRC-32'),  # bit rot
    ],
    ids=['truncated', 'zero_bytes', 'bad_crc'],
)
def test_corrupted_npz_names_file_and_image(data, tmp_path, damage, cause):
  item = _ids(data, 'gallery')[2]
  npz = os.path.join(data, 'features', f'{item}.npz')
  _edit_bytes(npz, damage)
  with pytest.raises(formats.BadInputError) as err:
    formats.read_npz(npz)
  assert err.value.kind == 'malformed_features'
  assert str(err.value).startswith(f'{npz}: image {item}: cannot read npz') and cause in str(
      err.value
  )
  out = str(tmp_path / 'out')
  with pytest.raises(formats.BadInputError) as err:
    _build(data, out)
  # The build names the annotation line too: gallery line 3 is the image.
  assert str(err.value).startswith(f'{_ann_path(data, "gallery")}:3: {npz}: image {item}')
  assert _no_dataset_left(out)


def test_skip_bad_counts_corrupted_npz_files_in_the_report(data, tmp_path):
  ids = _ids(data, 'gallery')
  _edit_bytes(os.path.join(data, 'features', f'{ids[0]}.npz'), lambda raw: raw[:100])
  _edit_bytes(os.path.join(data, 'features', f'{ids[5]}.npz'), lambda raw: b'')
  report = _build(data, str(tmp_path / 'out'), skip_bad=True)
  gallery = report['splits']['gallery']
  assert gallery['by_kind'] == {'malformed_features': 2} and gallery['skipped'] == 2
  assert gallery['examples'] == len(ids) - 2
  built = {
      ex['item_id'].decode()
      for ex in tfds.data_source('product1m/float16', data_dir=str(tmp_path / 'out'))['gallery']
  }
  assert ids[0] not in built and ids[5] not in built and ids[1] in built


def _tsv(tmp_path, rows: list[bytes]) -> str:
  path = str(tmp_path / 'feats.tsv')
  with open(path, 'wb') as f:
    f.write(b''.join(r + b'\n' for r in rows))
  return path


def _row(image_id: str) -> bytes:
  import numpy as np  # pylint: disable=import-outside-toplevel

  rf = formats.RegionFeatures(
      image_id, 100, 50, np.array([[0, 0, 10, 10]], np.float32), np.ones((1, 8), np.float32)
  )
  return formats.format_tsv_row(rf).encode('ascii')


@pytest.mark.parametrize(
    'corrupt, kind, fragment',
    [
        # A base64 character replaced: silently dropped before, shifting floats.
        (lambda row: row[:-6] + b'*' + row[-5:], 'malformed_features', 'cannot decode row'),
        # A line cut short (a crash while writing).
        (lambda row: row[:-7], 'malformed_features', 'cannot decode row'),
        # A non-ASCII byte (was a bare UnicodeDecodeError).
        (lambda row: row[:-6] + b'\xc3\xa9' + row[-4:], 'bad_encoding', 'byte 0xc3 at column'),
    ],
    ids=['bad_base64_char', 'cut_short', 'non_ascii_byte'],
)
def test_corrupted_tsv_row_names_file_and_line(tmp_path, corrupt, kind, fragment):
  path = _tsv(tmp_path, [_row('1'), corrupt(_row('2')), _row('3')])
  with formats.FeatureStore(path) as store:
    assert store.get('1')[0].num_boxes == 1 and store.get('3')[0].num_boxes == 1
    with pytest.raises(formats.BadInputError) as err:
      store.get('2')
  assert err.value.kind == kind and str(err.value).startswith(f'{path}:2: ')
  assert fragment in str(err.value)
  with pytest.raises(formats.BadInputError, match=rf'{path}:2: '):
    list(formats.iter_tsv(path))


def test_corrupted_tsv_line_in_a_build_is_named_and_skipped(tmp_path):
  data = str(tmp_path / 'data')
  synthetic.generate(data, 'tiny', feature_format='tsv', progress=False)
  tsvs = sorted(Path(data, 'features').glob('*.tsv'))
  first_id = tsvs[0].read_bytes().split(b'\t', 1)[0].decode()
  # Cut the first row of the first TSV in the middle of its features.
  _edit_bytes(str(tsvs[0]), lambda raw: raw[: raw.index(b'\n') - 9] + raw[raw.index(b'\n') :])
  split = next(s for s in formats.SPLITS if first_id in _ids(data, s))
  with pytest.raises(formats.BadInputError, match=rf'{tsvs[0]}:1: image {first_id}: cannot decode'):
    _build(data, str(tmp_path / 'out'))
  report = _build(data, str(tmp_path / 'out2'), skip_bad=True)
  assert report['splits'][split]['by_kind'] == {'malformed_features': 1}


# ----------------------------------------------------------------------------
# 2. An empty split.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('content', [b'', b'\n\n  \n'], ids=['zero_bytes', 'blank_lines'])
def test_empty_split_is_not_built_and_the_others_are(data, tmp_path, content):
  _edit_bytes(_ann_path(data, 'dev'), lambda raw: content)
  out = str(tmp_path / 'out')
  report = _build(data, out)
  assert set(report['splits']) == {'train', 'gallery', 'test'}
  assert report['empty_splits'] == {
      'dev': f'{_ann_path(data, "dev")} holds no sample (empty, or blank lines only)'
  }
  assert set(tfds.data_source('product1m/float16', data_dir=out)) == {'train', 'gallery', 'test'}
  # The command says so too.
  proc = run_module(
      BUILD,
      '--data_dir',
      data,
      '--out',
      tmp_path / 'cli',
      '--max_regions',
      8,
      '--vocab',
      helpers.build_vocab(),
  )
  assert proc.returncode == 0 and 'dev: not built, ' in proc.stderr, proc.stderr


def test_split_of_only_bad_samples_is_not_built_with_skip_bad(data, tmp_path):
  dev = _ann_path(data, 'dev')
  for item in _ids(data, 'dev'):
    os.remove(os.path.join(data, 'features', f'{item}.npz'))
  with pytest.raises(formats.BadInputError, match=rf'{dev}:1: image .* has no region features'):
    _build(data, str(tmp_path / 'out'))
  assert _no_dataset_left(str(tmp_path / 'out'))
  report = _build(data, str(tmp_path / 'out2'), skip_bad=True)
  assert 'dev' not in report['splits']
  assert report['empty_splits']['dev'].startswith(f'{dev}: every sample is bad and was skipped')
  assert f'missing_features: {TINY.num_dev}' in report['empty_splits']['dev']


def test_all_splits_empty_is_an_error(tmp_path):
  data = tmp_path / 'data'
  (data / 'features').mkdir(parents=True)
  import numpy as np  # pylint: disable=import-outside-toplevel

  rf = formats.RegionFeatures('1', 10, 10, np.array([[0, 0, 5, 5]], np.float32), np.ones((1, 4)))
  formats.write_npz(str(data / 'features' / '1.npz'), rf)
  for split in ('gallery', 'dev'):
    (data / formats.annotation_filename(split)).write_text('\n')
  out = str(tmp_path / 'out')
  with pytest.raises(ValueError, match='no annotation file holds a readable sample'):
    helpers.build_dataset(str(data), out, progress=False)
  with pytest.raises(ValueError, match='no split has a usable sample'):
    helpers.build_dataset(str(data), out, feature_dim=4, progress=False)
  assert _no_dataset_left(out)


def test_ground_truth_of_one_split_needs_only_its_files(tmp_path):
  gt = tmp_path / 'gt'
  gt.mkdir()
  (gt / metrics.GALLERY_FILE).write_text('g1#####t#####u#####v#####A\n')
  (gt / metrics.DEV_FILE).write_text('q1#####t#####u#####v#####A#;#B\n')
  labels = metrics.read_ground_truth(gt, 'dev')
  assert labels.query_labels == {'q1': ['A', 'B']} and labels.gallery_labels == {'g1': 'A'}
  (gt / metrics.DEV_FILE).write_text('\n')
  with pytest.raises(ValueError, match=rf'the dev query file {gt / metrics.DEV_FILE} holds no'):
    metrics.read_ground_truth(gt, 'dev')
  (gt / metrics.GALLERY_FILE).write_text('')
  with pytest.raises(ValueError, match=rf'the gallery file {gt / metrics.GALLERY_FILE} holds no'):
    metrics.read_ground_truth(gt, 'dev')


# ----------------------------------------------------------------------------
# 3. One annotation reader: byte-order mark and blank lines, the same everywhere.
# ----------------------------------------------------------------------------


def test_bom_and_blank_lines_read_the_same_by_build_evaluator_and_metrics(data, tmp_path):
  ids = {s: _ids(data, s) for s in ('gallery', 'dev')}
  for split in ('gallery', 'dev'):
    # A BOM at the start, a blank line inside, a blank (CRLF) line at the end.
    _edit_bytes(
        _ann_path(data, split),
        lambda raw: BOM + raw.replace(b'\n', b'\n\n', 1) + b'\r\n',
    )
  out = str(tmp_path / 'out')
  report = _build(data, out)
  sources = tfds.data_source('product1m/float16', data_dir=out)
  for split in ('gallery', 'dev'):
    assert report['splits'][split]['examples'] == len(ids[split])
    assert [sources[split][i]['item_id'].decode() for i in range(len(ids[split]))] == ids[split]
  gt = metrics.read_ground_truth(data, 'dev')  # the evaluator's reader
  assert list(gt.gallery_labels) == ids['gallery'] and list(gt.query_labels) == ids['dev']
  ranked = tmp_path / metrics.RANKED_FILE
  metrics.write_ranked_lists(ranked, {q: ids['gallery'][:10] for q in ids['dev']})
  _edit_bytes(str(ranked), lambda raw: BOM + raw)
  rc, out_text, err = _score(data, ranked, split='dev')
  assert rc == 0 and 'warning' not in err, err  # the BOM did not make an unknown query


def test_non_utf8_instance_sidecar_names_file_and_line(tmp_path):
  path = tmp_path / formats.instances_filename('dev')
  good = formats.format_instances('q1', [formats.Instance('A', (0, 1))])
  path.write_bytes(BOM + good.encode() + b'\n' + b'{"item_id": "q\xff"}\n')
  with pytest.raises(formats.BadInputError, match=rf'{path}:2: byte 0xff at column 15 '):
    formats.read_instances(str(path))
  path.write_bytes(BOM + good.encode() + b'\n\n')
  assert list(formats.read_instances(str(path))) == ['q1']


def test_bom_inside_a_file_is_an_error_naming_the_line(tmp_path):
  path = tmp_path / 'ann.txt'
  path.write_bytes(b'1#####t#####u#####v#####A\n' + BOM + b'2#####t#####u#####v#####A\n')
  with pytest.raises(formats.BadInputError, match=r'ann\.txt:2: .*unprintable item_id'):
    list(formats.read_annotations(str(path)))


def test_real_dev_file_with_bom_and_trailing_blank_line(shared, tmp_path):
  real = shared / 'product1m' / metrics.DEV_FILE
  if not real.is_file():
    pytest.skip(f'{real} is not present')
  gt = tmp_path / 'gt'
  gt.mkdir()
  (gt / metrics.DEV_FILE).write_bytes(BOM + real.read_bytes() + b'\n\n')
  (gt / metrics.GALLERY_FILE).write_text('g1#####t#####u#####v#####AHC 黄金水\n')
  got = metrics.read_ground_truth(gt, 'dev')
  want = {a.item_id: list(a.labels) for _, a in formats.read_annotations(str(real))}
  assert got.query_labels == want and len(want) == 2673


# ----------------------------------------------------------------------------
# 4. The metrics command: unknown query ids, long lists, repeated ids.
# ----------------------------------------------------------------------------


def _score(gt_dir, ranked, **options) -> tuple[int, str, str]:
  """What the metrics command does (`metrics.run`, the command's exit status and output), in
  this process; its command line is tested in tests/test_cli.py and below."""
  import contextlib  # pylint: disable=import-outside-toplevel
  import io  # pylint: disable=import-outside-toplevel

  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    rc = metrics.run(str(gt_dir), str(ranked), **options)
  return rc, out.getvalue(), err.getvalue()


GALLERY = {'a1': 'A', 'a2': 'A', 'b1': 'B', **{f'x{i}': 'X' for i in range(120)}}


@pytest.fixture
def gt_dir(tmp_path) -> Path:
  gt = tmp_path / 'gt'
  gt.mkdir()
  line = lambda i, labels: f'{i}#####t#####u#####v#####{"#;#".join(labels)}\n'
  (gt / metrics.GALLERY_FILE).write_text(''.join(line(g, [l]) for g, l in GALLERY.items()))
  (gt / metrics.DEV_FILE).write_text(line('q1', ['A']) + line('q2', ['A', 'B']))
  (gt / metrics.TEST_FILE).write_text('')
  return gt


def _official(gt_dir: Path, ranked: Path) -> tuple[dict, list[str]]:
  return official_eval.evaluate(str(gt_dir), ranked.read_text().splitlines(keepends=True))


def test_unknown_query_id_scores_zero_with_a_counted_warning(gt_dir, tmp_path):
  ranked = tmp_path / metrics.RANKED_FILE
  ranked.write_text('q1,a1,x1,zz\nnope,a1\nq2,b1,a1\nzilch,x2\n')
  rc, out, err = _score(gt_dir, ranked)
  assert rc == 0
  assert '1 ranked id(s) are not gallery ids' in err  # 'zz': a miss, as upstream
  assert '2 of 4 query id(s) are absent from product1m_test_ossurl_v2.txt, ' in err
  assert "'nope' (line 2), 'zilch' (line 4)" in err and 'Traceback' not in err
  official, printed = _official(gt_dir, ranked)
  assert out.splitlines()[: len(printed)] == printed  # the ids printed as upstream does
  assert f'mAP: {official["top10"]["mAP"]} ' in out  # and the same numbers
  rc, out, err = _score(gt_dir, ranked, strict=True)
  assert rc == 1 and err.startswith(f'error: {ranked} refused (--strict): 2 of 4 query id(s)')
  assert out == ''


def test_ranked_list_over_100_ids_warns_and_ignores_the_rest(gt_dir, tmp_path):
  ranked = tmp_path / metrics.RANKED_FILE
  long = [f'x{i}' for i in range(110)] + ['a1']  # a1 at rank 111: never counted
  ranked.write_text('q1,a2\n' + ','.join(['q2', *long]) + '\n')
  rc, out, err = _score(gt_dir, ranked)
  assert rc == 0 and "1 ranked list(s) hold more than 100 ids, e.g. 'q2' (111 ids, line 2)" in err
  official, _ = _official(gt_dir, ranked)
  assert f'mAP: {official["top100"]["mAP"]} ' in out
  assert _score(gt_dir, ranked, strict=True)[0] == 1


def test_repeated_gallery_id_in_a_list_is_refused(gt_dir, tmp_path):
  ranked = tmp_path / metrics.RANKED_FILE
  ranked.write_text('q1,a1,x1\nq2,a1,x3,a1,b1\n')
  rc, out, err = _score(gt_dir, ranked)
  assert rc == 1 and out == ''
  assert err == (
      f"error: {ranked}:2: query 'q2' ranks gallery id 'a1' twice (positions 1 and 3); "
      'each copy would count as a hit, expected distinct ids\n'
  )


@pytest.mark.parametrize(
    'content, fragment',
    [
        ('q1,a1\n\nq2,b1\n', ':2: malformed ranked-list line (no query id; a blank line'),
        ('q1,a1\nq2,b1\n\n', ':3: malformed ranked-list line (no query id; a blank line'),
        ('q1,a1\nq1,b1\n', ":2: query id 'q1' appears twice"),
    ],
    ids=['blank_line_inside', 'trailing_blank_line', 'repeated_query'],
)
def test_malformed_ranked_file_is_refused_naming_the_line(gt_dir, tmp_path, content, fragment):
  ranked = tmp_path / metrics.RANKED_FILE
  ranked.write_text(content)
  rc, _, err = _score(gt_dir, ranked)
  assert rc == 1 and err.startswith(f'error: {ranked}{fragment}'), err


def test_ranked_file_with_non_utf8_byte_is_refused(gt_dir, tmp_path):
  ranked = tmp_path / metrics.RANKED_FILE
  ranked.write_bytes(b'q1,a1\nq2,b\xff1\n')
  rc, _, err = _score(gt_dir, ranked)
  assert rc == 1 and err.startswith(f'error: {ranked}:2: byte 0xff at column 5 is not valid utf-8')


def test_missing_ground_truth_file_is_refused(gt_dir, tmp_path):
  ranked = tmp_path / metrics.RANKED_FILE
  ranked.write_text('q1,a1\n')
  (gt_dir / metrics.TEST_FILE).unlink()
  rc, _, err = _score(gt_dir, ranked)
  assert rc == 1 and f'missing: {gt_dir / metrics.TEST_FILE}' in err
  # With --split dev the test file is not needed.
  assert _score(gt_dir, ranked, split='dev')[0] == 0


def test_command_exits_1_without_a_traceback(gt_dir, tmp_path):
  """The real `python -m` command, as a user runs it."""
  ranked = tmp_path / metrics.RANKED_FILE
  ranked.write_text('q1,a1,a1\n')
  env = {**os.environ, 'PYTHONPATH': str(REPO)}
  proc = subprocess.run(
      [sys.executable, '-m', 'capture_jax.retrieval.metrics', '--gt_dir', str(gt_dir)]
      + ['--ranked', str(ranked)],
      capture_output=True,
      text=True,
      env=env,
      timeout=120,
  )
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr
  assert f"{ranked}:1: query 'q1' ranks gallery id 'a1' twice" in proc.stderr


def test_build_command_refuses_bad_input_with_one_line_and_status_1(data, tmp_path):
  item = _ids(data, 'dev')[0]
  npz = os.path.join(data, 'features', f'{item}.npz')
  _edit_bytes(npz, lambda raw: raw[:50])
  out = str(tmp_path / 'out')
  proc = run_module(BUILD, '--data_dir', data, '--out', out, '--vocab', helpers.build_vocab())
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr
  err = proc.stderr.strip().splitlines()
  assert err[-1].startswith(f'error: {_ann_path(data, "dev")}:1: {npz}: image {item}: cannot read')
  assert _no_dataset_left(out)
  proc = run_module(
      BUILD, '--data_dir', data, '--out', out, '--skip_bad', '--vocab', helpers.build_vocab()
  )
  assert proc.returncode == 0, proc.stderr
  want = f"dev: {TINY.num_dev - 1} examples, 1 bad skipped {{'malformed_features': 1}}"
  assert want in proc.stderr
