"""Baselines: TF-IDF over titles and the mean region feature."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from capture_jax.retrieval import baselines
from capture_jax.retrieval.metrics import evaluate_ranked_lists, read_annotations
from capture_jax.retrieval.search import exact_topk, indices_to_ranked_lists

SHARED = Path(__file__).resolve().parents[1].parent / 'shared'
DEV_FILE = SHARED / 'product1m' / 'product1m_dev_ossurl_v2.txt'

TITLES = [
    '韩国AHC黄金套盒 水乳',
    'ＡＨＣ黄金眼霜',
    '兰蔻小黑瓶精华 50ml',
    '雅诗兰黛 小棕瓶 精华',
    'AHC 水乳 套装',
    '欧莱雅 面霜',
    '兰蔻 面霜 50ml',
]


def test_title_tokens():
  assert baselines.title_tokens('韩国AHC黄金 水') == [
      '韩',
      '国',
      '韩国',
      'ahc',
      '黄',
      '金',
      '黄金',
      '水',
  ]
  # NFKC folds full-width letters; digits and letters stay one word.
  assert baselines.title_tokens('ＡＨＣ 24K精华') == ['ahc', '24k', '精', '华', '精华']
  assert baselines.title_tokens('!! --') == []


def test_tfidf_weights_by_the_definition():
  """Counts x smoothed idf, L2-normalised, written out by hand for one title."""
  model = baselines.fit_tfidf(TITLES, max_features=None)
  emb = baselines.tfidf_embed(model, ['AHC 水乳 水'], dtype=np.float64)[0]
  vocab = model.vocabulary_
  df = {t: sum(t in baselines.title_tokens(x) for x in TITLES) for t in ('ahc', '水', '乳', '水乳')}
  idf = {t: np.log((1 + len(TITLES)) / (1 + d)) + 1 for t, d in df.items()}
  raw = {'ahc': idf['ahc'], '水': 2 * idf['水'], '乳': idf['乳'], '水乳': idf['水乳']}
  norm = np.sqrt(sum(v * v for v in raw.values()))
  for term, weight in raw.items():
    assert emb[vocab[term]] == pytest.approx(weight / norm, abs=1e-12)
  assert np.count_nonzero(emb) == 4


def test_tfidf_vocabulary_cap_keeps_most_frequent_terms():
  model = baselines.fit_tfidf(TITLES, max_features=3)
  # Only "ahc", "霜" and "兰" occur three times; every other term at most twice.
  assert model.vocabulary_ == {'ahc': 0, '兰': 1, '霜': 2}
  # idf = ln((1 + 7) / (1 + 3)) + 1 for each of them.
  np.testing.assert_allclose(model.idf_, np.log(8 / 4) + 1)
  emb = baselines.tfidf_embed(model, ['没有 词'])
  assert emb.shape == (1, 3) and not emb.any()  # unknown terms: a zero row


def test_tfidf_refuses_titles_without_tokens():
  with pytest.raises(ValueError, match='TF-IDF vocabulary is empty'):
    baselines.fit_tfidf(['!! --', '...'])


def test_tfidf_retrieval_end_to_end():
  gallery_titles = ['AHC 黄金眼霜', '兰蔻小黑瓶精华', '雅诗兰黛小棕瓶', '欧莱雅面霜']
  gallery_labels = {'g0': 'ahc_eye', 'g1': 'lancome', 'g2': 'estee', 'g3': 'loreal'}
  q, g = baselines.tfidf_embeddings(['兰蔻 小黑瓶 套装', '韩国AHC黄金眼霜'], gallery_titles)
  np.testing.assert_allclose(np.linalg.norm(g, axis=1), 1.0, rtol=1e-6)
  _, idx = exact_topk(q, g, 4)
  assert idx[:, 0].tolist() == [1, 0]
  ranked = indices_to_ranked_lists(['q0', 'q1'], list(gallery_labels), idx)
  got = evaluate_ranked_lists(ranked, {'q0': ['lancome'], 'q1': ['ahc_eye']}, gallery_labels)
  assert got['mAP@10'] == 1.0


@pytest.mark.skipif(not DEV_FILE.is_file(), reason='shared Product1M dev file not present')
def test_tfidf_on_real_dev_titles():
  titles = [a.title for a in read_annotations(DEV_FILE)]
  model = baselines.fit_tfidf(titles, max_features=2048)
  emb = baselines.tfidf_embed(model, titles[:500], dtype=np.float16)
  assert emb.shape == (500, 2048) and emb.dtype == np.float16
  _, idx = exact_topk(emb, baselines.tfidf_embed(model, titles), 1)
  # A title's nearest title is itself (or an identical title).
  assert np.mean(idx[:, 0] == np.arange(500)) > 0.9


def test_mean_region_embedding():
  feats = np.array(
      [[[1.0, 0.0], [3.0, 4.0], [100.0, 100.0]], [[0.0, 2.0], [0.0, 0.0], [0.0, 0.0]]], np.float32
  )
  mask = np.array([[1, 1, 0], [0, 0, 0]])
  emb = baselines.mean_region_embedding(feats, mask)
  # Sample 0: mean of the two real regions (2, 2) -> (1, 1) / sqrt(2); sample 1: no region.
  np.testing.assert_allclose(emb, [[2**-0.5, 2**-0.5], [0.0, 0.0]], rtol=1e-6)
  varying = baselines.mean_region_embeddings([(feats[0, :2], None), (feats[1, :1], [True])])
  np.testing.assert_allclose(varying, [[2**-0.5, 2**-0.5], [0.0, 1.0]], rtol=1e-6)
  with pytest.raises(ValueError, match='mask shape'):
    baselines.mean_region_embedding(feats, mask[:, :2])
