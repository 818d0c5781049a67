"""Copy-and-paste pseudo-labels: multi-product samples composed from single-product ones.

The idea of CAPTURE's region proposal network, at the level of detector
regions: single-product samples ("donors") are pasted together into one
canvas, each rescaled and translated into its own paste box (boxes may
overlap: occlusion), keeping their region features. Each donor's regions form
one pseudo-instance, so the grouping is known by construction, without a
label. Clutter regions, placed outside the paste boxes where there is room,
form the background.

Weak supervision, stated: a single-product image's regions are mostly its
product. The donor's *core* is its largest box and every region that lies
mostly inside it or overlaps it (IoU >= 0.3); the other regions (`outliers`,
things beside the product) are, with `instances.donor_outliers='background'`
(the default), moved to the clutter bank instead of the pseudo-instance, and
with `'instance'` kept in it. Clutter inside the core stays in the instance:
that is the label noise of weak supervision.

Where donors come from: `instances.donor_splits` (default `gallery`, which is
single-product by definition). Training pairs carry no labels and are mixed;
`train` is accepted only with `instances.train_is_single_product=True`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import ml_collections
import numpy as np

from capture_jax.data import boxes as boxes_lib

PAD = -2  # `group` of padding slots in a batch; -1 is background


@dataclasses.dataclass
class DonorPool:
  """Single-product samples to paste, with their core / outlier split.

  Attributes:
    boxes: per donor, [n_i, 4] core boxes in pixels of the donor image.
    features: per donor, [n_i, F] core region features (float32).
    crops: [D, 4] the extent of each donor's core (union of its core boxes).
    clutter_features: [C, F] outlier regions (the clutter bank).
    clutter_sizes: [C, 2] their width and height relative to their image.
    neighbours: [D, K] donors of most similar mean core feature (cosine),
      the look-alike products pasted together for hard pseudo-samples.
    item_ids: the donors' item ids.
  """

  boxes: list[np.ndarray]
  features: list[np.ndarray]
  crops: np.ndarray
  clutter_features: np.ndarray
  clutter_sizes: np.ndarray
  neighbours: np.ndarray
  item_ids: list[str]

  def __len__(self) -> int:
    return len(self.boxes)

  @property
  def feature_dim(self) -> int:
    return int(self.features[0].shape[1])


def split_core(boxes: np.ndarray) -> np.ndarray:
  """[N] bool: the regions of a single-product image taken as its product.

  The core is the largest box and the regions inside it (containment >= 0.5)
  or overlapping it (IoU >= 0.3).
  """
  largest = int(np.argmax(boxes_lib.box_areas(boxes)))
  iou = boxes_lib.iou_matrix(boxes)[:, largest]
  inside = boxes_lib.containment_matrix(boxes)[:, largest]
  core = (inside >= 0.5) | (iou >= 0.3)
  core[largest] = True
  return core


def make_pool(
    records: Sequence[dict[str, Any]],
    config: ml_collections.ConfigDict,
) -> DonorPool:
  """A donor pool from decoded single-product records (`Product1MSource.read_records`).

  Raises:
    ValueError: a record with no regions or features of another width than
      `config.data.feature_dim` (naming the item), or no records.
  """
  from capture_jax.instances import proposals as proposals_lib  # pylint: disable=import-outside-toplevel

  if not records:
    raise ValueError('no donor samples: instances.donor_splits selected no records')
  keep_outliers = config.instances.donor_outliers == 'instance'
  if config.instances.donor_outliers not in ('instance', 'background'):
    raise ValueError(
        f'instances.donor_outliers={config.instances.donor_outliers!r}, '
        "expected 'instance' or 'background'"
    )
  boxes, feats, crops, c_feats, c_sizes, ids = [], [], [], [], [], []
  for rec in records:
    checked = proposals_lib.check_record(rec, feature_dim=config.data.feature_dim)
    b, f = checked['boxes'], checked['features']
    core = np.ones(len(b), bool) if keep_outliers else split_core(b)
    boxes.append(b[core])
    feats.append(f[core])
    crops.append(
        [b[core, 0].min(), b[core, 1].min(), b[core, 2].max(), b[core, 3].max()],
    )
    for k in np.flatnonzero(~core):
      c_feats.append(f[k])
      c_sizes.append(
          [
              (b[k, 2] - b[k, 0]) / float(rec['image_w']),
              (b[k, 3] - b[k, 1]) / float(rec['image_h']),
          ]
      )
    ids.append(str(rec['item_id']))
  means = np.stack([f.mean(axis=0) for f in feats])
  means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-6)
  k = min(int(config.instances.hard_neighbours), len(feats) - 1)
  neighbours = np.zeros((len(feats), max(k, 0)), np.int64)
  if k > 0:
    for start in range(0, len(feats), 1024):  # chunked: bounded memory on big pools
      sim = means[start : start + 1024] @ means.T
      rows = np.arange(sim.shape[0])
      sim[rows, start + rows] = -np.inf
      neighbours[start : start + 1024] = np.argsort(-sim, axis=1, kind='stable')[:, :k]
  dim = feats[0].shape[1]
  return DonorPool(
      boxes,
      feats,
      np.asarray(crops, np.float32),
      np.asarray(c_feats, np.float32).reshape(-1, dim),
      np.asarray(c_sizes, np.float32).reshape(-1, 2),
      neighbours,
      ids,
  )


@dataclasses.dataclass
class PseudoSample:
  """A composed multi-product sample.

  Attributes:
    boxes: [N, 4] pixel boxes in the canvas.
    features: [N, F] the donors' (and clutter's) region features, unchanged.
    image_w, image_h: canvas size.
    group: [N] pseudo-instance of each region (index of its paste), -1 for clutter.
    source: [N, 2] (donor index in the pool, region index in the donor's core),
      (-1, clutter bank index) for clutter.
    paste_boxes: [n, 4] where each donor was pasted.
  """

  boxes: np.ndarray
  features: np.ndarray
  image_w: int
  image_h: int
  group: np.ndarray
  source: np.ndarray
  paste_boxes: np.ndarray


def _num_products(rng: np.random.Generator, lo: int, hi: int) -> int:
  """lo..hi products, each one 0.6 times as likely as one fewer (mostly 2 or 3,
  as in real multi-product queries)."""
  ks = np.arange(lo, hi + 1)
  p = 0.6 ** (ks - lo)
  return int(rng.choice(ks, p=p / p.sum()))


def _paste_boxes(rng: np.random.Generator, w: int, h: int, n: int) -> np.ndarray:
  """[n, 4] paste boxes: a shelf (side by side, neighbours apart, touching or
  overlapping) with probability 0.6, else free placement (any overlap)."""
  if rng.random() < 0.6:
    rows = 1 if n <= 4 else 2
    out = []
    for r in range(rows):
      k = n // rows + (1 if r < n % rows else 0)
      span = w * rng.uniform(0.55, 0.98)
      widths = rng.uniform(0.6, 1.4, k)
      gaps = rng.uniform(-0.25, 0.1, max(k - 1, 0))
      slot = span / (widths.sum() + gaps.sum())
      x = rng.uniform(0, w - span)
      row_h = h / rows
      for i in range(k):
        bh = row_h * rng.uniform(0.4, 0.95)
        y1 = r * row_h + row_h * rng.uniform(0.85, 1.0)
        out.append([x, max(0.0, y1 - bh), min(float(w), x + widths[i] * slot), y1])
        if i < k - 1:
          x += (widths[i] + gaps[i]) * slot
    boxes = np.array(out, np.float64)
  else:
    bw = w * rng.uniform(0.2, 0.5, n)
    bh = h * rng.uniform(0.25, 0.7, n)
    x0 = rng.uniform(0, 1, n) * (w - bw)
    y0 = rng.uniform(0, 1, n) * (h - bh)
    boxes = np.stack([x0, y0, x0 + bw, y0 + bh], axis=1)
  return np.clip(boxes, 0.0, [w, h, w, h]).astype(np.float32)


def compose(
    pool: DonorPool,
    rng: np.random.Generator,
    config: ml_collections.ConfigDict,
) -> PseudoSample:
  """One pseudo multi-product sample, a pure function of the pool and `rng`.

  `instances.min_products`..`max_products` donors (the first uniform, the
  others with probability `instances.hard_fraction` among its look-alike
  neighbours) are pasted into a W x H canvas (480..1024 px). Every donor keeps
  all its core regions when they fit in `data.max_regions` together (each
  donor needs at least one region: fewer donors are pasted if not); else each
  keeps its first regions (extractors write them by decreasing confidence) in
  an even share of the budget. Up to `instances.max_clutter` clutter regions
  then fill the budget left. Regions are shuffled.
  """
  cfg = config.instances
  budget = int(config.data.max_regions)
  w, h = int(rng.integers(480, 1025)), int(rng.integers(480, 1025))
  n = min(_num_products(rng, cfg.min_products, cfg.max_products), budget, len(pool))
  donors = _pick_donors(pool, rng, n, cfg.hard_fraction)
  sizes = _region_shares(np.array([len(pool.boxes[d]) for d in donors]), budget)
  paste = _paste_boxes(rng, w, h, n)
  boxes = [_pasted_regions(pool, d, paste[k], sizes[k]) for k, d in enumerate(donors)]
  feats = [pool.features[d][: sizes[k]] for k, d in enumerate(donors)]
  group = [k for k in range(n) for _ in range(int(sizes[k]))]
  source = [(d, r) for k, d in enumerate(donors) for r in range(int(sizes[k]))]
  room = budget - int(sizes.sum())
  n_clutter = min(int(rng.integers(0, cfg.max_clutter + 1)), room, len(pool.clutter_features))
  for _ in range(n_clutter):
    c = int(rng.integers(len(pool.clutter_features)))
    boxes.append(_clutter_box(rng, pool.clutter_sizes[c], w, h, paste))
    feats.append(pool.clutter_features[c][None])
    group.append(-1)
    source.append((-1, c))
  boxes_arr = _on_canvas(np.concatenate(boxes).astype(np.float32), w, h)
  order = rng.permutation(len(group))
  return PseudoSample(
      boxes_arr[order],
      np.concatenate(feats).astype(np.float32)[order],
      w,
      h,
      np.asarray(group, np.int32)[order],
      np.asarray(source, np.int64).reshape(-1, 2)[order],
      paste,
  )


def _pick_donors(pool: DonorPool, rng: np.random.Generator, n: int, hard_fraction: float) -> list:
  """`n` donor indices: the first uniform, each other one with probability `hard_fraction` a
  look-alike neighbour of the first (distinct while 100 draws allow)."""
  donors = [int(rng.integers(len(pool)))]
  tries = 0
  while len(donors) < n:
    tries += 1
    if pool.neighbours.shape[1] and tries <= 20 and rng.random() < hard_fraction:
      d = int(pool.neighbours[donors[0], rng.integers(pool.neighbours.shape[1])])
    else:
      d = int(rng.integers(len(pool)))
    if d not in donors or tries > 100:
      donors.append(d)
  return donors


def _region_shares(sizes: np.ndarray, budget: int) -> np.ndarray:
  """How many regions each donor keeps: all (`sizes`) when they fit in `budget`, else an even
  share each, dealt round-robin (a small donor leaves room for the others)."""
  if sizes.sum() <= budget:
    return sizes
  n = len(sizes)
  share, remaining = np.zeros(n, np.int64), budget
  while remaining > 0:
    for i in range(n):
      if share[i] < sizes[i] and remaining > 0:
        share[i] += 1
        remaining -= 1
  return share


def _pasted_regions(pool: DonorPool, d: int, paste: np.ndarray, size: int) -> np.ndarray:
  """The first `size` region boxes of donor `d`, moved from its crop into the `paste` box:
  `[size, 4]`."""
  crop = pool.crops[d]
  sx = (paste[2] - paste[0]) / max(crop[2] - crop[0], 1e-3)
  sy = (paste[3] - paste[1]) / max(crop[3] - crop[1], 1e-3)
  b = pool.boxes[d][:size]
  return np.stack(
      [
          paste[0] + (b[:, 0] - crop[0]) * sx,
          paste[1] + (b[:, 1] - crop[1]) * sy,
          paste[0] + (b[:, 2] - crop[0]) * sx,
          paste[1] + (b[:, 3] - crop[1]) * sy,
      ],
      axis=1,
  )


def _clutter_box(
    rng: np.random.Generator, size: np.ndarray, w: int, h: int, paste: np.ndarray
) -> np.ndarray:
  """A clutter region's box `[1, 4]` of relative `size` (w, h), the least inside the `paste`
  boxes of 6 random places."""
  cw, ch = size * [w, h]
  cw, ch = max(float(cw), 2.0), max(float(ch), 2.0)
  best, best_inside = None, np.inf
  for _ in range(6):  # outside the paste boxes where there is room
    x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
    cand = np.array([[x0, y0, x0 + cw, y0 + ch]], np.float32)
    inside = boxes_lib.containment_matrix(np.concatenate([cand, paste]))[0, 1:].sum()
    if inside < best_inside:
      best, best_inside = cand, inside
  return best


def _on_canvas(boxes: np.ndarray, w: int, h: int) -> np.ndarray:
  """`boxes` `[n, 4]` clipped to the W x H canvas, each still at least 1 px wide and high."""
  boxes = np.clip(boxes, 0.0, [w, h, w, h])
  # Keep every box a box after clipping (a paste box at the canvas edge).
  boxes[:, 2] = np.maximum(boxes[:, 2], np.minimum(boxes[:, 0] + 1.0, w))
  boxes[:, 0] = np.minimum(boxes[:, 0], boxes[:, 2] - 1.0)
  boxes[:, 3] = np.maximum(boxes[:, 3], np.minimum(boxes[:, 1] + 1.0, h))
  boxes[:, 1] = np.minimum(boxes[:, 1], boxes[:, 3] - 1.0)
  return boxes


def make_batch(
    pool: DonorPool, seed: int, step: int, config: ml_collections.ConfigDict
) -> dict[str, np.ndarray]:
  """The training batch of `step`: `instances.batch_size` pseudo-samples, padded.

  A pure function of (pool, seed, step), so a resumed run sees the same
  batches as an uninterrupted one.

  Returns:
    features [B, R, F] float32, boxes [B, R, 4] float32 (divided by the canvas
    size), mask [B, R] bool, group [B, R] int32 (pseudo-instance, -1
    background, -2 padding); R = data.max_regions.
  """
  rng = np.random.default_rng([seed, 0x1A5, step])
  samples = [compose(pool, rng, config) for _ in range(config.instances.batch_size)]
  return pad_samples(
      [(s.features, s.boxes, s.image_w, s.image_h) for s in samples],
      config.data.max_regions,
      groups=[s.group for s in samples],
  )


def pad_samples(
    samples: Sequence[tuple[np.ndarray, np.ndarray, float, float]],
    max_regions: int,
    groups: Sequence[np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
  """Pads (features, pixel boxes, image_w, image_h) samples to `max_regions` (see `make_batch`)."""
  b, f = len(samples), samples[0][0].shape[1]
  out = {
      'features': np.zeros((b, max_regions, f), np.float32),
      'boxes': np.zeros((b, max_regions, 4), np.float32),
      'mask': np.zeros((b, max_regions), bool),
      'group': np.full((b, max_regions), PAD, np.int32),
  }
  for i, (feats, boxes, w, h) in enumerate(samples):
    n = min(len(feats), max_regions)
    out['features'][i, :n] = feats[:n]
    out['boxes'][i, :n] = np.asarray(boxes[:n], np.float32) / np.float32([w, h, w, h])
    out['mask'][i, :n] = True
    if groups is not None:
      out['group'][i, :n] = groups[i][:n]
  if groups is None:
    del out['group']
  return out
