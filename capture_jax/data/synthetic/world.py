"""The latent world: sizes (`Preset`, `PRESETS`), difficulty (`WorldParams`), brands and
products, their latent appearance, and the fixed random network from latents to region
features (`make_world`, `region_features`).

A product's latent is the sum of its brand's latent (products of one brand look alike), its
type's and series' latents (keyed by name, so shared across brands) and a smaller
product-specific detail. A region's feature is the network applied to a content latent and its
image's style nuisance. Everything here is O(products) memory and a deterministic function of
the seed; the samples drawn from a world are in `samples.py`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Sequence

import numpy as np

from capture_jax.data.synthetic import words


@dataclasses.dataclass(frozen=True)
class Preset:
  """Sizes of a generated world. Difficulty knobs are in `WorldParams`."""

  num_brands: int
  products_per_brand: tuple[int, int]  # inclusive range
  gallery_per_product: int
  num_train: int
  num_dev: int
  num_test: int
  feature_dim: int
  max_regions: int
  train_multi_fraction: float = 0.5
  max_background: int = 3  # background (clutter) regions per image, at most


# One row a world, in `Preset`'s field order: brands, products per brand (inclusive range),
# gallery images per product, train / dev / test samples, feature width, regions per image.
PRESETS: dict[str, Preset] = {
    # For unit tests: generates in well under a second.
    'tiny': Preset(4, (3, 5), 3, 96, 16, 16, 32, 8, max_background=2),
    # `make demo` on a 2-core CPU: like the real dev set (34 brands, 295
    # labels, ~2.8 labels per query) at a tenth of its gallery.
    'demo': Preset(32, (6, 12), 5, 6000, 300, 300, 256, 16),
    'small': Preset(60, (6, 14), 10, 50_000, 1000, 1000, 256, 36, max_background=8),
    # Product1M's sizes (458 products, ~40k gallery, 2,673 dev and 6,547 test
    # queries) with 1M training pairs. 2048-d features would take ~200 GB of
    # TSV; the default keeps 256 (pass --feature_dim 2048 for the real width).
    'large': Preset(46, (8, 12), 87, 1_000_000, 2673, 6547, 256, 36, max_background=8),
}


@dataclasses.dataclass(frozen=True)
class WorldParams:
  """How hard the world is. The defaults were tuned so that on `demo` both a TF-IDF-over-titles
  and a mean-region-feature baseline land clearly between random and perfect dev mAP@10, their
  fusion beats both, and a trained model beats the fusion (the figures:
  docs/BENCHMARKS.md, "Synthetic world calibration"; tests/test_data_synthetic.py)."""

  latent_dim: int = 32
  style_dim: int = 16
  hidden_dim: int = 256
  # Product latent = sum of these weights times unit Gaussian latents.
  brand_weight: float = 1.0
  type_weight: float = 0.6
  series_weight: float = 0.5
  detail_weight: float = 0.55
  view_noise: float = 0.45  # per-region noise on the product latent
  style_noise: float = 1.6  # per-image nuisance, shared by all its regions
  feature_noise: float = 0.15  # i.i.d. noise in feature space, before the ReLU
  num_background_latents: int = 24
  # Captions.
  p_brand_latin: float = 0.65  # else the Chinese alias
  p_mention_single: float = 0.7  # a gallery / single title names its product
  p_mention_multi: float = 0.5  # each instance of a multi-product title is named
  p_partial_name: float = 0.35  # a named product is named by its type or series only
  p_wrong_product: float = 0.2  # a title names a same-brand product not in the image
  marketing_words: tuple[int, int] = (2, 5)
  p_set_word: float = 0.6  # multi-product titles say "set", "gift box", ...
  # Detector-like regions (`layout.render_regions`).
  max_extra_boxes: int = 3  # per instance, beyond its object box: duplicates and parts
  p_duplicate_box: float = 0.5  # an extra box is a jittered duplicate (else a part box)
  p_span_box: float = 0.35  # a multi-product image has a box spanning two neighbours


@dataclasses.dataclass(frozen=True)
class Product:
  label: str  # "Brand seriestype", like the real "AHC 黄金面霜"
  brand: int
  series: str
  type_index: int  # into words.TYPES; -1 for products read from a real label
  detail: str  # the label without the brand


@dataclasses.dataclass(frozen=True)
class World:
  """Everything that is fixed across samples (small: O(products) memory)."""

  preset: Preset
  params: WorldParams
  brand_names: tuple[str, ...]
  brand_aliases: tuple[str, ...]
  products: tuple[Product, ...]
  product_latents: np.ndarray  # [P, latent_dim]
  background_latents: np.ndarray  # [num_background_latents, latent_dim]
  w1: np.ndarray  # [latent_dim + style_dim, hidden_dim]
  b1: np.ndarray
  w2: np.ndarray  # [hidden_dim, feature_dim]
  b2: np.ndarray
  brand_products: tuple[tuple[int, ...], ...]  # product indices of each brand

  @property
  def feature_dim(self) -> int:
    return int(self.w2.shape[1])


def string_rng(*parts: object) -> np.random.Generator:
  """A generator seeded by strings, independent of the order things are read."""
  digest = hashlib.sha256('\x1f'.join(map(str, parts)).encode()).digest()
  return np.random.default_rng(np.frombuffer(digest[:16], np.uint32))


def _brand_name(rng: np.random.Generator, taken: set[str]) -> str:
  while True:
    if rng.random() < 0.2:  # acronym brands, like AHC or CEMOY
      name = ''.join(rng.choice(list('ABCDEFGHKLMNPRSTVWXYZ'), size=rng.integers(2, 5)))
    else:
      name = ''.join(rng.choice(words.LATIN_SYLLABLES, size=rng.integers(2, 4))).capitalize()
    if name.lower() not in taken:
      taken.add(name.lower())
      return name


def _alias(rng: np.random.Generator, taken: set[str]) -> str:
  while True:
    name = ''.join(rng.choice(list(words.ALIAS_CHARS), size=rng.integers(2, 4)))
    if name not in taken:
      taken.add(name)
      return name


def _network(rng: np.random.Generator, params: WorldParams, feature_dim: int):
  """The fixed random map latent -> region feature: weights and biases."""
  d_in = params.latent_dim + params.style_dim
  w1 = rng.normal(0, 1.6 / np.sqrt(d_in), (d_in, params.hidden_dim)).astype(np.float32)
  b1 = rng.normal(0, 0.3, params.hidden_dim).astype(np.float32)
  w2 = rng.normal(0, 2.0 / np.sqrt(params.hidden_dim), (params.hidden_dim, feature_dim)).astype(
      np.float32
  )
  b2 = np.full(feature_dim, -0.3, np.float32)  # ReLU sparsity, as in pooled CNN features
  return w1, b1, w2, b2


def _product_latents(
    products: Sequence[Product], brand_latent: np.ndarray, seed: int, params: WorldParams
) -> np.ndarray:
  """[P, latent_dim]: brand + type + series + detail, each a seeded Gaussian.

  Type and series latents are keyed by their names, so a "黄金" series looks
  alike across brands and a cream looks like a cream.
  """
  d = params.latent_dim
  out = np.zeros((len(products), d), np.float32)
  for i, p in enumerate(products):
    type_key = words.TYPES[p.type_index][0] if p.type_index >= 0 else p.detail[-2:]
    out[i] = (
        params.brand_weight * brand_latent[p.brand]
        + params.type_weight * string_rng(seed, 'type', type_key).normal(size=d)
        + params.series_weight * string_rng(seed, 'series', p.series).normal(size=d)
        + params.detail_weight * string_rng(seed, 'detail', p.label).normal(size=d)
    )
  return out


def _real_products(real_labels: Sequence[str]) -> tuple[list[str], list[str], list[Product]]:
  """(brand names, aliases, products) of real label strings ("Brand product name"); the brand
  is the text before the first space."""
  names: list[str] = []
  aliases: list[str] = []
  products: list[Product] = []
  brand_of: dict[str, int] = {}
  for label in sorted(set(real_labels)):
    brand, _, detail = label.strip().partition(' ')
    detail = detail.strip() or brand
    if brand not in brand_of:
      brand_of[brand] = len(names)
      names.append(brand)
      # Titles of real brands name them as the labels do; a lower-cased
      # variant plays the role of the alias (real titles write "ahc").
      aliases.append(brand.lower() if brand.isascii() else brand)
    products.append(Product(label, brand_of[brand], detail[:2], -1, detail))
  return names, aliases, products


def _drawn_products(
    rng: np.random.Generator, preset: Preset
) -> tuple[list[str], list[str], list[Product]]:
  """(brand names, aliases, products) of `preset.num_brands` drawn brands, each with a drawn
  number of products, every one a distinct (series, type) of 2 or 3 series of its brand."""
  names: list[str] = []
  aliases: list[str] = []
  products: list[Product] = []
  taken: set[str] = set()
  taken_alias: set[str] = set()
  for b in range(preset.num_brands):
    names.append(_brand_name(rng, taken))
    aliases.append(_alias(rng, taken_alias))
    n = int(rng.integers(preset.products_per_brand[0], preset.products_per_brand[1] + 1))
    series = rng.choice(len(words.SERIES), size=int(rng.integers(2, 4)), replace=False)
    combos = [(s, t) for s in series for t in range(len(words.TYPES))]
    for k in rng.choice(len(combos), size=min(n, len(combos)), replace=False):
      s, t = combos[k]
      detail = words.SERIES[s] + words.TYPES[t][0]
      products.append(Product(f'{names[b]} {detail}', b, words.SERIES[s], t, detail))
  return names, aliases, products


def make_world(
    preset: Preset,
    seed: int = 0,
    params: WorldParams = WorldParams(),
    real_labels: Sequence[str] | None = None,
) -> World:
  """Brands, products, latents and the feature network of a world.

  Args:
    preset: sizes.
    seed: everything is a deterministic function of it.
    params: difficulty.
    real_labels: if given, the products are these label strings ("Brand
      product name"); the brand is the text before the first space.
  """
  rng = np.random.default_rng([seed, 7])
  if real_labels is not None:
    names, aliases, products = _real_products(real_labels)
  else:
    names, aliases, products = _drawn_products(rng, preset)
  brand_latent = np.stack(
      [string_rng(seed, 'brand', n).normal(size=params.latent_dim) for n in names]
  ).astype(np.float32)
  latents = _product_latents(products, brand_latent, seed, params)
  background = rng.normal(size=(params.num_background_latents, params.latent_dim))
  background = (
      background * np.linalg.norm(latents, axis=1).mean() / np.sqrt(params.latent_dim)
  ).astype(np.float32)
  w1, b1, w2, b2 = _network(np.random.default_rng([seed, 11]), params, preset.feature_dim)
  by_brand: list[list[int]] = [[] for _ in names]
  for i, p in enumerate(products):
    by_brand[p.brand].append(i)
  return World(
      preset,
      params,
      tuple(names),
      tuple(aliases),
      tuple(products),
      latents,
      background,
      w1,
      b1,
      w2,
      b2,
      tuple(tuple(x) for x in by_brand),
  )


def region_features(
    world: World, latents: np.ndarray, style: np.ndarray, noise: np.ndarray
) -> np.ndarray:
  """Features of regions given their content latents and their image's style.

  Args:
    latents: [N, latent_dim] content of each region (product or clutter).
    style: [N, style_dim] the nuisance of each region's image (shared by the
      regions of one image).
    noise: [N, feature_dim] feature-space noise, added before the ReLU.
  Returns:
    [N, feature_dim] float32, non-negative.
  """
  x = np.concatenate([latents, style], axis=1).astype(np.float32)
  h = np.tanh(x @ world.w1 + world.b1)
  return np.maximum(h @ world.w2 + world.b2 + noise, 0.0).astype(np.float32)
