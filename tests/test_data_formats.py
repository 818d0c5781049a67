"""Annotation and region-feature formats: round trips, encodings, and bad input."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from capture_jax.data import formats


def _rf(image_id='42', n=3, f=8, w=100, h=50, seed=0):
  rng = np.random.default_rng(seed)
  boxes = np.array([[10, 5, 60, 45], [0, 0, 100, 50], [20, 10, 30, 20]][:n], np.float32)
  return formats.RegionFeatures(image_id, w, h, boxes, rng.random((n, f)).astype(np.float32))


# ---------------------------------------------------------------- annotations


def test_annotation_round_trip(tmp_path):
  anns = [
      formats.Annotation(
          '1',
          'AHC黄金面霜 正品',
          'http://a',
          'http://b',
          ('AHC 黄金面霜', 'AHC 黄金眼霜', 'AHC 黄金眼霜'),
      ),
      formats.Annotation('2', 'title two', 'u', 'v', ()),
  ]
  path = tmp_path / formats.annotation_filename('train')
  assert formats.write_annotations(str(path), anns) == 2
  lines = path.read_text(encoding='utf-8').splitlines()
  assert lines[0] == (
      '1#####AHC黄金面霜 正品#####http://a#####http://b#####'
      'AHC 黄金面霜#;#AHC 黄金眼霜#;#AHC 黄金眼霜'
  )
  back = [a for _, a in formats.read_annotations(str(path))]
  assert back == anns  # duplicate labels kept, in order


def test_official_file_names():
  assert formats.annotation_filename('gallery') == 'product1m_gallery_ossurl_v2.txt'
  assert formats.annotation_filename('dev') == 'product1m_dev_ossurl_v2.txt'
  with pytest.raises(ValueError):
    formats.annotation_filename('val')


@pytest.mark.parametrize(
    'line, kind, fragment',
    [
        ('1#####t#####u#####v', 'malformed_line', 'expected 5 fields'),
        ('1#####t#####u#####v#####a#####b', 'malformed_line', 'found 6'),
        ('1##### #####u#####v#####AHC 水', 'empty_title', 'empty title'),
        ('#####t#####u#####v#####AHC 水', 'malformed_line', 'item_id'),
        ('1#####t#####u#####v#####AHC 水#;##;#AHC 乳', 'malformed_line', 'empty label'),
        ('1#####t#####u#####v#####', 'missing_labels', 'no label'),
    ],
)
def test_bad_annotation_lines_name_file_and_line(tmp_path, line, kind, fragment):
  path = tmp_path / formats.annotation_filename('dev')
  path.write_text('7#####ok#####u#####v#####AHC 水\n\n' + line + '\n', encoding='utf-8')
  with pytest.raises(formats.BadInputError) as err:
    list(formats.read_annotations(str(path)))
  assert err.value.kind == kind
  assert f'{path}:3' in str(err.value) and fragment in str(err.value)
  # skip_bad: the good line survives, the bad one is counted.
  counter = formats.BadInputCounter(skip_bad=True)
  kept = list(formats.read_annotations(str(path), counter=counter))
  assert [a.item_id for _, a in kept] == ['7'] and counter.counts == {kind: 1}
  assert 'skipped 1 bad sample' in counter.summary()


def test_duplicate_item_id_is_an_error(tmp_path):
  path = tmp_path / 'x.txt'
  path.write_text('1#####a#####u#####v#####\n1#####b#####u#####v#####\n', encoding='utf-8')
  with pytest.raises(formats.BadInputError, match=r'x.txt:2: item_id 1 appears twice'):
    list(formats.read_annotations(str(path)))


def test_train_lines_need_no_labels(tmp_path):
  path = tmp_path / formats.annotation_filename('train')
  path.write_text('1#####a#####u#####v#####\n', encoding='utf-8')
  assert [a.labels for _, a in formats.read_annotations(str(path))] == [()]


def test_real_dev_file_parses(shared):
  path = shared / 'product1m' / formats.annotation_filename('dev')
  if not path.exists():
    pytest.skip(f'{path} is not present')
  anns = [a for _, a in formats.read_annotations(str(path))]
  assert len(anns) == 2673
  assert len({l for a in anns for l in a.labels}) == 295
  counts = collections.Counter(len(a.labels) for a in anns)
  assert min(counts) == 1 and max(counts) == 7
  assert all(a.title and a.url.startswith('http') for a in anns)


# ---------------------------------------------------------------- boxes and global token


def test_encode_boxes():
  loc = formats.encode_boxes(np.array([[10, 5, 60, 45]], np.float32), 100, 50)
  np.testing.assert_allclose(loc, [[0.1, 0.1, 0.6, 0.9, 50 * 40 / 5000]], rtol=1e-6)
  # Batched, with per-image sizes.
  boxes = np.array([[[0, 0, 20, 10]], [[0, 0, 20, 10]]], np.float32)
  loc = formats.encode_boxes(boxes, np.array([[20.0], [40.0]]), np.array([[10.0], [10.0]]))
  np.testing.assert_allclose(loc[:, 0], [[0, 0, 1, 1, 1], [0, 0, 0.5, 1, 0.5]])


def test_global_token_is_mean_of_valid_regions():
  feat = np.zeros((2, 3, 4), np.float32)
  feat[0, :2] = [[1, 2, 3, 4], [3, 4, 5, 6]]
  feat[1, :1] = [[5, 5, 5, 5]]
  mask = np.array([[1, 1, 0], [1, 0, 0]], np.int32)
  loc = np.random.default_rng(0).random((2, 3, 5)).astype(np.float32)
  f, l, m = formats.add_global_token(feat, loc, mask)
  assert f.shape == (2, 4, 4) and l.shape == (2, 4, 5) and m.shape == (2, 4)
  np.testing.assert_allclose(f[:, 0], [[2, 3, 4, 5], [5, 5, 5, 5]])
  np.testing.assert_array_equal(f[:, 1:], feat)
  np.testing.assert_array_equal(l[:, 0], [[0, 0, 1, 1, 1]] * 2)
  np.testing.assert_array_equal(m, [[1, 1, 1, 0], [1, 1, 0, 0]])


# ---------------------------------------------------------------- region features


def test_npz_and_tsv_round_trip(tmp_path):
  rf = _rf()
  rf.cls_prob = np.full((3, 5), 0.2, np.float32)
  formats.write_npz(str(tmp_path / '42.npz'), rf)
  back = formats.read_npz(str(tmp_path / '42.npz'))
  assert (back.image_id, back.image_w, back.image_h) == ('42', 100, 50)
  np.testing.assert_array_equal(back.features, rf.features)
  np.testing.assert_array_equal(back.boxes, rf.boxes)
  np.testing.assert_array_equal(back.cls_prob, rf.cls_prob)
  line = formats.format_tsv_row(rf)
  assert line.split('\t')[:4] == ['42', '100', '50', '3']
  back = formats.parse_tsv_row(line)
  np.testing.assert_array_equal(back.features, rf.features)
  np.testing.assert_array_equal(back.boxes, rf.boxes)


def test_feature_store_over_tsv_and_npz(tmp_path):
  (tmp_path / 'feats').mkdir()
  with open(tmp_path / 'feats' / 'a.tsv', 'w') as f:
    for i in range(3):
      f.write(formats.format_tsv_row(_rf(str(i), seed=i)) + '\n')
  formats.write_npz(str(tmp_path / 'feats' / '9.npz'), _rf('9', seed=9))
  with formats.FeatureStore(str(tmp_path / 'feats')) as store:
    assert len(store) == 4 and '2' in store and '9' in store and '5' not in store
    np.testing.assert_array_equal(store.get('1')[0].features, _rf('1', seed=1).features)
    np.testing.assert_array_equal(store.get('9')[0].features, _rf('9', seed=9).features)
    with pytest.raises(formats.BadInputError, match='image 5 has no region features'):
      store.get('5')


def test_malformed_tsv_row_names_file_and_line(tmp_path):
  path = tmp_path / 'f.tsv'
  path.write_text(formats.format_tsv_row(_rf('1')) + '\n' + '2\t100\t50\n')
  with pytest.raises(formats.BadInputError, match=r'f.tsv:2: expected 6 tab-separated'):
    list(formats.iter_tsv(str(path)))


@pytest.mark.parametrize(
    'corrupt, kind, fragment',
    [
        (
            lambda rf: setattr(rf, 'features', rf.features[:, :7]),
            'wrong_width',
            'width 7, expected 8',
        ),
        (lambda rf: rf.features.__setitem__((1, 2), np.nan), 'nonfinite_features', 'region 1'),
        (lambda rf: rf.features.__setitem__((0, 0), np.inf), 'nonfinite_features', 'NaN or inf'),
        (lambda rf: rf.boxes.__setitem__((2, 2), 20.0), 'zero_area_box', 'box 2'),
        (lambda rf: rf.boxes.__setitem__((1, 2), 130.0), 'box_outside_image', 'box 1'),
        (lambda rf: rf.boxes.__setitem__((0, 1), -9.0), 'box_outside_image', 'box 0'),
    ],
)
def test_bad_regions_name_image_and_problem(corrupt, kind, fragment):
  rf = _rf()
  corrupt(rf)
  with pytest.raises(formats.BadInputError) as err:
    formats.validate_regions(rf, feature_dim=8, max_regions=36, source='feats/x.tsv')
  assert err.value.kind == kind
  assert 'feats/x.tsv: image 42' in str(err.value) and fragment in str(err.value)


def test_truncation_to_max_regions_is_reported():
  rf, truncated = formats.validate_regions(_rf(), feature_dim=8, max_regions=2, source='s')
  assert truncated and rf.num_boxes == 2 and rf.features.shape == (2, 8)
  _, truncated = formats.validate_regions(_rf(), feature_dim=8, max_regions=3, source='s')
  assert not truncated


def test_boxes_on_the_border_are_accepted_and_clipped():
  rf = _rf()
  rf.boxes[1] = [-0.5, 0, 100.5, 50]  # extractors that clip to W or W - 1
  out, _ = formats.validate_regions(rf, feature_dim=8, max_regions=36, source='s')
  assert out.boxes[1].tolist() == [0, 0, 100, 50]


def test_instances_sidecar_round_trip(tmp_path):
  path = tmp_path / formats.instances_filename('dev')
  insts = [formats.Instance('AHC 水', (0, 3)), formats.Instance('AHC 乳', (1,))]
  path.write_text(formats.format_instances('5', insts) + '\n', encoding='utf-8')
  assert formats.read_instances(str(path)) == {'5': insts}
  path.write_text('{"item_id": "5"}\n', encoding='utf-8')
  with pytest.raises(formats.BadInputError, match=':1: expected'):
    formats.read_instances(str(path))
