"""The synthetic Product1M world: formats, properties, determinism, difficulty."""

from __future__ import annotations

import collections
import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from capture_jax.retrieval import calibration as baselines
from capture_jax.data import boxes as boxes_lib
from capture_jax.data import formats
from capture_jax.data import synthetic
from capture_jax.data.synthetic import samples as samples_lib

REPO = Path(__file__).resolve().parents[1]


def _command(*args: str) -> subprocess.CompletedProcess:
  """Runs `python -m capture_jax.data.synthetic ARGS` (JAX on CPU)."""
  return subprocess.run(
      [sys.executable, '-m', 'capture_jax.data.synthetic', *args],
      capture_output=True,
      text=True,
      cwd=REPO,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
      timeout=300,
  )


def _refused(proc: subprocess.CompletedProcess) -> str:
  """The one `error:` line of a refused command (exit status 1, no traceback)."""
  assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error: ')]
  assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0], proc.stderr[-3000:]
  return errors[0]


def _read(root, split):
  return [
      a for _, a in formats.read_annotations(os.path.join(root, formats.annotation_filename(split)))
  ]


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('tiny'))
  synthetic.generate(root, 'tiny', seed=3, progress=False)
  return root


def test_writes_the_official_files(tiny):
  for split in formats.SPLITS:
    assert os.path.exists(os.path.join(tiny, formats.annotation_filename(split)))
    assert os.path.exists(os.path.join(tiny, 'features', f'{split}.tsv'))
  for split in formats.LABELLED_SPLITS:
    assert os.path.exists(os.path.join(tiny, formats.instances_filename(split)))
  p = synthetic.PRESETS['tiny']
  assert len(_read(tiny, 'train')) == p.num_train
  assert len(_read(tiny, 'dev')) == p.num_dev and len(_read(tiny, 'test')) == p.num_test


def test_split_properties(tiny):
  p = synthetic.PRESETS['tiny']
  train, gallery = _read(tiny, 'train'), _read(tiny, 'gallery')
  assert all(a.labels == () for a in train)  # training pairs carry no labels
  assert all(len(a.labels) == 1 for a in gallery)  # single-product samples
  per_product = collections.Counter(a.labels[0] for a in gallery)
  assert set(per_product.values()) == {p.gallery_per_product}
  products = set(per_product)
  for split in formats.QUERY_SPLITS:
    for a in _read(tiny, split):
      assert 2 <= len(a.labels) <= 7 and set(a.labels) <= products
      assert len({l.split(' ')[0] for l in a.labels}) == 1  # one brand per query
  ids = [a.item_id for s in formats.SPLITS for a in _read(tiny, s)]
  assert len(ids) == len(set(ids)) and all(len(i) == 12 and i.isdigit() for i in ids)


def test_regions_and_instance_sidecar(tiny):
  p = synthetic.PRESETS['tiny']
  with formats.FeatureStore(os.path.join(tiny, 'features')) as store:
    for split in ('gallery', 'dev'):
      sidecar = formats.read_instances(os.path.join(tiny, formats.instances_filename(split)))
      background = 0
      for a in _read(tiny, split):
        rf, source = store.get(a.item_id)
        formats.validate_regions(
            rf, feature_dim=p.feature_dim, max_regions=p.max_regions, source=source
        )  # valid boxes, finite, right width
        assert (rf.features >= 0).all() and rf.num_boxes <= p.max_regions
        insts = sidecar[a.item_id]
        assert [i.label for i in insts] == list(a.labels)
        owned = [r for i in insts for r in i.regions]
        assert all(i.regions for i in insts)  # every instance is seen
        assert len(owned) == len(set(owned)) and max(owned) < rf.num_boxes
        background += rf.num_boxes - len(owned)
      assert background > 0  # clutter regions belong to no instance


def test_products_of_a_brand_look_alike(tiny):
  """Same product > same brand > other brands, in mean-feature cosine."""
  gal = baselines.load_split(tiny, 'gallery')
  sim = gal.mean_region @ gal.mean_region.T  # rows are L2-normalised: cosines
  label = [l[0] for l in gal.labels]
  brand = [l.split(' ')[0] for l in label]
  same_p, same_b, other = [], [], []
  for i in range(len(label)):
    for j in range(i + 1, len(label)):
      (same_p if label[i] == label[j] else same_b if brand[i] == brand[j] else other).append(
          sim[i, j]
      )
  assert np.mean(same_p) > np.mean(same_b) > np.mean(other)


