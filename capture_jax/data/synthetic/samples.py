"""The samples of a world's splits: which products an image holds, its regions and title,
drawn from the sample's own RNG (`make_sample`), and the streaming of a whole split
(`iter_split`).

gallery: one product each, `gallery_per_product` images per product, in product order;
train: single- or multi-product (`Preset.train_multi_fraction`), no labels; dev and test:
multi-product queries of 2 to 7 instances of one brand, as in every real dev query. Every
sample is a pure function of (world, seed, split, index), so a split streams in bounded
memory and any sample can be drawn alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import numpy as np

from capture_jax.data import formats
from capture_jax.data.synthetic import layout
from capture_jax.data.synthetic import titles
from capture_jax.data.synthetic import world as world_lib
from capture_jax.data.synthetic.world import World


@dataclasses.dataclass
class Sample:
  """One image of a split: its annotation line, its regions (features computed) and which
  regions are which product instance (its sidecar line)."""

  annotation: formats.Annotation
  regions: formats.RegionFeatures
  instances: list[formats.Instance]


@dataclasses.dataclass
class Draft:
  """A sample whose region features are not computed yet: they are computed
  for many samples in one matrix product (`finish`), as tiny per-sample
  products are slow (and slower still with a threaded BLAS on a busy host)."""

  annotation: formats.Annotation
  regions: formats.RegionFeatures  # features still empty
  instances: list[formats.Instance]
  latents: np.ndarray  # [N, latent_dim], in the final region order
  style: np.ndarray  # [style_dim]
  noise: np.ndarray  # [N, feature_dim]


def item_id_of(split: str, index: int) -> str:
  """12-digit numeric ids like Product1M's, unique across splits."""
  return f'{formats.SPLITS.index(split) + 1}{index:011d}'


def _url(item_id: str) -> tuple[str, str]:
  return (
      f'https://img.example.invalid/product1m/{item_id}.jpg',
      f'http://mirror.example.invalid/product1m/datasets/images/{item_id}.jpg',
  )


def _num_instances(rng: np.random.Generator) -> int:
  """2..7 instances, mostly 2 or 3 (the real dev distribution)."""
  return int(rng.choice(np.arange(2, 8), p=[0.45, 0.34, 0.11, 0.06, 0.02, 0.02]))


def _multi_products(world: World, rng: np.random.Generator, n: int) -> list[int]:
  """n product instances of one random brand; a product may repeat (as in
  real queries) when the brand has fewer products or by chance."""
  brand = int(rng.integers(len(world.brand_names)))
  pool = world.brand_products[brand]
  ids = list(rng.choice(pool, size=min(n, len(pool)), replace=False))
  while len(ids) < n or (rng.random() < 0.05 and len(ids) < 7):
    ids.append(ids[int(rng.integers(len(ids)))])
  return [int(i) for i in ids]


def finish(world: World, drafts: Sequence[Draft]) -> list[Sample]:
  """Computes the region features of drafts, all in one matrix product."""
  if not drafts:
    return []
  latents = np.concatenate([d.latents for d in drafts])
  style = np.concatenate(
      [np.broadcast_to(d.style, (len(d.latents), d.style.shape[0])) for d in drafts]
  )
  feats = world_lib.region_features(
      world, latents, style, np.concatenate([d.noise for d in drafts])
  )
  out, start = [], 0
  for d in drafts:
    n = len(d.latents)
    regions = dataclasses.replace(d.regions, features=feats[start : start + n])
    out.append(Sample(d.annotation, regions, d.instances))
    start += n
  return out


def make_sample(world: World, seed: int, split: str, index: int, **overrides: Any) -> Sample:
  """One sample of a split, a pure function of (world, seed, split, index); `overrides` are
  `draw`'s (`product_ids`, `title`, `item_id`).

  (`iter_split` computes features 128 samples per matrix product; those may
  differ from a lone sample's in the last float bits.)
  """
  return finish(world, [draw(world, seed, split, index, **overrides)])[0]


def draw(
    world: World,
    seed: int,
    split: str,
    index: int,
    *,
    product_ids: Sequence[int] | None = None,
    title: str | None = None,
    item_id: str | None = None,
) -> Draft:
  """All random draws of one sample, from its own RNG (seed, split, index).

  gallery: a single product (product `index // gallery_per_product`); train:
  single- or multi-product; dev/test: multi-product queries. `product_ids`,
  `title` and `item_id` override the drawn ones (used for real queries).
  """
  rng = np.random.default_rng([seed, formats.SPLITS.index(split) + 1, index])
  if product_ids is None:
    if split == 'gallery':
      product_ids = [index // world.preset.gallery_per_product]
    elif split == 'train' and rng.random() >= world.preset.train_multi_fraction:
      product_ids = [int(rng.integers(len(world.products)))]
    else:
      product_ids = _multi_products(world, rng, _num_instances(rng))
  item_id = item_id or item_id_of(split, index)
  regions, instances, latents, style, noise = layout.render_regions(
      world, rng, item_id, product_ids
  )
  title = title or titles.make_title(world, rng, product_ids)
  labels = () if split == 'train' else tuple(world.products[i].label for i in product_ids)
  url, mirror = _url(item_id)
  return Draft(
      formats.Annotation(item_id, title, url, mirror, labels),
      regions,
      instances,
      latents,
      style,
      noise,
  )


def split_sizes(world: World) -> dict[str, int]:
  """How many samples each split of the world draws (real queries replace these)."""
  p = world.preset
  return {
      'train': p.num_train,
      'gallery': len(world.products) * p.gallery_per_product,
      'dev': p.num_dev,
      'test': p.num_test,
  }


def iter_split(
    world: World,
    seed: int,
    split: str,
    queries: Sequence[formats.Annotation] | None = None,
    chunk: int = 128,
) -> Iterator[Sample]:
  """Streams the samples of a split, `chunk` at a time (bounded memory).

  `queries` replaces the drawn samples (real titles and label sets, with
  regions rendered from their labels).
  """
  if queries is not None:
    index_of = {p.label: i for i, p in enumerate(world.products)}

    def draft_of(i: int) -> Draft:
      q = queries[i]
      d = draw(
          world,
          seed,
          split,
          i,
          product_ids=[index_of[l] for l in q.labels],
          title=q.title,
          item_id=q.item_id,
      )
      return dataclasses.replace(d, annotation=q)

    total = len(queries)
  else:
    draft_of = lambda i: draw(world, seed, split, i)
    total = split_sizes(world)[split]
  for start in range(0, total, chunk):
    yield from finish(world, [draft_of(i) for i in range(start, min(start + chunk, total))])
