"""Exact chunked/sharded search against brute force; FAISS search and recall."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from capture_jax.retrieval.search import (
    brute_force_topk,
    exact_topk,
    faiss_topk,
    indices_to_ranked_lists,
    recall_at_k,
)
from tests.helpers import with_cpu_devices

REPO = Path(__file__).resolve().parents[1]


@settings(max_examples=25, deadline=None)
@given(
    n_query=st.integers(1, 20),
    n_gallery=st.integers(1, 60),
    dim=st.integers(1, 5),
    k=st.integers(1, 70),
    query_chunk=st.integers(1, 25),
    gallery_chunk=st.integers(1, 70),
    seed=st.integers(0, 2**31 - 1),
)
def test_chunked_search_equals_brute_force(
    n_query, n_gallery, dim, k, query_chunk, gallery_chunk, seed
):
  # Small integer vectors: every dot product is exact in float32, and equal
  # scores (ties) are frequent, so the lower-index rule is checked exactly.
  rng = np.random.default_rng(seed)
  q = rng.integers(-2, 3, size=(n_query, dim)).astype(np.float32)
  g = rng.integers(-2, 3, size=(n_gallery, dim)).astype(np.float32)
  scores, idx = exact_topk(
      q, g, k, query_chunk=query_chunk, gallery_chunk=gallery_chunk, normalize=False
  )
  ref_scores, ref_idx = brute_force_topk(q, g, k, normalize=False)
  assert idx.shape == (n_query, min(k, n_gallery))
  np.testing.assert_array_equal(idx, ref_idx)
  np.testing.assert_array_equal(scores, ref_scores)


def test_ties_go_to_the_lower_index_across_chunks():
  g = np.tile(np.eye(3, dtype=np.float32), (7, 1))  # rows i and i+3 identical
  q = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]], np.float32)
  _, idx = exact_topk(q, g, 5, query_chunk=1, gallery_chunk=4)
  np.testing.assert_array_equal(idx, [[0, 3, 6, 9, 12], [2, 5, 8, 11, 14]])


def test_cosine_on_float_data_and_float16_gallery():
  rng = np.random.default_rng(0)
  q = rng.normal(size=(33, 48)) * rng.uniform(0.1, 10, size=(33, 1))  # norms vary
  g = rng.normal(size=(257, 48)) * rng.uniform(0.1, 10, size=(257, 1))
  scores, idx = exact_topk(q, g, 20, query_chunk=10, gallery_chunk=50)
  ref_scores, ref_idx = brute_force_topk(q, g, 20)
  np.testing.assert_array_equal(idx, ref_idx)
  np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
  assert np.all(np.diff(scores, axis=1) <= 0)
  # A float16 gallery (half the host memory) gives nearly the same lists.
  _, idx16 = exact_topk(q, g.astype(np.float16), 20, gallery_chunk=64)
  assert recall_at_k(idx16, ref_idx) > 0.95


def test_k_larger_than_gallery_and_no_queries():
  g = np.eye(4, dtype=np.float32)
  scores, idx = exact_topk(np.ones((2, 4), np.float32), g, 100)
  assert idx.shape == (2, 4) and sorted(idx[0].tolist()) == [0, 1, 2, 3]
  scores, idx = exact_topk(np.zeros((0, 4), np.float32), g, 3)
  assert idx.shape == (0, 3)


def test_errors():
  g = np.ones((5, 8), np.float32)
  with pytest.raises(ValueError, match='dimensions differ.*width 4.*width 8'):
    exact_topk(np.ones((2, 4), np.float32), g, 3)
  with pytest.raises(ValueError, match='gallery is empty'):
    exact_topk(np.ones((2, 8), np.float32), np.zeros((0, 8), np.float32), 3)
  with pytest.raises(ValueError, match='k must be >= 1'):
    exact_topk(np.ones((2, 8), np.float32), g, 0)
  with pytest.raises(ValueError, match='dimensions differ'):
    faiss_topk(np.ones((2, 4), np.float32), g, 3)
  with pytest.raises(ValueError, match='gallery is empty'):
    faiss_topk(np.ones((2, 8), np.float32), np.zeros((0, 8), np.float32), 3)


_MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from capture_jax.retrieval.search import exact_topk, brute_force_topk
    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    q = rng.integers(-2, 3, size=(45, 5)).astype(np.float32)
    g = rng.integers(-2, 3, size=(203, 5)).astype(np.float32)
    ref_s, ref_i = brute_force_topk(q, g, 100, normalize=False)
    # Chunks of 8 give one row per device (local top-1), 203 rows is no
    # multiple of 8, and 1000 > N puts the whole gallery in one padded chunk.
    for gallery_chunk in (8, 30, 203, 1000):
        s, i = exact_topk(q, g, 100, query_chunk=16, gallery_chunk=gallery_chunk,
                          normalize=False)
        assert (i == ref_i).all() and (s == ref_s).all(), gallery_chunk
    qf, gf = rng.normal(size=(45, 32)), rng.normal(size=(203, 32))
    _, i = exact_topk(qf, gf, 50, query_chunk=16, gallery_chunk=64)
    assert (i == brute_force_topk(qf, gf, 50)[1]).all()
    print("OK", jax.device_count())
""")


def test_sharded_search_on_8_devices_equals_brute_force():
  env = with_cpu_devices(8)
  proc = subprocess.run(
      [sys.executable, '-c', _MULTI_DEVICE_SCRIPT],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().endswith('OK 8')


@pytest.mark.parametrize('kind', ['ivf', 'hnsw'])
def test_faiss_search_finds_the_exact_neighbours_on_easy_settings(kind):
  rng = np.random.default_rng(0)
  g = rng.normal(size=(600, 16)).astype(np.float32)
  q = rng.normal(size=(40, 16)).astype(np.float32)
  _, exact_idx = exact_topk(q, g, 10)
  # nprobe = nlist visits every list: IVF-flat is then exact.
  scores, idx = faiss_topk(q, g, 10, kind=kind, nlist=8, nprobe=8, ef_search=600)
  assert idx.shape == (40, 10)
  assert recall_at_k(idx, exact_idx) >= (1.0 if kind == 'ivf' else 0.98)
  ref_scores, _ = brute_force_topk(q, g, 10)
  np.testing.assert_allclose(scores[:, 0], ref_scores[:, 0], atol=1e-5)


def test_recall_at_k_by_hand():
  exact = np.array([[1, 2, 3], [4, 5, 6]])
  approx = np.array([[3, 9, 1, 2], [-1, -1, 4, 5]])  # only the first k columns count
  assert recall_at_k(approx, exact) == (2 + 1) / 6  # {3, 1} of row 1, {4} of row 2
  assert recall_at_k(exact, exact) == 1.0
  with pytest.raises(ValueError, match='query counts differ'):
    recall_at_k(approx[:1], exact)


def test_indices_to_ranked_lists():
  got = indices_to_ranked_lists(['q1', 'q2'], ['g0', 'g1', 'g2'], np.array([[2, 0], [1, -1]]))
  assert got == {'q1': ['g2', 'g0'], 'q2': ['g1']}
