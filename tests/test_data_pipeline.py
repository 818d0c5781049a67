"""The Grain pipeline: generator -> files -> TFDS -> batches, masks, resume, shards, eval."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from capture_jax.bench import input as input_bench
from capture_jax.data import formats
from capture_jax import batch as batch_lib
from capture_jax.data import collate as collate_lib
from capture_jax.data import eval_input
from capture_jax.data import masking as masking_lib
from capture_jax.data import source as source_lib
from capture_jax.data import train_input
from tests import helpers
from capture_jax.data import tokenizer as tokenizer_lib

R, F = 8, 32  # the tiny preset


@pytest.fixture(scope='module')
def config(tmp_path_factory):
  c = helpers.tiny_dataset(tmp_path_factory.mktemp('tiny'))
  c.model.max_text_len = 24  # data.max_text_len follows the model's
  return c


def _copy(config, **data):
  c = config.copy_and_resolve_references()
  for k, v in data.items():
    setattr(c.data, k, v)
  return c


def _train(config, n, **kw):
  it = train_input.make_train_iterator(
      config,
      process_index=kw.pop('process_index', 0),
      process_count=kw.pop('process_count', 1),
      **kw,
  )
  return it, [next(it) for _ in range(n)]


def _same(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _records(config, split):
  src = source_lib.make_source(config, split)
  return src.read_records(range(len(src)))


def _fingerprint(regions: np.ndarray) -> bytes:
  """Identifies a record by its unmasked region features ([R, F] float32)."""
  return np.ascontiguousarray(regions, np.float32).tobytes()


def _record_fingerprints(config, split):
  return {
      _fingerprint(collate_lib.pack_regions([r], R, F)[0][0]): r['item_id']
      for r in _records(config, split)
  }


# ---------------------------------------------------------------- batches


def test_train_batch_keys_shapes_dtypes(config):
  """The host batch carries what storage holds; the device stage makes the model batch."""
  _, (batch,) = _train(config, 1)
  b, t = config.data.batch_size, 24
  expected = {
      'input_ids': ((b, t), np.int32),
      'input_mask': ((b, t), np.int32),
      'region_feat': ((b, R, F), np.float16),
      'region_loc': ((b, R, 5), np.float32),
      'region_mask': ((b, R), np.int32),
      'positions': ((b, 2), np.uint32),
  }
  assert set(batch) == set(expected) == set(batch_lib.HOST_KEYS)
  for key, (shape, dtype) in expected.items():
    assert batch[key].shape == shape and batch[key].dtype == dtype, key
  np.testing.assert_array_equal(batch_lib.decode_positions(batch['positions']), np.arange(b))
  model = helpers.model_batch(config, batch)
  layout = batch_lib.BatchLayout.from_config(config)
  assert {k: (v.shape, v.dtype) for k, v in model.items()} == layout.shapes(b)
  assert (model['segment_ids'] == 0).all()


def test_positions_round_trip_and_refuse_negatives():
  p = np.array([0, 1, 2**31, 2**32 - 1, 2**32, 3 * 2**40 + 7], np.int64)
  halves = batch_lib.encode_positions(p)
  assert halves.dtype == np.uint32 and halves.shape == (6, 2)
  np.testing.assert_array_equal(batch_lib.decode_positions(halves), p)
  with pytest.raises(ValueError, match='non-negative'):
    batch_lib.encode_positions([3, -1])


def test_eval_batches_hold_exactly_what_the_files_hold(config):
  """Round trip: generator files -> TFDS -> pipeline, unmasked."""
  encoder = tokenizer_lib.TextEncoder(config.data.vocab_file, 24)
  anns = [
      a
      for _, a in formats.read_annotations(
          os.path.join(config.data.data_dir, formats.annotation_filename('dev'))
      )
  ]
  store = formats.FeatureStore(os.path.join(config.data.data_dir, 'features'))
  rows = [
      (b, i)
      for b in eval_input.make_eval_iterator(config, 'dev', process_index=0, process_count=1)
      for i in range(len(b.is_valid))
      if b.is_valid[i]
  ]
  assert [b.item_id[i] for b, i in rows] == [a.item_id for a in anns]  # file order
  for (b, i), ann in zip(rows, anns):
    x = {k: v[i] for k, v in b.inputs.items()}
    assert b.labels[i] == ann.labels
    ids, mask = encoder([ann.title])
    np.testing.assert_array_equal(x['input_ids'], ids[0])
    np.testing.assert_array_equal(x['input_mask'], mask[0])
    rf, _ = store.get(ann.item_id)
    n = rf.num_boxes
    np.testing.assert_array_equal(x['image_mask'], [1] * (n + 1) + [0] * (R - n))
    feats = rf.features.astype(np.float16).astype(np.float32)  # stored as float16
    np.testing.assert_array_equal(x['image_feat'][1 : n + 1], feats)
    np.testing.assert_array_equal(x['image_feat'][n + 1 :], 0)
    np.testing.assert_allclose(x['image_feat'][0], feats.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(x['image_loc'][0], [0, 0, 1, 1, 1])
    w, h = rf.image_w, rf.image_h
    b_ = rf.boxes
    manual = np.stack(
        [
            b_[:, 0] / w,
            b_[:, 1] / h,
            b_[:, 2] / w,
            b_[:, 3] / h,
            (b_[:, 2] - b_[:, 0]) * (b_[:, 3] - b_[:, 1]) / (w * h),
        ],
        1,
    )
    np.testing.assert_allclose(x['image_loc'][1 : n + 1], manual, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(x['image_loc'][n + 1 :], 0)
    np.testing.assert_array_equal(x['image_target'][:n], feats)
    assert (x['lm_label_ids'] == -1).all() and (x['image_label'] == -1).all()


def test_item_ids_are_the_files_and_read_once(config, monkeypatch):
  """`Product1MSource.item_ids()`: the annotation file's ids in order; a second call (an
  evaluation asks once per proposer) reads no record."""
  path = os.path.join(config.data.data_dir, formats.annotation_filename('dev'))
  expected = [a.item_id for _, a in formats.read_annotations(path)]
  src = source_lib.make_source(config, 'dev')
  ids = src.item_ids()
  assert ids == expected and len(expected) > 1
  ids.append('changed by the caller')
  monkeypatch.setattr(src, 'read_records', lambda indices: pytest.fail('read the split again'))
  assert src.item_ids() == expected


def test_training_masks_follow_the_recipe(config):
  spec = masking_lib.MaskingSpec.from_config(config)
  _, batches = _train(config, 6)
  batches = [helpers.model_batch(config, b) for b in batches]
  for batch in batches:
    ids, labels, mask = batch['input_ids'], batch['lm_label_ids'], batch['input_mask']
    chosen = labels != -1
    assert not (chosen & (mask == 0)).any()
    assert not chosen[:, 0].any()  # [CLS]
    last = mask.sum(1) - 1
    assert not chosen[np.arange(len(ids)), last].any()  # [SEP]
    assert not np.isin(labels[chosen], spec.special_ids).any()  # never a special token
    # A chosen token shows [MASK], a random token, or itself; others are untouched.
    assert (ids[chosen] >= 0).all() and (ids[chosen] < spec.vocab_size).all()
    region_mask = batch['image_mask'][:, 1:]
    label, target, feat = batch['image_label'], batch['image_target'], batch['image_feat'][:, 1:]
    assert set(np.unique(label)) <= {-1, 1} and not ((label == 1) & (region_mask == 0)).any()
    untouched = label == -1
    np.testing.assert_array_equal(feat[untouched], target[untouched])
    zeroed = (feat == 0).all(-1) & (target != 0).any(-1)
    assert not (zeroed & untouched).any()
    # Global token: mean of the regions after masking.
    m = region_mask.astype(np.float32)
    expected = (feat * m[..., None]).sum(1) / m.sum(1, keepdims=True)
    np.testing.assert_allclose(batch['image_feat'][:, 0], expected, rtol=1e-5, atol=1e-6)
  assert sum((b['lm_label_ids'] != -1).sum() for b in batches) > 0
  assert sum((b['image_label'] == 1).sum() for b in batches) > 0


def test_masking_rates_within_one_percent(config):
  """Over 20,480 training samples masked on the device: 15% of tokens / regions chosen; tokens
  80/10/10 [MASK]/random/kept; regions 90% zeroed. The bound: with > 15,000 chosen tokens and
  > 10,000 chosen regions, one binomial standard deviation of each rate is below 0.35%, so
  1% is about 3 sigma (a correct recipe fails it about once in 400 draws of the data; the
  draws here are fixed, so the test is deterministic)."""
  spec = masking_lib.MaskingSpec.from_config(config)
  c = _copy(config, batch_size=512)
  it = train_input.make_train_iterator(c, process_index=0, process_count=1)
  eligible = chosen = to_mask = to_random = kept = 0
  regions = r_chosen = r_zero = 0
  for _ in range(40):
    b = helpers.model_batch(c, next(it))
    labels, ids, mask = b['lm_label_ids'], b['input_ids'], b['input_mask']
    special = np.isin(np.where(labels >= 0, labels, ids), spec.special_ids)
    eligible += ((mask == 1) & ~special).sum()
    sel = labels != -1
    chosen += sel.sum()
    to_mask += (sel & (ids == spec.mask_id)).sum()
    kept += (sel & (ids == labels)).sum()
    to_random += (sel & (ids != labels) & (ids != spec.mask_id)).sum()
    valid = b['image_mask'][:, 1:] == 1
    regions += valid.sum()
    rsel = b['image_label'] == 1
    r_chosen += rsel.sum()
    r_zero += (rsel & (b['image_feat'][:, 1:] == 0).all(-1)).sum()
  assert chosen > 15_000 and r_chosen > 10_000  # enough for 1% (> 3 sigma)
  assert abs(chosen / eligible - 0.15) < 0.01
  assert abs(to_mask / chosen - 0.8) < 0.01
  # A random draw equal to the original token counts as kept (1 / vocab).
  assert abs(to_random / chosen - 0.1) < 0.01
  assert abs(kept / chosen - 0.1) < 0.01
  assert abs(r_chosen / regions - 0.15) < 0.01
  assert abs(r_zero / r_chosen - 0.9) < 0.01


def test_shuffled_indices_permute_every_epoch():
  import pickle

  idx = train_input.ShuffledIndices(10, seed=3, num_epochs=2)
  assert len(idx) == 20
  epochs = [[idx[p] for p in range(e * 10, (e + 1) * 10)] for e in range(3)]
  assert all(sorted(e) == list(range(10)) for e in epochs)
  assert epochs[0] != epochs[1] != epochs[2]
  again = pickle.loads(pickle.dumps(idx))
  assert [again[p] for p in range(30)] == sum(epochs, [])
  assert [train_input.ShuffledIndices(10, 4)[p] for p in range(10)] != epochs[0]
  assert len(train_input.ShuffledIndices(10, 3)) > 10**12  # forever


def test_device_stage_equals_mask_then_global_token(config):
  """The device stage must equal the reference steps: MRM (`helpers.reference_mask_regions`),
  then the global token (`formats.add_global_token`), and MLM."""
  spec = collate_lib.make_batch_spec(config)
  mspec = masking_lib.MaskingSpec.from_config(config)
  records = _records(config, 'train')[:32]
  positions = np.arange(1000, 1032)
  host = collate_lib.collate(records, positions, spec)
  batch = helpers.model_batch(config, host)
  feat, loc, mask = collate_lib.pack_regions(records, R, F)
  keys = masking_lib.record_keys(mspec.seed, batch_lib.encode_positions(positions))
  masked, image_label = helpers.reference_mask_regions(feat, mask, keys, mspec)
  image_feat, image_loc, image_mask = formats.add_global_token(masked, loc, mask)
  np.testing.assert_array_equal(batch['image_label'], image_label)
  np.testing.assert_array_equal(batch['image_feat'][:, 1:], image_feat[:, 1:])
  np.testing.assert_allclose(batch['image_feat'][:, 0], image_feat[:, 0], rtol=1e-6)
  np.testing.assert_array_equal(batch['image_loc'], image_loc)
  np.testing.assert_array_equal(batch['image_mask'], image_mask)
  np.testing.assert_array_equal(batch['image_target'], feat)
  ids, input_mask = spec.encoder([r['title'] for r in records])
  masked_ids, lm = masking_lib.mask_tokens(ids, input_mask, keys, mspec)
  np.testing.assert_array_equal(batch['input_ids'], masked_ids)
  np.testing.assert_array_equal(batch['lm_label_ids'], lm)
  # Unmasked, the model batch of evaluation: the same features, loc and global token.
  unmasked = collate_lib.eval_batch(records, spec)
  plain = formats.add_global_token(feat, loc, mask)
  np.testing.assert_array_equal(unmasked['image_feat'][:, 1:], plain[0][:, 1:])
  np.testing.assert_allclose(unmasked['image_feat'][:, 0], plain[0][:, 0], rtol=1e-6)
  np.testing.assert_array_equal(unmasked['image_loc'], image_loc)


# Real-looking titles: CJK, latin with accents and capitals, digits, punctuation, an empty one.
TITLES = (
    '兰蔻小黑瓶精华肌底液 Lancôme Advanced Génifique 50ml 补水保湿 修护',
    'SK-II 神仙水 230ml 护肤精华露（限量版）',
    '',
    'ESTÉE LAUDER Night Repair 小棕瓶 100ml x2 套装 送 眼霜15ml',
    '面霜' * 40,
)


@pytest.mark.parametrize('max_len', [2, 3, 8, 24, 128])
def test_stored_token_ids_pack_to_what_the_encoder_gives_for_the_titles(tmp_path, max_len):
  """`TextEncoder.pack` of `TitleTokenizer` ids (what a dataset stores) == `TextEncoder` of the
  titles, truncation included: training on stored ids is training on the titles."""
  vocab = str(tmp_path / 'vocab.txt')
  tokenizer_lib.train_vocab(TITLES[:2] + TITLES[3:], 120, vocab, min_frequency=1)
  encoder = tokenizer_lib.TextEncoder(vocab, max_len)
  stored = [tokenizer_lib.TitleTokenizer(vocab).ids(t) for t in TITLES]
  assert all(x.dtype == np.int32 for x in stored) and len(stored[-1]) == 80  # untruncated
  ids, mask = encoder.pack(stored)
  want_ids, want_mask = encoder(list(TITLES))
  assert ids.dtype == mask.dtype == np.int32 and ids.shape == (len(TITLES), max_len)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(mask, want_mask)
  assert encoder.pack([])[0].shape == (0, max_len)


def test_masks_are_a_function_of_seed_and_position():
  enc = batch_lib.encode_positions
  keys = masking_lib.record_keys(0, enc(np.arange(4)))
  u = np.asarray(masking_lib.uniforms(keys, 1, 50))
  np.testing.assert_array_equal(
      u, masking_lib.uniforms(masking_lib.record_keys(0, enc(np.arange(4))), 1, 50)
  )
  assert len({row.tobytes() for row in u}) == 4
  assert not np.array_equal(
      u, masking_lib.uniforms(masking_lib.record_keys(1, enc(np.arange(4))), 1, 50)
  )
  one = masking_lib.record_keys(0, enc(np.array([2])))
  np.testing.assert_array_equal(u[2], masking_lib.uniforms(one, 1, 50)[0])  # per record
  assert not np.array_equal(u, masking_lib.uniforms(keys, 2, 50))  # independent streams
  assert 0 <= u.min() and u.max() < 1
  # Both halves of the position count: 2**32 + p is another record than p.
  far = masking_lib.record_keys(0, enc(np.arange(4) + 2**32))
  assert not np.array_equal(u, masking_lib.uniforms(far, 1, 50))


def _by_position(config, host_batches):
  """{stream position: that record's model-batch rows} of host batches masked on the device."""
  out = {}
  for host in host_batches:
    model = helpers.model_batch(config, host)
    for i, p in enumerate(batch_lib.decode_positions(host['positions'])):
      out[int(p)] = {k: v[i] for k, v in model.items()}
  return out


def _same_rows(a, b):
  assert a.keys() == b.keys() and a
  for p in a:
    for k in a[p]:
      np.testing.assert_array_equal(a[p][k], b[p][k], err_msg=f'position {p}, {k}')


def test_device_masks_depend_only_on_seed_and_position(config):
  """Batch 8 vs 16, 1 vs 2 processes, with and without a resume: the same masked rows for
  the same stream positions."""
  reference = _by_position(config, _train(config, 4)[1])  # positions 0..31
  _same_rows(reference, _by_position(config, _train(_copy(config, batch_size=16), 2)[1]))
  two = {}
  for p in range(2):
    two.update(_by_position(config, _train(config, 4, process_index=p, process_count=2)[1]))
  _same_rows(reference, two)
  it, first = _train(config, 2)
  state = json.loads(json.dumps(it.get_state()))
  fresh = train_input.make_train_iterator(config, process_index=0, process_count=1)
  fresh.set_state(state)
  resumed = _by_position(config, first + [next(fresh) for _ in range(2)])
  _same_rows(reference, resumed)
  assert not _same(
      helpers.model_batch(config, _train(config, 1)[1][0]),
      helpers.model_batch(_copy(config, shuffle_seed=5), _train(config, 1)[1][0]),
  )


# ---------------------------------------------------------------- determinism and resume


def test_deterministic_given_seed(config):
  _, a = _train(config, 4)
  _, b = _train(config, 4)
  assert all(_same(x, y) for x, y in zip(a, b))
  _, c = _train(_copy(config, shuffle_seed=1), 4)
  assert not _same(a[0], c[0])


@pytest.mark.parametrize('threads', [0, 2])
def test_resume_from_saved_state_gives_identical_batches(config, threads):
  c = _copy(config, read_threads=threads, prefetch_batches=4)
  it, _ = _train(c, 5)
  state = json.loads(json.dumps(it.get_state()))  # checkpointable as JSON
  uninterrupted = [next(it) for _ in range(4)]
  fresh = train_input.make_train_iterator(c, process_index=0, process_count=1)
  fresh.set_state(state)
  resumed = [next(fresh) for _ in range(4)]
  assert all(_same(x, y) for x, y in zip(uninterrupted, resumed))


def test_each_epoch_is_a_new_permutation(config):
  n = len(_records(config, 'train'))  # 96 = 12 batches of 8
  _, batches = _train(config, 2 * n // 8)
  prints = [_fingerprint(t) for b in batches for t in b['region_feat']]
  first, second = prints[:n], prints[n:]
  assert len(set(first)) == n and set(first) == set(second) == set(
      _record_fingerprints(config, 'train')
  )
  assert first != second


def test_two_processes_get_disjoint_shards_covering_the_split(config):
  c = _copy(config, num_epochs=1, batch_size=16)  # 96 records = 6 global batches
  shards = []
  for p in range(2):
    it = train_input.make_train_iterator(c, process_index=p, process_count=2)
    batches = list(it)
    assert len(batches) == 6 and all(b['input_ids'].shape[0] == 8 for b in batches)
    shards.append([[_fingerprint(t) for t in b['region_feat']] for b in batches])
  flat = [set(x for b in s for x in b) for s in shards]
  assert flat[0].isdisjoint(flat[1])
  assert flat[0] | flat[1] == set(_record_fingerprints(config, 'train'))
  # Global batch b is the same records whatever the number of processes.
  single = list(train_input.make_train_iterator(c, process_index=0, process_count=1))
  for b, whole in enumerate(single):
    assert {_fingerprint(t) for t in whole['region_feat']} == set(shards[0][b] + shards[1][b])


def test_default_shard_comes_from_jax():
  assert source_lib.process_shard(None, None) == (0, 1)
  assert source_lib.process_shard(1, 4) == (1, 4)
  with pytest.raises(ValueError):
    source_lib.process_shard(4, 4)


# ---------------------------------------------------------------- evaluation


def test_eval_pads_the_last_batch_and_shards_evenly(config):
  ids = [r['item_id'] for r in _records(config, 'dev')]  # 16
  batches = list(
      eval_input.make_eval_iterator(config, 'dev', process_index=0, process_count=1, batch_size=6)
  )
  assert [b.is_valid.tolist() for b in batches] == [[1] * 6, [1] * 6, [1] * 4 + [0] * 2]
  pad = batches[-1]
  assert list(pad.item_id[4:]) == ['', ''] and pad.labels[4:] == [(), ()]
  assert (pad.inputs['input_mask'][4:] == 0).all() and (pad.inputs['image_feat'][4:] == 0).all()
  assert (pad.inputs['lm_label_ids'][4:] == -1).all()
  assert set(pad.inputs) == set(batch_lib.TRAIN_KEYS)
  per_process = [
      list(
          eval_input.make_eval_iterator(
              config, 'dev', process_index=p, process_count=2, batch_size=6
          )
      )
      for p in range(2)
  ]
  assert len(per_process[0]) == len(per_process[1]) == 3  # same count for collectives
  seen = [[i for b in bs for i, v in zip(b.item_id, b.is_valid) if v] for bs in per_process]
  assert set(seen[0]).isdisjoint(seen[1]) and sorted(seen[0] + seen[1]) == sorted(ids)
  assert seen[0] == ids[0::2]  # in order within a process


def test_instance_batches_restrict_the_visual_input(config):
  sidecar = formats.read_instances(
      os.path.join(config.data.data_dir, formats.instances_filename('dev'))
  )
  records = {r['item_id']: r for r in _records(config, 'dev')}
  rows = [
      (b, i)
      for b in eval_input.make_instance_eval_iterator(
          config, 'dev', process_index=0, process_count=1
      )
      for i in range(len(b.is_valid))
      if b.is_valid[i]
  ]
  assert len(rows) == sum(len(v) for v in sidecar.values())
  for b, i in rows:
    item, k = b.item_id[i], b.instance_index[i]
    inst = sidecar[item][k]
    assert b.instance_label[i] == inst.label and inst.label in b.labels[i]
    feats = records[item]['features'][list(inst.regions)].astype(np.float32)
    n = len(inst.regions)
    assert b.inputs['image_mask'][i].sum() == n + 1
    np.testing.assert_array_equal(b.inputs['image_feat'][i, 1 : n + 1], feats)
    np.testing.assert_allclose(b.inputs['image_feat'][i, 0], feats.mean(0), rtol=1e-5)
  spec = collate_lib.make_batch_spec(config)
  item = next(iter(sidecar))
  single = helpers.reference_instance_inputs(records[item], sidecar[item][0].regions, spec)
  assert single['image_mask'][0].sum() == len(sidecar[item][0].regions) + 1


# ---------------------------------------------------------------- errors and tools


def test_config_mismatches_are_clear_errors(config, tmp_path):
  with pytest.raises(ValueError, match='features width 32 in the dataset, expected 64'):
    next(
        train_input.make_train_iterator(
            _copy(config, feature_dim=64), process_index=0, process_count=1
        )
    )
  with pytest.raises(ValueError, match='does not split over 3 processes'):
    train_input.make_train_iterator(config, process_index=0, process_count=3)
  small = config.copy_and_resolve_references()
  small.model.vocab_size = 10
  with pytest.raises(ValueError, match='model.vocab_size 10 <'):
    train_input.make_train_iterator(small, process_index=0, process_count=1)
  with pytest.raises(FileNotFoundError, match='build it with'):
    train_input.make_train_iterator(
        _copy(config, tfds_dir=str(tmp_path)), process_index=0, process_count=1
    )


def test_benchmark_measures_throughput(config):
  res = input_bench.measure(config, warmup=1, batches=3, repeats=2)
  assert res['wall_samples_per_s'] > 0 and res['samples_per_cpu_s'] > 0


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(config):
  _, reference = _train(config, 4)
  c = _copy(config, num_workers=2)
  it, batches = _train(c, 2)
  state = it.get_state()
  batches += [next(it) for _ in range(2)]
  assert all(_same(x, y) for x, y in zip(batches, reference))
  fresh = train_input.make_train_iterator(c, process_index=0, process_count=1)
  fresh.set_state(state)
  assert _same(next(fresh), reference[2])
  it.close()
  fresh.close()
