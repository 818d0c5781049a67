"""Merging per-instance ranked lists into the single list a query may return.

A multi-product query is searched once as a whole and once per product
instance (the caption with the visual input restricted to that instance's
regions). The official format allows one list of at most 100 ids, so the
lists are interleaved round-robin, first place of every list, then second
places, and so on, dropping ids already taken. Round-robin rather than
merging by score: scores from different query embeddings are not on one
scale, and round-robin gives every instance the same share of the top ranks,
which is what the label-recall metric (mAR) rewards.

In "both" the instance lists lead every round and the whole-sample list comes
last: each instance list names one product, while the whole-sample list mixes
them and is the weaker list (docs/BENCHMARKS.md, "Query mode `both`: the
whole-sample list last"), so it fills the places the instance lists leave, such
as a product that no proposal found, rather than taking every first place.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TypeVar

MERGE_MODES = ('whole', 'instances', 'both')
T = TypeVar('T', bound=Hashable)


def round_robin_merge(lists: Sequence[Sequence[T]], max_len: int = 100) -> list[T]:
  """Interleaves ``lists`` rank by rank, keeping the first occurrence of an id.

  >>> round_robin_merge([["a", "b", "c"], ["b", "d"], ["e"]])
  ['a', 'b', 'e', 'd', 'c']
  """
  if max_len < 0:
    raise ValueError(f'max_len must be >= 0, got {max_len}')
  merged: list[T] = []
  seen: set[T] = set()
  depth = max((len(lst) for lst in lists), default=0)
  for rank in range(depth):
    for lst in lists:
      if rank < len(lst) and lst[rank] not in seen:
        if len(merged) == max_len:
          return merged
        seen.add(lst[rank])
        merged.append(lst[rank])
  return merged


def merge_query_lists(
    whole: Sequence[T] | None,
    instances: Sequence[Sequence[T]],
    mode: str = 'both',
    max_len: int = 100,
) -> list[T]:
  """The ranked list of one query under a merge mode.

  Args:
    whole: the whole-sample ranked list (needed for "whole" and "both").
    instances: one ranked list per instance, in instance order.
    mode: "whole" (whole-sample list only), "instances" (round-robin over
      the instance lists) or "both" (round-robin over the instance lists,
      then the whole-sample list, last in every round).
    max_len: the length cap (100 in the official format).

  A query without instances (no region proposal) falls back to its
  whole-sample list in "instances" mode when one is given: an empty list
  would score 0 for a detector failure rather than for retrieval.
  """
  if mode not in MERGE_MODES:
    raise ValueError(f'unknown merge mode {mode!r}; use one of {MERGE_MODES}')
  if mode in ('whole', 'both') and whole is None:
    raise ValueError(f'merge mode {mode!r} needs the whole-sample ranked list')
  if mode == 'whole':
    return round_robin_merge([whole], max_len)
  if mode == 'instances':
    if not instances:
      if whole is None:
        raise ValueError(
            "merge mode 'instances' got no instance list and no whole-sample list to fall back to"
        )
      return round_robin_merge([whole], max_len)
    return round_robin_merge(list(instances), max_len)
  return round_robin_merge([*instances, whole], max_len)
