"""The annotation files of the retrieval scale rehearsal (`capture_jax.bench.retrieval_scale`)."""

from __future__ import annotations

import collections
import os

import pytest

from capture_jax.bench import retrieval_scale as rs
from capture_jax.data import formats
from capture_jax.retrieval import metrics


def _read(root: str, split: str) -> list[formats.Annotation]:
  path = os.path.join(root, formats.annotation_filename(split))
  return [a for _, a in formats.read_annotations(path)]


def test_queries_have_gallery_labels_of_one_brand(tmp_path):
  root = str(tmp_path)
  counts = rs.write_annotations(root, rs.Sizes(num_gallery=1000, num_queries=300, num_train=20))
  assert counts == {'gallery': 1000, rs.QUERY_SPLIT: 300, 'train': 20}
  gallery, queries, train = (_read(root, s) for s in ('gallery', rs.QUERY_SPLIT, 'train'))
  sizes = collections.Counter(a.labels for a in gallery)
  assert all(len(labels) == 1 for labels in sizes)
  assert max(sizes.values()) - min(sizes.values()) <= 1  # round-robin over the products
  in_gallery = {a.labels[0] for a in gallery}
  for q in queries:
    assert len(q.labels) in rs.REAL_LABEL_COUNTS
    assert len(set(q.labels)) == len(q.labels)
    assert set(q.labels) <= in_gallery, q
    assert len({label.split(' ')[0] for label in q.labels}) == 1  # one brand
  assert not any(a.labels for a in train)
  ids = [a.item_id for a in gallery + queries + train]
  assert len(set(ids)) == len(ids)
  # The official evaluator's reader takes them: every query label has gallery items.
  gt = metrics.read_ground_truth(root, rs.QUERY_SPLIT)
  assert len(gt.query_labels) == 300 and len(gt.gallery_labels) == 1000
  # The label counts follow the real dev file's (mean 2.79); 300 draws land near it.
  mean = sum(len(q.labels) for q in queries) / len(queries)
  assert 2.5 < mean < 3.1


def test_same_seed_same_files(tmp_path):
  sizes = rs.Sizes(num_gallery=500, num_queries=20, num_train=5)
  rs.write_annotations(str(tmp_path / 'a'), sizes)
  rs.write_annotations(str(tmp_path / 'b'), sizes)
  for split in ('gallery', rs.QUERY_SPLIT, 'train'):
    name = formats.annotation_filename(split)
    assert (tmp_path / 'a' / name).read_bytes() == (tmp_path / 'b' / name).read_bytes()


def test_a_gallery_smaller_than_the_catalogue_is_refused(tmp_path):
  with pytest.raises(ValueError, match='num_gallery=10 is below'):
    rs.write_annotations(str(tmp_path), rs.Sizes(num_gallery=10, num_queries=5, num_train=5))
  assert not os.listdir(tmp_path)


def test_a_stage_given_its_folder_reruns_from_nothing(tmp_path):
  p = rs.Paths(str(tmp_path))
  os.makedirs(p.eval)
  with open(os.path.join(p.eval, 'evaluation.json'), 'w', encoding='utf-8') as f:
    f.write('{}')  # a previous run's result
  r = rs.run_module('probe', p, 'this', fresh=p.eval)  # `python -m this`: the Zen of Python
  assert not os.path.exists(p.eval) and 'Beautiful is better than ugly' in r['output']
  assert os.path.isfile(os.path.join(p.logs, 'probe.log'))
