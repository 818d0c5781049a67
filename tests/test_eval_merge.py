"""Round-robin merging of per-instance ranked lists."""

from __future__ import annotations

import pytest

from capture_jax.retrieval.instance_merge import merge_query_lists, round_robin_merge


def test_round_robin_interleaves_and_deduplicates():
  assert round_robin_merge([['a', 'b', 'c'], ['b', 'd'], ['e']]) == ['a', 'b', 'e', 'd', 'c']
  assert round_robin_merge([['a', 'a', 'b']]) == ['a', 'b']
  assert round_robin_merge([[], ['x']]) == ['x']
  assert round_robin_merge([]) == []


def test_round_robin_caps_the_length():
  lists = [[f'a{i}' for i in range(100)], [f'b{i}' for i in range(100)]]
  merged = round_robin_merge(lists, max_len=100)
  assert len(merged) == 100
  assert merged[:4] == ['a0', 'b0', 'a1', 'b1'] and merged[-1] == 'b49'
  assert round_robin_merge(lists, max_len=0) == []


def test_modes():
  whole = ['w1', 's1', 'w2']
  instances = [['s1', 'i1'], ['j1', 'j2', 'j3']]
  assert merge_query_lists(whole, instances, 'whole') == ['w1', 's1', 'w2']
  assert merge_query_lists(whole, instances, 'instances') == ['s1', 'j1', 'i1', 'j2', 'j3']
  # "both": the instance lists lead every round, the whole-sample list comes last in it.
  assert merge_query_lists(whole, instances, 'both') == ['s1', 'j1', 'w1', 'i1', 'j2', 'j3', 'w2']
  assert merge_query_lists(whole, instances, 'both', max_len=3) == ['s1', 'j1', 'w1']


def test_modes_without_instances_and_errors():
  assert merge_query_lists(['w1'], [], 'instances') == ['w1']  # falls back to whole
  assert merge_query_lists(['w1'], [], 'both') == ['w1']
  with pytest.raises(ValueError, match='unknown merge mode'):
    merge_query_lists(['w1'], [], 'all')
  with pytest.raises(ValueError, match='needs the whole-sample'):
    merge_query_lists(None, [['i']], 'both')
  with pytest.raises(ValueError, match='no instance list'):
    merge_query_lists(None, [], 'instances')
