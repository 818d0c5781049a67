"""Detector-like regions of one image: where its products stand, the boxes a detector writes
for them (object, duplicate and part boxes, a box spanning two neighbours, clutter) and which
content latent each box shows (`render_regions`).

Modelled on bottom-up-attention (Faster R-CNN, Visual Genome) output, which does not write one
clean box per object. Boxes are `(x1, y1, x2, y2)` in pixels, as in the region-feature files.
The features themselves are computed later, many samples at a time (`samples.finish`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from capture_jax.data import boxes as boxes_lib
from capture_jax.data import formats
from capture_jax.data.synthetic.world import World


def _random_box(
    rng: np.random.Generator, w: int, h: int, lo: float, hi: float, inside: np.ndarray | None = None
) -> np.ndarray:
  """A pixel box of relative size in [lo, hi], inside `inside` (default: image)."""
  x0, y0, x1, y1 = (0.0, 0.0, float(w), float(h)) if inside is None else inside
  bw = (x1 - x0) * rng.uniform(lo, hi)
  bh = (y1 - y0) * rng.uniform(lo, hi)
  bx = x0 + rng.uniform(0, x1 - x0 - bw)
  by = y0 + rng.uniform(0, y1 - y0 - bh)
  return np.array([bx, by, bx + bw, by + bh], np.float32)


def _jittered_box(rng: np.random.Generator, box: np.ndarray, w: int, h: int) -> np.ndarray:
  """A duplicate detection of `box`: each edge moved independently, IoU in [0.5, 0.9].

  Bottom-up-attention keeps up to ~100 boxes per image after per-class NMS;
  several of them are the same object under different classes, shifted and
  rescaled a little. The draw is retried until the IoU is in range (it is
  after one or two tries); the fallback is a box shrunk to IoU 0.7.
  """
  x0, y0, x1, y1 = (float(v) for v in box)
  bw, bh = x1 - x0, y1 - y0
  for _ in range(8):
    d = rng.uniform(-0.18, 0.18, 4) * np.array([bw, bh, bw, bh])
    cand = np.array([x0 + d[0], y0 + d[1], x1 + d[2], y1 + d[3]], np.float64)
    cand = np.clip(cand, 0.0, [w, h, w, h])
    if (
        cand[2] - cand[0] > 1
        and cand[3] - cand[1] > 1
        and 0.5 <= boxes_lib.iou_matrix(np.stack([cand, box]))[0, 1] <= 0.9
    ):
      return cand.astype(np.float32)
  s = (1 - np.sqrt(0.7)) / 2
  return np.array([x0 + s * bw, y0 + s * bh, x1 - s * bw, y1 - s * bh], np.float32)


def _layout(rng: np.random.Generator, w: int, h: int, n: int) -> np.ndarray:
  """[n, 4] object boxes of n products standing side by side, as in a product
  portfolio photo: one row (two for more than four), neighbours that leave a
  small gap, touch or overlap (occlusion) by up to ~15% of their width."""
  rows = 1 if n <= 4 else 2
  per_row = [n // rows + (1 if r < n % rows else 0) for r in range(rows)]
  out = []
  row_h = h / rows
  for r, k in enumerate(per_row):
    span = w * rng.uniform(0.6, 0.95)
    widths = rng.uniform(0.7, 1.3, k)
    gaps = rng.uniform(-0.15, 0.06, max(k - 1, 0))  # < 0: overlap, ~0: touching
    slot = span / (widths.sum() + gaps.sum()) if k else 0.0
    x = rng.uniform(0, w - span)
    for i in range(k):
      bw = widths[i] * slot
      bh = row_h * rng.uniform(0.45, 0.9)
      y1 = r * row_h + row_h * rng.uniform(0.92, 1.0)  # standing on a shelf
      out.append([x, max(0.0, y1 - bh), min(float(w), x + bw), y1])
      if i < k - 1:
        x += bw + gaps[i] * slot
  return np.clip(np.array(out, np.float64), 0.0, [w, h, w, h]).astype(np.float32)


def _clutter_box(rng: np.random.Generator, w: int, h: int, objects: np.ndarray) -> np.ndarray:
  """A background box of object-like size: of 4 random tries, the first that overlaps the
  products least (highest IoU with any of the [n, 4] `objects`); clutter is mostly beside
  the products."""
  tries = np.stack([_random_box(rng, w, h, 0.15, 0.45) for _ in range(4)])
  overlap = boxes_lib.iou_matrix(np.concatenate([tries, objects]))[:4, 4:].max(axis=1, initial=0.0)
  return tries[int(np.argmin(overlap))]


def _region_budget(
    rng: np.random.Generator, world: World, n_inst: int
) -> tuple[int, bool, np.ndarray]:
  """(background boxes, whether a box spans two neighbours, [n_inst] boxes per instance).

  At most `preset.max_regions` in all: one object box per instance first (background is
  dropped before an instance goes unseen), then the background, the spanning box and, in a
  random instance order, the extra boxes while the budget lasts.
  """
  p, preset = world.params, world.preset
  n_bg = int(rng.integers(1, preset.max_background + 1))
  budget = preset.max_regions - n_bg
  if budget < n_inst:  # drop background first: every instance needs a region
    n_bg = max(0, preset.max_regions - n_inst)
    budget = preset.max_regions - n_bg
  span = n_inst > 1 and rng.random() < p.p_span_box and budget > n_inst
  budget -= int(span)
  per_inst = np.ones(n_inst, np.int64)
  extra = rng.integers(0, p.max_extra_boxes + 1, size=n_inst)
  for i in rng.permutation(n_inst):  # extra boxes while the budget lasts
    take = int(min(extra[i], budget - per_inst.sum()))
    per_inst[i] += max(take, 0)
  return n_bg, span, per_inst


def _view(world: World, rng: np.random.Generator, latent: np.ndarray) -> np.ndarray:
  """[latent_dim] what one box shows of `latent`: the latent plus view noise."""
  p = world.params
  return latent + rng.normal(0, p.view_noise, p.latent_dim)


def _instance_boxes(
    world: World,
    rng: np.random.Generator,
    objects: np.ndarray,
    product_ids: Sequence[int],
    per_inst: np.ndarray,
    size: tuple[int, int],
) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
  """(boxes, content latents, owning instance) of the instances' boxes: each instance's object
  box, then its jittered duplicates and part boxes (`per_inst` in all)."""
  w, h = size
  boxes, content, owner = [], [], []
  for k, pid in enumerate(product_ids):
    obj = objects[k]
    for r in range(per_inst[k]):
      if r == 0:
        box = obj
      elif rng.random() < world.params.p_duplicate_box:
        box = _jittered_box(rng, obj, w, h)
      else:
        box = _random_box(rng, w, h, 0.3, 0.7, inside=obj)
      boxes.append(box)
      content.append(_view(world, rng, world.product_latents[pid]))
      owner.append(k)
  return boxes, content, owner


def _span_box(
    world: World,
    rng: np.random.Generator,
    objects: np.ndarray,
    product_ids: Sequence[int],
    size: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
  """(box, content latent) of a box spanning two neighbouring products: a jittered union of
  their object boxes, showing the mean of their latents."""
  a = int(rng.integers(len(product_ids) - 1))  # layout order: a and a + 1 are neighbours
  union = np.array(
      [min(objects[a, 0], objects[a + 1, 0]), min(objects[a, 1], objects[a + 1, 1])]
      + [max(objects[a, 2], objects[a + 1, 2]), max(objects[a, 3], objects[a + 1, 3])],
      np.float32,
  )
  box = _jittered_box(rng, union, *size)
  mix = 0.5 * (world.product_latents[product_ids[a]] + world.product_latents[product_ids[a + 1]])
  return box, _view(world, rng, mix)


def render_regions(
    world: World, rng: np.random.Generator, item_id: str, product_ids: Sequence[int]
) -> tuple[formats.RegionFeatures, list[formats.Instance], np.ndarray, np.ndarray, np.ndarray]:
  """Detector regions of an image holding the given product instances.

  * products stand side by side (`_layout`): neighbours may touch or overlap;
  * each instance has a whole-object box, plus, while the region budget lasts,
    jittered duplicates of it (IoU 0.5 to 0.9 with the object box,
    `_jittered_box`) and part boxes inside it (label, cap, pump); all carry
    that product's latent;
  * with probability `WorldParams.p_span_box` (multi-product images), one box
    spans two adjacent products; its content is the mean of their latents and
    it belongs to no instance;
  * background clutter boxes of object-like size (`_clutter_box`), from the
    clutter latents, belong to no instance.

  The image gets at most `preset.max_regions` regions (`_region_budget`). All are shuffled,
  as detector output is not grouped by object.

  Returns:
    The regions (features still empty, [N, 0]), which regions belong to which instance,
    and the draws that determine the features: [N, latent_dim] content latents, the
    image's [style_dim] style and [N, feature_dim] feature noise, in the final region order.
  """
  p = world.params
  w, h = int(rng.integers(480, 1025)), int(rng.integers(480, 1025))
  n_bg, span, per_inst = _region_budget(rng, world, len(product_ids))
  objects = _layout(rng, w, h, len(product_ids))
  boxes, content, owner = _instance_boxes(world, rng, objects, product_ids, per_inst, (w, h))
  unowned = [_span_box(world, rng, objects, product_ids, (w, h))] if span else []
  for _ in range(n_bg):
    box = _clutter_box(rng, w, h, objects)
    bg = world.background_latents[rng.integers(len(world.background_latents))]
    unowned.append((box, _view(world, rng, bg)))
  for box, latent in unowned:  # spanning and clutter boxes belong to no instance
    boxes.append(box)
    content.append(latent)
    owner.append(-1)
  style = rng.normal(0, p.style_noise, p.style_dim).astype(np.float32)
  noise = rng.normal(0, p.feature_noise, (len(owner), world.feature_dim)).astype(np.float32)
  order = rng.permutation(len(owner))
  owner_arr = np.asarray(owner)[order]
  instances = [
      formats.Instance(
          world.products[pid].label, tuple(int(i) for i in np.flatnonzero(owner_arr == k))
      )
      for k, pid in enumerate(product_ids)
  ]
  regions = formats.RegionFeatures(
      item_id, w, h, np.stack(boxes)[order], np.zeros((len(owner), 0), np.float32)
  )
  return regions, instances, np.asarray(content, np.float32)[order], style, noise