def test_deterministic_by_seed(tiny, tmp_path):
  again = tmp_path / 'again'
  synthetic.generate(str(again), 'tiny', seed=3, progress=False)
  names = sorted(os.listdir(tiny))
  match, mismatch, errors = filecmp.cmpfiles(
      tiny, str(again), [n for n in names if n != 'features'], shallow=False
  )
  assert not mismatch and not errors
  for split in formats.SPLITS:
    assert filecmp.cmp(
        os.path.join(tiny, 'features', f'{split}.tsv'),
        str(again / 'features' / f'{split}.tsv'),
        shallow=False,
    )
  other = tmp_path / 'other'
  synthetic.generate(str(other), 'tiny', seed=4, progress=False, splits=['dev'])
  assert _read(str(other), 'dev') != _read(tiny, 'dev')


def test_cli_npz_and_feature_dim(tmp_path):
  out = tmp_path / 'npz'
  proc = _command(
      '--out',
      str(out),
      '--preset',
      'tiny',
      '--seed',
      '3',
      '--feature_format',
      'npz',
      '--feature_dim',
      '16',
      '--splits',
      'gallery',
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stderr.splitlines()[-1].startswith(f'wrote {out}: '), proc.stderr[-3000:]
  gallery = _read(str(out), 'gallery')
  rf = formats.read_npz(str(out / 'features' / f'{gallery[0].item_id}.npz'))
  assert rf.features.shape[1] == 16
  assert json.loads((out / 'synthetic_world.json').read_text())['feature_dim'] == 16


def test_cli_refusals(tmp_path):
  """Refused input is one `error:` line (its --helpshort: tests/test_cli.py)."""
  out = tmp_path / 'refused'
  assert 'needs annotations' in _refused(_command('--out', str(out), '--heldout_fraction', '0.5'))
  missing = tmp_path / 'missing.txt'
  assert str(missing) in _refused(_command('--out', str(out), '--annotations', str(missing)))
  assert "unknown split(s) ['bogus']" in _refused(
      _command('--out', str(out), '--splits', 'dev,bogus')
  )
  assert '--out' in _refused(_command('--preset', 'tiny'))  # required
  assert not out.exists()  # nothing written by a refused run


def test_baselines_between_random_and_perfect(tmp_path):
  """On the demo world (gallery + dev), text-only and visual-only baselines are
  clearly above random and clearly below perfect, and combining the two
  modalities beats both: the world rewards a multimodal model."""
  root = str(tmp_path / 'demo')
  synthetic.generate(root, 'demo', splits=['gallery', 'dev'], progress=False)
  res = baselines.evaluate_baselines(root, 'dev', max_regions=16)
  assert res['random'] < 0.05
  for name in ('tfidf', 'mean_region'):
    assert max(0.25, 5 * res['random']) < res[name] < 0.75, (name, res)
  assert res['fusion'] > max(res['tfidf'], res['mean_region']) + 0.03, res


def test_real_annotations_drive_the_world(shared, tmp_path):
  path = shared / 'product1m' / formats.annotation_filename('dev')
  if not path.exists():
    pytest.skip(f'{path} is not present')
  root = str(tmp_path / 'real')
  summary = synthetic.generate(
      root, 'tiny', annotations=str(path), progress=False, splits=['gallery', 'dev', 'test']
  )
  real = [a for _, a in formats.read_annotations(str(path))]
  dev = _read(root, 'dev')
  assert dev == real  # real ids, titles and label sets, in order
  labels = {l for a in real for l in a.labels}
  assert summary['num_products'] == 295 and summary['num_brands'] == 34
  assert {a.labels[0] for a in _read(root, 'gallery')} == labels
  assert all(set(a.labels) <= labels for a in _read(root, 'test'))
  sidecar = formats.read_instances(os.path.join(root, formats.instances_filename('dev')))
  assert [i.label for i in sidecar[real[0].item_id]] == list(real[0].labels)


def test_refuses_to_overwrite_files_it_did_not_write(tmp_path):
  out = tmp_path / 'world'
  out.mkdir()
  real = out / formats.annotation_filename('dev')
  real.write_text('a real annotation file\n', encoding='utf-8')
  args = ['--out', str(out), '--preset', 'tiny', '--splits', 'gallery,dev']
  assert f'{real} exists and was not written by the synthetic' in _refused(_command(*args))
  with pytest.raises(FileExistsError, match=f'{real} exists and was not written by the synthetic'):
    synthetic.generate(str(out), 'tiny', splits=['gallery', 'dev'], progress=False)
  assert real.read_text(encoding='utf-8') == 'a real annotation file\n'  # untouched
  assert not (out / formats.annotation_filename('gallery')).exists()  # nothing written
  assert _command(*args, '--overwrite').returncode == 0
  assert len(_read(str(out), 'dev')) == synthetic.PRESETS['tiny'].num_dev
  # Its own files it may rewrite (they are listed in synthetic_world.json) ...
  synthetic.generate(str(out), 'tiny', seed=1, splits=['dev'], progress=False)
  # ... but not a file someone put beside them since.
  (out / formats.instances_filename('test')).write_text('{}\n', encoding='utf-8')
  with pytest.raises(FileExistsError, match='instances_test.jsonl'):
    synthetic.generate(str(out), 'tiny', splits=['test'], progress=False)
  # npz features: a real feature file of an id the run would write is protected too.
  npz = tmp_path / 'npz'
  (npz / 'features').mkdir(parents=True)
  clash = npz / 'features' / f'{samples_lib.item_id_of("gallery", 0)}.npz'
  clash.write_bytes(b'real')
  with pytest.raises(FileExistsError, match=clash.name):
    synthetic.generate(str(npz), 'tiny', splits=['gallery'], feature_format='npz', progress=False)


def _demo_dev_samples(n=120):
  world = synthetic.make_world(synthetic.PRESETS['demo'], 0)
  return [synthetic.make_sample(world, 0, 'dev', i) for i in range(n)]


def test_regions_look_like_detector_output():
  """Duplicates around one object (IoU 0.5-0.9), part boxes inside it, boxes
  spanning two neighbours, touching / overlapping products, clutter of object
  size: the generator's detector model (`layout.render_regions`)."""
  dup = part = span = touching = 0
  clutter_area = []
  samples = _demo_dev_samples()
  for s in samples:
    b = s.regions.boxes
    assert len(b) <= synthetic.PRESETS['demo'].max_regions
    iou, inside = boxes_lib.iou_matrix(b), boxes_lib.containment_matrix(b)
    owner = -np.ones(len(b), int)
    for k, inst in enumerate(s.instances):
      owner[list(inst.regions)] = k
      r = list(inst.regions)
      obj = r[int(np.argmax(boxes_lib.box_areas(b[r])))]
      for i in r:
        if i != obj:
          dup += 0.5 <= iou[i, obj] <= 0.9 + 1e-6
          part += inside[i, obj] > 0.99 and iou[i, obj] < 0.5
    objects = [
        max(inst.regions, key=lambda i: boxes_lib.box_areas(b[[i]])[0]) for inst in s.instances
    ]
    for i in np.flatnonzero(owner < 0):
      covers = sum(inside[o, i] > 0.6 for o in objects)
      if covers >= 2:
        span += 1
      else:
        clutter_area.append(
            boxes_lib.box_areas(b[[i]])[0] / (s.regions.image_w * s.regions.image_h)
        )
    touching += any(iou[a, c] > 0 for a in objects for c in objects if a != c)
  assert dup > len(samples) and part > len(samples) / 2
  assert 0.15 * len(samples) < span < 0.5 * len(samples)
  assert touching > 0.2 * len(samples)
  assert np.median(clutter_area) > 0.02  # object-sized, not specks


def test_box_geometry_alone_is_clearly_below_the_oracle():
  """The training-free `boxes` proposer leaves a measurable gap to the sidecar."""
  from capture_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from capture_jax import instances  # pylint: disable=import-outside-toplevel

  c = config_lib.base_config()
  samples = _demo_dev_samples()
  props, truth, sizes = {}, {}, {}
  for s in samples:
    rf = s.regions
    rec = {'item_id': rf.image_id, 'image_w': rf.image_w, 'image_h': rf.image_h, 'boxes': rf.boxes}
    props[rf.image_id] = instances.propose_boxes(rec, c)
    truth[rf.image_id] = s.instances
    sizes[rf.image_id] = rf.num_boxes
  q = instances.proposal_quality(props, truth, sizes)
  oracle = instances.proposal_quality(truth, truth, sizes)
  assert oracle['recall'] == oracle['precision'] == 1.0 and oracle['background_assigned'] == 0
  assert q['recall'] < 0.95 and q['precision'] < 0.75 and q['background_assigned'] > 0.5, q


def _queries(ids):
  return [formats.Annotation(i, f'title {n}', labels=('a',)) for n, i in enumerate(ids)]


def test_heldout_split_is_disjoint_by_query_and_deterministic_by_seed():
  ids = [f'q{i}' for i in range(40)] + ['q3', 'q7']  # an id on two lines stays on one side
  queries = _queries(ids)
  dev, test = synthetic.heldout_split(queries, 0.5, seed=0)
  dev_ids, test_ids = {q.item_id for q in dev}, {q.item_id for q in test}
  assert not dev_ids & test_ids
  assert dev_ids | test_ids == set(ids) and len(dev) + len(test) == len(queries)
  assert len(test_ids) == 20  # half of the 40 distinct ids
  # Each side keeps the file's order.
  assert [q.title for q in dev] == sorted((q.title for q in dev), key=lambda t: int(t.split()[1]))
  assert synthetic.heldout_split(queries, 0.5, seed=0) == (dev, test)
  other_dev, _ = synthetic.heldout_split(queries, 0.5, seed=1)
  assert {q.item_id for q in other_dev} != dev_ids
  assert len({q.item_id for q in synthetic.heldout_split(queries, 0.25, seed=0)[1]}) == 10
  for bad in (0.0, 1.0, 1.5):
    with pytest.raises(ValueError, match='heldout_fraction must be in'):
      synthetic.heldout_split(queries, bad, seed=0)
  with pytest.raises(ValueError, match='at least two query ids'):
    synthetic.heldout_split(_queries(['only', 'only']), 0.5, seed=0)


def test_heldout_real_titles_become_dev_and_test(shared, tmp_path):
  path = shared / 'product1m' / formats.annotation_filename('dev')
  if not path.exists():
    pytest.skip(f'{path} is not present')
  real = [a for _, a in formats.read_annotations(str(path))]

  def world(name, seed):
    root = str(tmp_path / name)
    summary = synthetic.generate(
        root,
        'tiny',
        seed=seed,
        annotations=str(path),
        heldout_fraction=0.5,
        progress=False,
        splits=['dev', 'test'],
    )
    return root, summary

  root, summary = world('a', 0)
  dev, test = _read(root, 'dev'), _read(root, 'test')
  assert summary['real_query_splits'] == ['dev', 'test']
  assert summary['counts'] == {'dev': len(dev), 'test': len(test)}
  assert {a.item_id for a in dev}.isdisjoint(a.item_id for a in test)
  assert abs(len(dev) - len(test)) <= 1 and len(dev) + len(test) == len(real)
  # Both are the real lines (ids, titles, label sets), each in the file's order.
  assert [a for a in real if a.item_id in {d.item_id for d in dev}] == dev
  assert [a for a in real if a.item_id in {t.item_id for t in test}] == test
  # Both get their regions and instance sidecars rendered from their labels.
  for split, lines in (('dev', dev), ('test', test)):
    sidecar = formats.read_instances(os.path.join(root, formats.instances_filename(split)))
    assert [i.label for i in sidecar[lines[0].item_id]] == list(lines[0].labels)
  again, _ = world('b', 0)
  assert _read(again, 'test') == test  # deterministic by seed
  other, _ = world('c', 1)
  assert _read(other, 'test') != test
  with pytest.raises(ValueError, match='needs annotations'):
    synthetic.generate(str(tmp_path / 'd'), 'tiny', heldout_fraction=0.5, progress=False)
