"""Weak, fuzzy e-commerce titles (`make_title`).

A title names the brand (its Latin name or its Chinese alias), some but not all of the
products in the image (sometimes only their type or series, with synonyms), sometimes a
same-brand product that is not in the image, and marketing words that carry no visual
information but look like rare, informative words to TF-IDF. The probabilities are
`WorldParams`' caption fields.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from capture_jax.data.synthetic import words
from capture_jax.data.synthetic.world import World


def _product_phrase(world: World, rng: np.random.Generator, pid: int) -> str:
  """How a title names a product: full name, or type or series only; synonyms."""
  prod = world.products[pid]
  if prod.type_index < 0:  # a real label: keep a random contiguous part of it
    d = prod.detail
    if rng.random() < world.params.p_partial_name and len(d) > 2:
      n = int(rng.integers(2, len(d)))
      s = int(rng.integers(0, len(d) - n + 1))
      return d[s : s + n]
    return d
  synonyms = words.TYPES[prod.type_index]
  type_name = synonyms[int(rng.integers(len(synonyms)))]
  if rng.random() < world.params.p_partial_name:
    return type_name if rng.random() < 0.6 else prod.series
  return prod.series + type_name


def make_title(world: World, rng: np.random.Generator, product_ids: Sequence[int]) -> str:
  """A weak, fuzzy e-commerce title for an image holding these products."""
  p = world.params
  brand = world.products[product_ids[0]].brand
  multi = len(product_ids) > 1
  p_mention = p.p_mention_multi if multi else p.p_mention_single
  named = [pid for pid in dict.fromkeys(product_ids) if rng.random() < p_mention]
  phrases = [_product_phrase(world, rng, pid) for pid in named]
  others = [q for q in world.brand_products[brand] if q not in product_ids]
  if others and rng.random() < p.p_wrong_product:
    phrases.append(_product_phrase(world, rng, others[int(rng.integers(len(others)))]))
  brand_name = (
      world.brand_names[brand] if rng.random() < p.p_brand_latin else world.brand_aliases[brand]
  )
  n_mkt = int(rng.integers(p.marketing_words[0], p.marketing_words[1] + 1))
  # Zipf-like choice: a few marketing words are everywhere, most are rare.
  ranks = np.minimum(rng.zipf(1.3, size=n_mkt) - 1, len(words.MARKETING) - 1)
  marketing = [words.MARKETING[(int(r) * 7 + brand) % len(words.MARKETING)] for r in ranks]
  if multi and rng.random() < p.p_set_word:
    marketing.append(words.SET_WORDS[int(rng.integers(len(words.SET_WORDS)))])
  rng.shuffle(phrases)
  rng.shuffle(marketing)
  cut = int(rng.integers(0, min(2, len(marketing)) + 1))
  parts = marketing[:cut] + [brand_name] + phrases + marketing[cut:]
  title = ''
  for part in parts:  # no spaces, as real titles, except between Latin runs
    if title and title[-1].isascii() and title[-1].isalnum() and part[0].isascii():
      title += ' '
    title += part
  return title
