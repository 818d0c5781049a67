"""Product-instance proposals: pseudo-sample composition, the `boxes` rule, quality, the learned proposer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from capture_jax import config as config_lib
from capture_jax import instances
from capture_jax.data import formats
from capture_jax.instances import compose
from capture_jax.instances import geometry
from capture_jax.instances import model as model_lib
from capture_jax.instances import proposals as proposals_lib
from capture_jax.instances import trainer


def _config(feature_dim=8, max_regions=12):
  c = config_lib.base_config()
  c.data.feature_dim = feature_dim
  c.data.max_regions = max_regions
  c.instances.progress_bar = False
  return c


def _donor(rng, proto, n_product, n_clutter=0, w=400, h=300, item_id='d'):
  """A single-product record: a big object box, duplicates / parts inside it, clutter beside."""
  obj = np.array([50, 40, 300, 280], np.float32)
  boxes = [obj]
  for _ in range(n_product - 1):
    x0, y0 = rng.uniform(60, 150), rng.uniform(50, 140)
    boxes.append(
        np.array([x0, y0, x0 + rng.uniform(40, 140), y0 + rng.uniform(40, 130)], np.float32)
    )
  feats = [np.abs(proto + 0.1 * rng.normal(size=proto.shape)) for _ in range(n_product)]
  for _ in range(n_clutter):  # right of the object: outside its box
    boxes.append(np.array([320, 10, 395, 80], np.float32))
    feats.append(np.abs(rng.normal(size=proto.shape)) * 0.1)
  return {
      'item_id': item_id,
      'image_w': w,
      'image_h': h,
      'boxes': np.stack(boxes),
      'features': np.stack(feats).astype(np.float32),
  }


def _pool(config, num=12, seed=0, n_product=(1, 4), n_clutter=1):
  rng = np.random.default_rng(seed)
  protos = np.eye(config.data.feature_dim, dtype=np.float32) * 3
  recs = [
      _donor(
          rng,
          protos[i % len(protos)],
          int(rng.integers(n_product[0], n_product[1] + 1)),
          n_clutter,
          item_id=f'd{i}',
      )
      for i in range(num)
  ]
  return compose.make_pool(recs, config), recs


# --------------------------------------------------------------------------
# Composition of pseudo-samples.


def test_core_split_keeps_the_product_and_drops_what_is_beside_it():
  boxes = np.array(
      [[0, 0, 100, 100], [10, 10, 50, 50], [5, 5, 95, 98], [150, 0, 190, 40], [90, 90, 130, 130]],
      np.float32,
  )
  np.testing.assert_array_equal(compose.split_core(boxes), [True, True, True, False, False])


def test_compose_boxes_groups_and_counts_as_built():
  c = _config()
  pool, _ = _pool(c)
  rng = np.random.default_rng(1)
  for _ in range(50):
    s = compose.compose(pool, rng, c)
    n = len(s.group)
    assert n <= c.data.max_regions and s.features.shape == (n, c.data.feature_dim)
    assert (s.boxes[:, 0] >= 0).all() and (s.boxes[:, 1] >= 0).all()
    assert (s.boxes[:, 2] <= s.image_w).all() and (s.boxes[:, 3] <= s.image_h).all()
    assert (s.boxes[:, 2] > s.boxes[:, 0]).all() and (s.boxes[:, 3] > s.boxes[:, 1]).all()
    k = len(s.paste_boxes)
    assert c.instances.min_products <= k <= c.instances.max_products
    assert set(s.group.tolist()) - {-1} == set(range(k))  # every donor has regions
    for i in range(n):
      d, r = s.source[i]
      if s.group[i] < 0:  # clutter: from the bank, placed as built
        assert d == -1
        np.testing.assert_array_equal(s.features[i], pool.clutter_features[r])
      else:  # a donor region keeps its feature and lies in its paste box (up to clipping)
        np.testing.assert_array_equal(s.features[i], pool.features[d][r])
        p = s.paste_boxes[s.group[i]]
        assert s.boxes[i, 0] >= p[0] - 1 and s.boxes[i, 2] <= p[2] + 1
    # One donor per pseudo-instance.
    for g in range(k):
      assert len({int(d) for d in s.source[s.group == g, 0]}) == 1


def test_compose_loses_no_region_within_budget_and_shares_it_beyond():
  c = _config(max_regions=100)
  pool, _ = _pool(c)
  rng = np.random.default_rng(2)
  for _ in range(20):
    s = compose.compose(pool, rng, c)
    for g in range(len(s.paste_boxes)):
      d = int(s.source[s.group == g, 0][0])
      assert sorted(s.source[s.group == g, 1].tolist()) == list(range(len(pool.boxes[d])))
  small = _config(max_regions=5)
  pool, _ = _pool(small, n_product=(4, 4))
  for _ in range(20):
    s = compose.compose(pool, rng, small)
    assert len(s.group) <= 5
    sizes = np.bincount(s.group[s.group >= 0])
    assert sizes.min() >= 1 and sizes.max() - sizes.min() <= 1  # an even share each


def test_compose_is_deterministic_by_seed():
  c = _config()
  pool, _ = _pool(c)
  a, b = compose.make_batch(pool, 7, 3, c), compose.make_batch(pool, 7, 3, c)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  other = compose.make_batch(pool, 7, 4, c)
  assert not np.array_equal(a['boxes'], other['boxes'])
  assert a['features'].shape == (c.instances.batch_size, c.data.max_regions, c.data.feature_dim)
  assert ((a['group'] == compose.PAD) == ~a['mask']).all()


def test_donor_splits_refuse_training_pairs_and_queries():
  c = _config()
  c.instances.donor_splits = 'gallery,train'
  with pytest.raises(ValueError, match='train_is_single_product'):
    trainer.load_donor_records(c)
  c.instances.donor_splits = 'dev'
  with pytest.raises(ValueError, match='query splits'):
    trainer.load_donor_records(c)


# --------------------------------------------------------------------------
# The `boxes` rule.


def _record(boxes, w=1000, h=800, item_id='x'):
  boxes = np.asarray(boxes, np.float32)
  return {
      'item_id': item_id,
      'image_w': w,
      'image_h': h,
      'boxes': boxes,
      'features': np.ones((len(boxes), 4), np.float32),
  }


def _groups(props):
  return sorted(p.regions for p in props)


def test_boxes_groups_duplicates_and_parts_under_their_object():
  c = _config()
  rec = _record(
      [
          [100, 100, 400, 700],  # 0: product A
          [400, 100, 700, 700],  # 1: product B, touching A
          [110, 90, 390, 690],  # 2: duplicate of A (IoU ~0.9)
          [150, 200, 300, 400],  # 3: part of A
          [450, 300, 650, 650],  # 4: part of B
          [820, 50, 990, 250],  # 5: clutter beside them
      ]
  )
  assert _groups(geometry.propose_boxes(rec, c)) == [(0, 2, 3), (1, 4), (5,)]


def test_boxes_drops_specks_and_the_scene_box_and_scores_lone_boxes_lower():
  c = _config()
  rec = _record(
      [
          [0, 0, 1000, 800],  # the whole scene
          [100, 100, 400, 700],
          [120, 120, 380, 680],
          [700, 100, 900, 400],  # a lone box
          [950, 750, 960, 760],  # a speck
      ]
  )
  props = geometry.propose_boxes(rec, c)
  assert [p.regions for p in props] == [(1, 2), (3,)]
  assert props[0].score > props[1].score


def test_boxes_merges_neighbours_under_a_spanning_box():
  """The failure mode the synthetic world models: a box over two products swallows both."""
  c = _config()
  rec = _record([[100, 100, 400, 700], [400, 100, 700, 700], [100, 100, 700, 700]])
  assert _groups(geometry.propose_boxes(rec, c)) == [(0, 1, 2)]


# --------------------------------------------------------------------------
# Quality and the proposals file.


def test_proposal_quality_on_a_hand_made_case():
  truth = {
      'a': [formats.Instance('p', (0, 1, 2)), formats.Instance('q', (3, 4))],
      'b': [formats.Instance('p', (0,)), formats.Instance('r', (1, 9))],  # 9: truncated away
  }
  props = {
      'a': [proposals_lib.Proposal((0, 1), 0.9), proposals_lib.Proposal((3, 4, 5, 6), 0.8)],
      'b': [proposals_lib.Proposal((0, 1), 0.5), proposals_lib.Proposal((2,), 0.4)],
  }
  q = proposals_lib.proposal_quality(props, truth, {'a': 7, 'b': 3})
  # a: {0,1} vs {0,1,2} IoU 2/3 match; {3,4,5,6} vs {3,4} IoU 1/2 match.
  # b: {0,1} vs {0} 1/2 match, vs {1} 1/2: one-to-one, so one match; {2} matches nothing.
  assert q['recall'] == pytest.approx(3 / 4)
  assert q['precision'] == pytest.approx(3 / 4)
  assert q['proposals_per_sample'] == 2 and q['instances_per_sample'] == 2
  # Background: a {5, 6} both assigned; b {2} assigned.
  assert q['background_assigned'] == 1.0
  empty = proposals_lib.proposal_quality({}, truth, {'a': 7, 'b': 3})
  assert empty['recall'] == 0 and empty['background_assigned'] == 0
  assert 'oracle (upper bound)' in proposals_lib.quality_table({'oracle': q, 'boxes': q})


def test_proposals_file_is_read_as_a_sidecar(tmp_path):
  props = {'1': [proposals_lib.Proposal((3, 1), 0.75)], '2': []}
  path = str(tmp_path / 'p' / proposals_lib.proposals_filename('dev'))
  proposals_lib.write_proposals(path, props)
  assert formats.read_instances(path) == {'1': [formats.Instance('', (3, 1))], '2': []}
  assert json.loads(open(path).readline())['instances'][0]['score'] == 0.75


def test_bad_input_names_the_item_and_what_was_expected():
  c = _config()
  empty = _record(np.zeros((0, 4)), item_id='123')
  with pytest.raises(ValueError, match=r'sample 123: has no regions, expected at least 1'):
    geometry.propose_boxes(empty, c)
  rec = _record([[0, 0, 10, 10]], item_id='456')
  with pytest.raises(ValueError, match=r'sample 456: region features .*expected \[1, 8\]'):
    proposals_lib.check_record(rec, feature_dim=8)


# --------------------------------------------------------------------------
# The learned proposer.


def test_group_regions_rule():
  aff = np.array(
      [[1, 0.9, 0.1, 0.1], [0.9, 1, 0.2, 0.6], [0.1, 0.2, 1, 0.8], [0.1, 0.6, 0.8, 1]],
  )
  obj = np.array([0.9, 0.8, 0.7, 0.2])
  props = model_lib.group_regions(aff, obj, 0.5, 0.5)
  assert [p.regions for p in props] == [(0, 1), (2,)]  # 3 is background
  assert props[0].score == pytest.approx(0.85)


@pytest.fixture(scope='module')
def toy_proposer(tmp_path_factory):
  """A proposer trained on a separable toy pool: each donor's product is one
  feature direction, clutter is weak noise."""
  c = _config()
  c.instances.update(
      hidden_size=32, num_layers=1, num_heads=2, batch_size=16, num_steps=120, learning_rate=3e-3
  )
  c.instances.checkpoint_every = 1000
  pool, _ = _pool(c, num=24)
  workdir = tmp_path_factory.mktemp('proposer')
  result = instances.train(c, workdir, pool=pool)
  return c, pool, workdir, result


@pytest.mark.slow  # ~10-30 s: compiling and training a small proposer
def test_learned_proposer_learns_a_separable_toy_case(toy_proposer):
  c, pool, workdir, result = toy_proposer
  assert result.step == c.instances.num_steps
  assert result.metrics['pair_accuracy'] > 0.95 and result.metrics['objectness_accuracy'] > 0.9
  assert instances.has_trained_proposer(workdir) and instances.default_method(workdir) == 'learned'
  rng = np.random.default_rng(123)  # fresh pseudo-samples, never trained on
  samples = [compose.compose(pool, rng, c) for _ in range(40)]
  records = [
      {'item_id': str(i), 'image_w': s.image_w, 'image_h': s.image_h}
      | {'boxes': s.boxes, 'features': s.features}
      for i, s in enumerate(samples)
  ]
  truth = {
      str(i): [
          formats.Instance('', tuple(np.flatnonzero(s.group == g)))
          for g in range(s.group.max() + 1)
      ]
      for i, s in enumerate(samples)
  }
  proposer = instances.LearnedProposer(workdir, c)
  props = dict(zip(truth, proposer.propose(records)))
  q = instances.proposal_quality(props, truth, {k: len(r['boxes']) for k, r in zip(truth, records)})
  assert q['recall'] > 0.9 and q['precision'] > 0.9, q


@pytest.mark.slow  # shares the trained toy proposer
def test_learned_proposer_checks_width_and_config(toy_proposer):
  c, pool, workdir, _ = toy_proposer
  proposer = instances.LearnedProposer(workdir, c)
  wide = _record([[0, 0, 10, 10]], item_id='789')
  wide['features'] = np.ones((1, 16), np.float32)
  with pytest.raises(
      ValueError, match=r'sample 789: region features have shape \(1, 16\), expected \[1, 8\]'
  ):
    proposer.propose([wide])
  with pytest.raises(ValueError, match='has no regions'):
    proposer.propose([_record(np.zeros((0, 4)), item_id='0')])
  other = _config()
  other.instances.hidden_size = 64
  with pytest.raises(
      instances.IncompatibleProposerError, match='hidden_size: checkpoint 32, config 64'
  ):
    instances.LearnedProposer(workdir, other)
  with pytest.raises(instances.IncompatibleProposerError, match='hidden_size'):
    instances.train(other, workdir, pool=pool)  # resuming with another config
  narrow = c.copy_and_resolve_references()
  narrow.data.feature_dim = 16
  with pytest.raises(
      instances.IncompatibleProposerError, match='feature_dim: checkpoint 8, config 16'
  ):
    instances.LearnedProposer(workdir, narrow)
  with pytest.raises(FileNotFoundError, match='no trained proposer'):
    instances.LearnedProposer(workdir / 'nothing', c)


@pytest.mark.slow
def test_training_resumes_where_it_stopped(tmp_path):
  c = _config()
  c.instances.update(hidden_size=16, num_layers=1, num_heads=2, batch_size=4, num_steps=6)
  c.instances.checkpoint_every = 2
  pool, _ = _pool(c)
  first = instances.train(c, tmp_path / 'a', pool=pool, stop_after=3)
  assert first.step == 3
  resumed = instances.train(c, tmp_path / 'a', pool=pool)
  straight = instances.train(c, tmp_path / 'b', pool=pool)
  assert resumed.step == straight.step == 6
  for x, y in zip(
      jax_leaves(resumed.params), jax_leaves(straight.params)
  ):  # same batches, same init: the same parameters
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def jax_leaves(tree):
  import jax  # pylint: disable=import-outside-toplevel

  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_donors_of_another_width_are_refused():
  c = _config(feature_dim=16)
  rng = np.random.default_rng(0)
  rec = _donor(rng, np.ones(8, np.float32), 2, item_id='42')
  with pytest.raises(
      ValueError, match=r'sample 42: region features have shape \(2, 8\), expected \[2, 16\]'
  ):
    compose.make_pool([rec], c)


def test_split_proposals_feed_the_instance_pipeline(tmp_path):
  """On a built tiny dataset: proposals files for boxes and oracle, the quality
  table, and `propose_split`'s result taken by the instance eval iterator."""
  from capture_jax.data import eval_input  # pylint: disable=import-outside-toplevel
  from tests import helpers as testing  # pylint: disable=import-outside-toplevel

  c = testing.tiny_dataset(tmp_path / 'tiny')
  out = tmp_path / 'proposals'
  results = instances.evaluate_proposers(c, 'dev', ('boxes', 'learned', 'oracle'), None, out)
  assert set(results) == {'boxes', 'oracle'}  # no trained proposer: learned is skipped
  assert results['oracle']['recall'] == results['oracle']['precision'] == 1.0
  assert results['boxes']['recall'] < 1.0 and results['boxes']['background_assigned'] > 0
  written = formats.read_instances(str(out / 'boxes' / 'proposals_dev.jsonl'))
  assert all(i.label == '' for v in written.values() for i in v)
  props = instances.propose_split(c, 'dev', 'boxes')
  assert props == written and len(props) == synthetic_dev_size()
  batches = list(
      eval_input.make_instance_eval_iterator(
          c, 'dev', instances=props, process_index=0, process_count=1, batch_size=8
      )
  )
  rows = sum(int(np.sum(b.is_valid)) for b in batches)
  assert rows == sum(len(v) for v in props.values())
  with pytest.raises(FileNotFoundError, match='no trained proposer'):
    instances.propose_split(c, 'dev', 'learned', tmp_path / 'no_run')
  c.data.data_dir = str(tmp_path / 'elsewhere')  # real data: no sidecar
  with pytest.raises(FileNotFoundError, match='instances_dev.jsonl, which does not exist'):
    instances.propose_split(c, 'dev', 'oracle')
  assert instances.default_method(tmp_path / 'no_run') == 'boxes'
  assert instances.resolve_method(None, tmp_path / 'no_run') == 'boxes'
  assert instances.resolve_method('oracle', tmp_path / 'no_run') == 'oracle'
  with pytest.raises(FileNotFoundError, match='holds no trained proposer'):
    instances.resolve_method('learned', tmp_path / 'no_run')
  with pytest.raises(ValueError, match="unknown proposer 'rpn'"):
    instances.resolve_method('rpn', None)


def synthetic_dev_size():
  from capture_jax.data import synthetic  # pylint: disable=import-outside-toplevel

  return synthetic.PRESETS['tiny'].num_dev
