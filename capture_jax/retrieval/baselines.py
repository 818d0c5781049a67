"""Baseline embeddings that go through the same search and metrics as CAPTURE.

* Text only: TF-IDF over titles. Chinese has no spaces, so runs of CJK
  characters give character unigrams and bigrams (the usual choice for
  Chinese retrieval without a segmenter); runs of Latin letters and digits
  (brand names, model numbers such as ``AHC``, ``24K``) give whole lowercase
  words. Titles are NFKC-normalised first, so full-width ``ＡＨＣ`` == ``AHC``.
* Visual only: the masked mean of a sample's region features.

Both return dense, L2-normalised float arrays, so cosine search is a dot
product and ``exact_topk`` needs nothing special. The TF-IDF vocabulary is
capped (``max_features`` most frequent terms) to keep the dense matrix small: 40,033 gallery titles x 8,192 terms is 1.3 GB as
float32, 0.66 GB as float16.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import ml_collections
import numpy as np

from capture_jax import losses

if TYPE_CHECKING:
  from sklearn.feature_extraction import text

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


def fit_tfidf(titles: Sequence[str], *, max_features: int | None = 8192) -> text.TfidfVectorizer:
  """scikit-learn's `TfidfVectorizer` over `title_tokens`, fitted on `titles` (the gallery:
  the documents searched).

  Its defaults are the baseline's definition: raw term counts, smoothed
  idf(t) = ln((1 + n) / (1 + df(t))) + 1, L2-normalised rows; the vocabulary
  keeps the `max_features` terms most frequent over the titles.
  """
  # Imported here: scikit-learn (with SciPy) takes ~1 s of every start of a command that imports
  # the evaluation, and only an evaluation with baselines fits a TF-IDF.
  from sklearn.feature_extraction import text  # pylint: disable=import-outside-toplevel,redefined-outer-name

  if not titles:
    raise ValueError('cannot fit TF-IDF on an empty list of titles')
  vectorizer = text.TfidfVectorizer(analyzer=title_tokens, max_features=max_features)
  try:
    return vectorizer.fit(titles)
  except ValueError as err:  # scikit-learn: 'empty vocabulary'
    raise ValueError(f'the titles hold no token: the TF-IDF vocabulary is empty ({err})') from None


def tfidf_embed(
    model: text.TfidfVectorizer, titles: Sequence[str], *, dtype: np.dtype = np.float32
) -> np.ndarray:
  """Dense L2-normalised TF-IDF rows [len(titles), V]; a title with no known term is a zero
  row (it scores 0 with everything)."""
  return model.transform(titles).toarray().astype(dtype, copy=False)


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
  return np.asarray(losses.l2_normalize(mean), np.float32)


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


def split_mean_regions(config: ml_collections.ConfigDict, source, ids: Sequence[str]) -> np.ndarray:
  """[len(ids), F] masked mean of the region features (the model's visual input, global token
  excluded) of the items `ids` of the split `source`, read through the evaluation pipeline."""
  from capture_jax.data import eval_input  # pylint: disable=import-outside-toplevel

  it = eval_input.make_eval_iterator(
      config, source.split, process_index=0, process_count=1, source=source
  )
  found: dict[str, np.ndarray] = {}
  for batch in it:
    valid = batch.is_valid.astype(bool)
    vectors = mean_region_embedding(
        batch.inputs['image_feat'][valid, 1:], batch.inputs['image_mask'][valid, 1:]
    )
    found.update(zip(map(str, batch.item_id[valid]), vectors))
  missing = [i for i in ids if i not in found]
  if missing:
    raise ValueError(
        f'{len(missing)} exported id(s) are not in the {source.split} split, e.g. {missing[:5]}'
    )
  if not ids:
    return np.zeros((0, config.data.feature_dim), np.float32)
  return np.stack([found[i] for i in ids])


def baseline_vectors(
    baseline: str,
    config: ml_collections.ConfigDict,
    titles: Mapping[str, str],
    queries: tuple[Any, Sequence[str]],
    gallery: tuple[Any, Sequence[str]],
) -> tuple[np.ndarray, np.ndarray]:
  """A baseline's (query vectors [Q, F], gallery vectors [N, F]), in the order of the ids.

  Args:
    baseline: 'tfidf' (titles; idf fitted on the gallery) or 'mean_region' (region features).
    titles: item id -> title (the ground truth's annotations).
    queries, gallery: (the split's open source, its ids).
  """
  (query_source, query_ids), (gallery_source, gallery_ids) = queries, gallery
  if baseline == 'tfidf':
    titles_of = lambda ids: [titles.get(i, '') for i in ids]
    return tfidf_embeddings(
        titles_of(query_ids),
        titles_of(gallery_ids),
        max_features=config.eval.tfidf_max_features,
    )
  if baseline == 'mean_region':
    return (
        split_mean_regions(config, query_source, query_ids),
        split_mean_regions(config, gallery_source, gallery_ids),
    )
  raise ValueError(f'unknown baseline {baseline!r}')
