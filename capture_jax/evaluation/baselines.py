"""Baseline embeddings that go through the same search and metrics as CAPTURE.

* Text only: TF-IDF over titles. Chinese has no spaces, so runs of CJK
  characters give character unigrams and bigrams (the usual choice for
  Chinese retrieval without a segmenter); runs of Latin letters and digits
  (brand names, model numbers such as ``AHC``, ``24K``) give whole lowercase
  words. Titles are NFKC-normalised first, so full-width ``ＡＨＣ`` == ``AHC``.
* Visual only: the masked mean of a sample's region features.

Both return dense, L2-normalised float arrays, so cosine search is a dot
product and ``exact_topk`` needs nothing special. The TF-IDF vocabulary is
capped (``max_features`` most frequent terms by document frequency) to keep
the dense matrix small: 40,033 gallery titles x 8,192 terms is 1.3 GB as
float32, 0.66 GB as float16.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from capture_jax.evaluation.search import l2_normalize

# CJK Unified Ideographs (+ extension A, compatibility ideographs).
_TOKEN_RE = re.compile(r'([\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+)|([0-9a-z]+)')


def title_tokens(title: str) -> list[str]:
  """Tokens of one title: CJK character unigrams + bigrams, Latin/digit words.

  >>> title_tokens("韩国AHC黄金 水")
  ['韩', '国', '韩国', 'ahc', '黄', '金', '黄金', '水']
  """
  text = unicodedata.normalize('NFKC', title).lower()
  tokens: list[str] = []
  for cjk, word in _TOKEN_RE.findall(text):
    if word:
      tokens.append(word)
    else:
      tokens.extend(cjk)
      tokens.extend(cjk[i : i + 2] for i in range(len(cjk) - 1))
  return tokens


@dataclasses.dataclass(frozen=True)
class TfidfModel:
  """A fitted vocabulary (term -> column) and its idf weights [V]."""

  vocabulary: dict[str, int]
  idf: np.ndarray


def fit_tfidf(
    titles: Sequence[str], *, max_features: int | None = 8192, min_df: int = 1
) -> TfidfModel:
  """Fits idf on ``titles`` (the gallery: the documents searched).

  idf(t) = ln((1 + n) / (1 + df(t))) + 1, the smoothed form used by
  scikit-learn, so that a term in every document keeps a small weight.
  The vocabulary keeps the ``max_features`` terms of highest document
  frequency (ties by term, for determinism), then orders columns by term.
  """
  if not titles:
    raise ValueError('cannot fit TF-IDF on an empty list of titles')
  df: Counter[str] = Counter()
  for title in titles:
    df.update(set(title_tokens(title)))
  terms = [t for t, c in df.items() if c >= min_df]
  if max_features is not None and len(terms) > max_features:
    terms = sorted(terms, key=lambda t: (-df[t], t))[:max_features]
  terms.sort()
  if not terms:
    raise ValueError('the titles hold no token: the TF-IDF vocabulary is empty')
  vocabulary = {t: i for i, t in enumerate(terms)}
  counts = np.array([df[t] for t in terms], np.float64)
  idf = np.log((1.0 + len(titles)) / (1.0 + counts)) + 1.0
  return TfidfModel(vocabulary, idf)


def tfidf_embed(
    model: TfidfModel, titles: Sequence[str], *, dtype: np.dtype = np.float32, chunk: int = 4096
) -> np.ndarray:
  """Dense L2-normalised TF-IDF rows [len(titles), V] (raw term counts x idf).

  Computed sparsely, ``chunk`` titles at a time: the (row, term) pairs are
  counted with ``np.unique``, weighted, normalised per row in float64 and
  scattered into the zero-initialised result, which is the only large array.
  A title with no known term is a zero row (it scores 0 with everything).
  """
  n_terms = len(model.vocabulary)
  out = np.zeros((len(titles), n_terms), dtype)
  flat_out = out.reshape(-1)
  for start in range(0, len(titles), chunk):
    rows = min(chunk, len(titles) - start)
    flat = [
        row * n_terms + model.vocabulary[t]
        for row, title in enumerate(titles[start : start + rows])
        for t in title_tokens(title)
        if t in model.vocabulary
    ]
    cells, counts = np.unique(np.asarray(flat, np.int64), return_counts=True)
    row, col = np.divmod(cells, n_terms)
    weight = counts * model.idf[col]
    norm = np.sqrt(np.bincount(row, weights=weight * weight, minlength=rows))
    flat_out[start * n_terms + cells] = weight / norm[row]
  return out


def tfidf_embeddings(
    query_titles: Sequence[str],
    gallery_titles: Sequence[str],
    *,
    max_features: int | None = 8192,
    dtype: np.dtype = np.float32,
) -> tuple[np.ndarray, np.ndarray]:
  """Query [Q, V] and gallery [N, V] TF-IDF embeddings, idf fitted on the gallery."""
  model = fit_tfidf(gallery_titles, max_features=max_features)
  return tfidf_embed(model, query_titles, dtype=dtype), tfidf_embed(
      model, gallery_titles, dtype=dtype
  )


def mean_region_embedding(features: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
  """L2-normalised masked mean of region features.

  Args:
    features: [B, R, F] region features.
    mask: [B, R], true (or 1) for real regions; None means all real.

  Returns:
    [B, F] float32; a sample without regions gives a zero row.
  """
  features = np.asarray(features, np.float32)
  if features.ndim != 3:
    raise ValueError(f'features must be [batch, regions, dim], got {features.shape}')
  if mask is None:
    mask = np.ones(features.shape[:2], np.float32)
  mask = np.asarray(mask, np.float32)
  if mask.shape != features.shape[:2]:
    raise ValueError(f'mask shape {mask.shape} does not match features {features.shape[:2]}')
  total = np.einsum('brf,br->bf', features, mask)
  mean = total / np.maximum(mask.sum(axis=1, keepdims=True), 1.0)
  return l2_normalize(mean)


def mean_region_embeddings(
    samples: Iterable[tuple[np.ndarray, np.ndarray | None]],
) -> np.ndarray:
  """The same for samples of varying region counts: (features [R_i, F],
  mask [R_i] or None) pairs -> [B, F] float32."""
  rows = [
      mean_region_embedding(f[None], None if m is None else np.asarray(m)[None])[0]
      for f, m in samples
  ]
  if not rows:
    raise ValueError('no samples given')
  return np.stack(rows)
