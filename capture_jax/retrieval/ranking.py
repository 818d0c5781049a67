"""Ranking: the top-100 search, and every report row's ranked lists in query order.

A model row's lists come from its export's search: the whole-sample query's
list, and in the `instances` and `both` modes the per-instance lists merged
with it (`instance_merge`). A baseline's come from its own vectors
(`baselines.baseline_vectors`). Searches shared by several rows (the whole
list of a weights, a proposer's instance lists) run once.
"""

from __future__ import annotations

import functools
import time
from typing import Mapping, Sequence

import jax
import ml_collections
import numpy as np

from capture_jax.retrieval import export_format
from capture_jax.retrieval import instance_merge
from capture_jax.retrieval import keys
from capture_jax.retrieval import metrics as metrics_lib
from capture_jax.retrieval import search as search_lib

TOP_K = metrics_lib.MAX_RANKED  # the official format holds 100 ids per query
RankedLists = dict[str, list[str]]  # query id -> ranked gallery ids


def search(
    queries: np.ndarray, gallery: np.ndarray, config: ml_collections.ConfigDict, *, devices=None
) -> tuple[np.ndarray, float | None]:
  """Top-100 gallery indices [Q, min(100, N)] by cosine; with FAISS also its recall@100 against exact."""
  e = config.eval
  exact = lambda: search_lib.exact_topk(
      queries,
      gallery,
      TOP_K,
      query_chunk=e.query_chunk,
      gallery_chunk=e.gallery_chunk,
      devices=devices,
  )[1]
  if e.search == 'exact':
    return exact(), None
  _, approx = search_lib.faiss_topk(
      queries,
      gallery,
      TOP_K,
      kind=e.faiss_index,
      nlist=e.faiss_nlist or None,
      nprobe=e.faiss_nprobe,
      hnsw_m=e.faiss_hnsw_m,
      ef_search=e.faiss_ef_search,
      seed=config.seed,
  )
  return approx, search_lib.recall_at_k(approx, exact())


class Searcher:
  """`search` with the time and, with FAISS, the recall@100 of each named search recorded."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.devices = jax.local_devices()
    self.seconds: dict[str, float] = {}
    self.recall: dict[str, float] = {}

  def __call__(self, name: str, queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    start = time.perf_counter()
    indices, recall = search(queries, gallery, self.config, devices=self.devices)
    self.seconds[name] = time.perf_counter() - start
    if recall is not None:
      self.recall[name] = recall
    return indices


def instance_lists(
    instances: export_format.Embeddings, indices: np.ndarray, gallery_ids: Sequence[str]
) -> dict[str, list[list[str]]]:
  """Query id -> its instances' ranked lists, in the export's row order (the proposer's order)."""
  out: dict[str, list[list[str]]] = {}
  gallery_ids = np.asarray(gallery_ids, dtype=object)
  for item_id, row in zip(instances.item_id, indices):
    out.setdefault(item_id, []).append([str(g) for g in gallery_ids[row[row >= 0]]])
  return out


def merged_lists(
    query_ids: Sequence[str],
    whole: Mapping[str, list[str]],
    per_instance: Mapping[str, list[list[str]]] | None,
    mode: str,
) -> RankedLists:
  """Query id -> the ranked list of `mode` (`instance_merge.merge_query_lists`), in query order."""
  return {
      q: instance_merge.merge_query_lists(whole[q], (per_instance or {}).get(q, []), mode, TOP_K)
      for q in query_ids
  }


class Ranker:
  """The ranked lists of report rows over one query split and gallery.

  Args:
    exports: export key -> export read (the gallery and queries of each weights, the
      instance queries of each proposer).
    baseline_vectors: `(method) -> (query vectors [Q, F], gallery vectors [N, F])` of a
      baseline, in `query_ids` and gallery order.
  """

  def __init__(
      self,
      searcher: Searcher,
      query_ids: Sequence[str],
      exports: Mapping[keys.ExportKey, export_format.Embeddings],
      baseline_vectors,
  ):
    self.searcher = searcher
    self.query_ids = list(query_ids)
    self.exports = exports
    self.baseline_vectors = baseline_vectors

  def __call__(self, method: keys.Method) -> RankedLists:
    if method.source != 'model':
      gallery_ids = self.exports[keys.ExportKey('gallery')].item_id
      q, g = self.baseline_vectors(method)
      return search_lib.indices_to_ranked_lists(
          self.query_ids, gallery_ids, self.searcher(method.label, q, g)
      )
    whole = self._whole(method.weights)
    per_instance = self._per_instance(method.export) if method.export else None
    return merged_lists(self.query_ids, whole, per_instance, method.mode)

  @functools.cache
  def _whole(self, weights: str) -> RankedLists:
    key = keys.ExportKey('queries', weights=weights)
    queries, gallery = self._pair(key)
    indices = self.searcher(key.label, queries.vectors, gallery.vectors)
    return search_lib.indices_to_ranked_lists(queries.item_id, gallery.item_id, indices)

  @functools.cache
  def _per_instance(self, key: keys.ExportKey) -> dict[str, list[list[str]]]:
    instances, gallery = self._pair(key)
    indices = self.searcher(key.label, instances.vectors, gallery.vectors)
    return instance_lists(instances, indices, gallery.item_id)

  def _pair(self, key: keys.ExportKey) -> tuple[export_format.Embeddings, export_format.Embeddings]:
    return self.exports[key], self.exports[keys.ExportKey('gallery', weights=key.weights)]


def rank(ranker: Ranker, methods: Sequence[keys.Method]) -> dict[keys.Method, RankedLists]:
  """Method -> its ranked lists (query id -> gallery ids), in `methods` order."""
  return {m: ranker(m) for m in methods}
