"""A Product1M-like synthetic world, written in the real on-disk formats.

The world has the properties that make Product1M retrieval hard:

* brands of fine-grained products: a product's latent appearance is the sum
  of its brand's latent (products of one brand look alike), its product
  type's and series' latents (shared across products) and a smaller
  product-specific detail;
* region features are a learnable function of that latent: each detector
  region is the latent plus view noise, concatenated with an image-level
  "style" nuisance (lighting, camera), pushed through one fixed random
  two-layer network into feature space (non-negative, like pooled CNN
  features), plus background regions drawn from a bank of clutter latents.
  Raw feature similarity is therefore dominated by style and clutter, which a
  model can learn to ignore but a mean-of-regions baseline cannot;
* weak captions: a title names the brand (Latin name or Chinese alias), some
  but not all of the products (sometimes only their type or series, with
  synonyms), sometimes a product that is not in the image, and marketing
  words that carry no visual information but look like rare, informative
  words to TF-IDF;
* single-product samples (the gallery, part of training) and multi-product
  samples (queries, part of training) of 2 to 7 instances of one brand (as in
  every real dev query), each instance one or more regions.

Neither modality alone identifies the products; together they nearly do. The
generator is deterministic by seed (every sample has its own RNG derived from
seed, split and index) and streams to disk, so a million samples need no more
memory than a thousand. It writes the official annotation file names, region
features as base64 TSV or npz, and `instances_{split}.jsonl` sidecars (which
regions belong to which product instance) for the labelled splits.

Command line::

    python -m capture_jax.data.synthetic --out DIR --preset demo [--seed 0]
        [--annotations product1m_dev_ossurl_v2.txt [--heldout_fraction 0.5]]
        [--feature_format tsv|npz] [--feature_dim 256] [--overwrite]

With --annotations, the real queries' labels become the world's products and
their lines (real ids, titles and label sets) become the dev queries.
--heldout_fraction F moves a seeded fraction F of those queries, whole (every
line of an id), to the test split instead, so that dev and test are disjoint
halves of the real queries: choices made on dev are judged on real titles no
one chose on. What the two splits share is what a user has before any query:
the product catalogue (labels), the gallery and the training pairs, all
rendered from the labels of both halves. What they do not share: query ids,
titles and label sets. No real title reaches the gallery or the training pairs.

It refuses to replace files in DIR that it did not write (a real annotation
file, say) unless --overwrite is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
from typing import Iterator, Sequence

import numpy as np
import tqdm

from capture_jax.data import formats


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


PRESETS: dict[str, Preset] = {
    # For unit tests: generates in well under a second.
    'tiny': Preset(
        num_brands=4,
        products_per_brand=(3, 5),
        gallery_per_product=3,
        num_train=96,
        num_dev=16,
        num_test=16,
        feature_dim=32,
        max_regions=8,
        max_background=2,
    ),
    # `make demo` on a 2-core CPU: like the real dev set (34 brands, 295
    # labels, ~2.8 labels per query) at a tenth of its gallery.
    'demo': Preset(
        num_brands=32,
        products_per_brand=(6, 12),
        gallery_per_product=5,
        num_train=6000,
        num_dev=300,
        num_test=300,
        feature_dim=256,
        max_regions=16,
    ),
    'small': Preset(
        num_brands=60,
        products_per_brand=(6, 14),
        gallery_per_product=10,
        num_train=50_000,
        num_dev=1000,
        num_test=1000,
        feature_dim=256,
        max_regions=36,
        max_background=8,
    ),
    # Product1M's sizes (458 products, ~40k gallery, 2,673 dev and 6,547 test
    # queries) with 1M training pairs. 2048-d features would take ~200 GB of
    # TSV; the default keeps 256 (pass --feature_dim 2048 for the real width).
    'large': Preset(
        num_brands=46,
        products_per_brand=(8, 12),
        gallery_per_product=87,
        num_train=1_000_000,
        num_dev=2673,
        num_test=6547,
        feature_dim=256,
        max_regions=36,
        max_background=8,
    ),
}


@dataclasses.dataclass(frozen=True)
class WorldParams:
  """How hard the world is. The defaults were tuned so that on `demo` both a
  TF-IDF-over-titles and a mean-region-feature baseline land clearly between
  random and perfect dev mAP@10 (52 and 41; random 2.6), their fusion beats
  both (57), and a small dual encoder trained contrastively for a few hundred
  steps reaches ~66-70 (tests/test_data_synthetic.py, docs/BENCHMARKS.md).
  With the detector-like regions (duplicate, part and spanning boxes,
  object-sized clutter) the two baselines measure 52 and 45 and their fusion
  59 (the evaluate_baselines mAP@10 of `--preset demo`, seed 0); the models'
  figures are to be re-measured."""

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
  # Detector-like regions (`_render_regions`).
  max_extra_boxes: int = 3  # per instance, beyond its object box: duplicates and parts
  p_duplicate_box: float = 0.5  # an extra box is a jittered duplicate (else a part box)
  p_span_box: float = 0.35  # a multi-product image has a box spanning two neighbours


# --------------------------------------------------------------------------
# Built-in vocabulary (Chinese cosmetics e-commerce, like Product1M).

SERIES = (
    '黄金',
    '玻尿酸',
    '蜗牛',
    '雪花',
    '玫瑰',
    '人参',
    '水光',
    '胶原',
    '烟酰胺',
    '积雪草',
    '红石榴',
    '绿茶',
    '樱花',
    '海洋',
    '钻石',
    '极光',
    '青春',
    '小棕瓶',
    '小黑瓶',
    '神仙',
    '白金',
    '珍珠',
    '燕窝',
    '山茶花',
    '茉莉',
    '薰衣草',
    '芦荟',
    '火山泥',
    '竹炭',
    '牛油果',
    '维C',
    '视黄醇',
    '肌源',
    '紫苏',
    '蓝铜',
    '多肽',
    '冰川',
    '雪绒花',
    '金盏花',
    '甘草',
)
# Product types; the first name is canonical (used in labels), the others are
# synonyms a title may use instead.
TYPES = (
    ('面霜', '乳霜', '保湿霜'),
    ('精华液', '精华露', '精华'),
    ('爽肤水', '化妆水', '柔肤水'),
    ('乳液', '润肤乳'),
    ('眼霜', '眼部精华霜'),
    ('面膜', '贴片面膜'),
    ('洁面乳', '洗面奶', '洁面膏'),
    ('防晒霜', '防晒乳'),
    ('粉底液', '粉底'),
    ('口红', '唇膏'),
    ('卸妆水', '卸妆液'),
    ('身体乳', '润体乳'),
    ('洗发水', '洗发露'),
    ('护发素', '润发乳'),
    ('香水', '淡香水'),
    ('气垫', '气垫粉底'),
    ('眼影', '眼影盘'),
    ('睫毛膏',),
    ('隔离霜', '妆前乳'),
    ('喷雾', '保湿喷雾'),
)
MARKETING = (
    '正品',
    '包邮',
    '官方',
    '旗舰店',
    '专柜',
    '补水',
    '保湿',
    '提亮',
    '抗皱',
    '紧致',
    '美白',
    '淡斑',
    '修护',
    '舒缓',
    '控油',
    '清爽',
    '滋润',
    '新款',
    '限量',
    '学生',
    '女士',
    '男士',
    '孕妇',
    '敏感肌',
    '进口',
    '韩国',
    '日本',
    '法国',
    '泰国',
    '国货',
    '小样',
    '旅行装',
    '大瓶',
    '送礼',
    '情人节',
    '七夕',
    '秒杀',
    '特价',
    '现货',
    '直邮',
    '免税',
    '正装',
    '收缩毛孔',
    '去黄',
    '提拉',
    '祛痘',
    '平价',
    '网红',
    '爆款',
    '热卖',
    '推荐',
    '明星同款',
    '温和',
    '无刺激',
    '持久',
    '水润',
    '保税',
    '24K',
    '官方授权',
    '防伪可查',
    '假一赔十',
    '天然',
    '植物',
    '有机',
    '深层',
    '清洁',
    '焕亮',
    '嫩肤',
    '抗老',
    '细腻',
    '轻薄',
    '遮瑕',
    '干皮',
    '油皮',
    '混合肌',
    '熬夜',
    '急救',
    '冬季',
    '夏季',
    '新品',
    '升级版',
    '经典',
    '畅销',
    '男女',
    '通用',
    '礼物',
    '生日',
    '母亲节',
    '双十一',
    '年货',
    '大牌',
    '贵妇',
    '院线',
    '少女',
    '学生党',
    '实惠装',
    '家庭装',
    '限定',
    '联名',
    '星品',
    '口碑',
    '回购',
    '好用',
)
SET_WORDS = ('套装', '礼盒', '套盒', '组合', '全套', '三件套', '护肤品套装')
_LATIN_SYLLABLES = (
    'lu',
    'mi',
    'va',
    'ko',
    're',
    'sa',
    'na',
    'el',
    'do',
    'ra',
    'vi',
    'ne',
    'to',
    'ka',
    'zi',
    'mo',
    'ri',
    'fa',
    'be',
    'la',
    'qu',
    'ce',
    'so',
    'ti',
    'an',
    'or',
)
_ALIAS_CHARS = '兰蔻雅诗黛资生堂欧莱娜丝薇琪露芙妮悦植萃蜜莎迪奥珂缇佳婷玉泽美肌秀颜朵伊芳碧'


@dataclasses.dataclass(frozen=True)
class Product:
  label: str  # "Brand seriestype", like the real "AHC 黄金面霜"
  brand: int
  series: str
  type_index: int  # into TYPES; -1 for products read from a real label
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


def _string_rng(*parts: object) -> np.random.Generator:
  """A generator seeded by strings, independent of the order things are read."""
  digest = hashlib.sha256('\x1f'.join(map(str, parts)).encode()).digest()
  return np.random.default_rng(np.frombuffer(digest[:16], np.uint32))


def heldout_split(
    queries: Sequence[formats.Annotation], fraction: float, seed: int
) -> tuple[list[formats.Annotation], list[formats.Annotation]]:
  """Splits real queries into (dev, test) by query id; each keeps the file's order.

  A seeded `fraction` of the distinct ids (rounded, at least one of each side when
  there are two or more) goes to test with every line of that id, so no id is in
  both. Deterministic in (the ids, fraction, seed); independent of titles and labels.
  """
  if not 0.0 < fraction < 1.0:
    raise ValueError(f'heldout_fraction must be in (0, 1), got {fraction}')
  ids = list(dict.fromkeys(q.item_id for q in queries))
  if len(ids) < 2:
    raise ValueError(f'a held-out split needs at least two query ids, got {len(ids)}')
  num_test = min(max(int(round(fraction * len(ids))), 1), len(ids) - 1)
  order = _string_rng('heldout', seed).permutation(len(ids))
  test_ids = {ids[i] for i in order[:num_test]}
  dev = [q for q in queries if q.item_id not in test_ids]
  test = [q for q in queries if q.item_id in test_ids]
  return dev, test


def _brand_name(rng: np.random.Generator, taken: set[str]) -> str:
  while True:
    if rng.random() < 0.2:  # acronym brands, like AHC or CEMOY
      name = ''.join(rng.choice(list('ABCDEFGHKLMNPRSTVWXYZ'), size=rng.integers(2, 5)))
    else:
      name = ''.join(rng.choice(_LATIN_SYLLABLES, size=rng.integers(2, 4))).capitalize()
    if name.lower() not in taken:
      taken.add(name.lower())
      return name


def _alias(rng: np.random.Generator, taken: set[str]) -> str:
  while True:
    name = ''.join(rng.choice(list(_ALIAS_CHARS), size=rng.integers(2, 4)))
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
    type_key = TYPES[p.type_index][0] if p.type_index >= 0 else p.detail[-2:]
    out[i] = (
        params.brand_weight * brand_latent[p.brand]
        + params.type_weight * _string_rng(seed, 'type', type_key).normal(size=d)
        + params.series_weight * _string_rng(seed, 'series', p.series).normal(size=d)
        + params.detail_weight * _string_rng(seed, 'detail', p.label).normal(size=d)
    )
  return out


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
  names: list[str] = []
  aliases: list[str] = []
  products: list[Product] = []
  if real_labels is not None:
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
  else:
    taken: set[str] = set()
    taken_alias: set[str] = set()
    for b in range(preset.num_brands):
      names.append(_brand_name(rng, taken))
      aliases.append(_alias(rng, taken_alias))
      n = int(rng.integers(preset.products_per_brand[0], preset.products_per_brand[1] + 1))
      series = rng.choice(len(SERIES), size=int(rng.integers(2, 4)), replace=False)
      combos = [(s, t) for s in series for t in range(len(TYPES))]
      for k in rng.choice(len(combos), size=min(n, len(combos)), replace=False):
        s, t = combos[k]
        detail = SERIES[s] + TYPES[t][0]
        products.append(Product(f'{names[b]} {detail}', b, SERIES[s], t, detail))
  brand_latent = np.stack(
      [_string_rng(seed, 'brand', n).normal(size=params.latent_dim) for n in names]
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


# --------------------------------------------------------------------------
# Samples.


@dataclasses.dataclass
class Sample:
  annotation: formats.Annotation
  regions: formats.RegionFeatures
  instances: list[formats.Instance]


@dataclasses.dataclass
class _Draft:
  """A sample whose region features are not computed yet: they are computed
  for many samples in one matrix product (`_finish`), as tiny per-sample
  products are slow (and slower still with a threaded BLAS on a busy host)."""

  annotation: formats.Annotation
  regions: formats.RegionFeatures  # features still empty
  instances: list[formats.Instance]
  latents: np.ndarray  # [N, latent_dim], in the final region order
  style: np.ndarray  # [style_dim]
  noise: np.ndarray  # [N, feature_dim]


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
    if cand[2] - cand[0] > 1 and cand[3] - cand[1] > 1 and 0.5 <= _box_iou(cand, box) <= 0.9:
      return cand.astype(np.float32)
  s = (1 - np.sqrt(0.7)) / 2
  return np.array([x0 + s * bw, y0 + s * bh, x1 - s * bw, y1 - s * bh], np.float32)


def _box_iou(a: np.ndarray, b: np.ndarray) -> float:
  iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = iw * ih
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return float(inter / union) if union > 0 else 0.0


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
  """A background box of object-like size, placed where it overlaps the products
  least of a few random tries (clutter is mostly beside the products)."""
  best, best_overlap = None, np.inf
  for _ in range(4):
    box = _random_box(rng, w, h, 0.15, 0.45)
    overlap = max((_box_iou(box, o) for o in objects), default=0.0)
    if overlap < best_overlap:
      best, best_overlap = box, overlap
  return best


def _render_regions(
    world: World, rng: np.random.Generator, item_id: str, product_ids: Sequence[int]
):
  """Detector regions of an image holding the given product instances.

  Modelled on bottom-up-attention (Faster R-CNN, Visual Genome) output, which
  does not write one clean box per object:

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

  The image gets at most `preset.max_regions` regions: one object box per
  instance first, then the background, the spanning box and the extra boxes.
  All are shuffled, as detector output is not grouped by object. Returns the
  regions (features not yet computed), which regions belong to which instance,
  and the draws that determine the features.
  """
  p, preset = world.params, world.preset
  w, h = int(rng.integers(480, 1025)), int(rng.integers(480, 1025))
  n_inst = len(product_ids)
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
  objects = _layout(rng, w, h, n_inst)
  content, boxes, owner = [], [], []
  for k, pid in enumerate(product_ids):
    obj = objects[k]
    for r in range(per_inst[k]):
      if r == 0:
        box = obj
      elif rng.random() < p.p_duplicate_box:
        box = _jittered_box(rng, obj, w, h)
      else:
        box = _random_box(rng, w, h, 0.3, 0.7, inside=obj)
      boxes.append(box)
      content.append(world.product_latents[pid] + rng.normal(0, p.view_noise, p.latent_dim))
      owner.append(k)
  if span:
    a = int(rng.integers(n_inst - 1))  # layout order: a and a + 1 are neighbours
    union = np.array(
        [min(objects[a, 0], objects[a + 1, 0]), min(objects[a, 1], objects[a + 1, 1])]
        + [max(objects[a, 2], objects[a + 1, 2]), max(objects[a, 3], objects[a + 1, 3])],
        np.float32,
    )
    boxes.append(_jittered_box(rng, union, w, h))
    mix = 0.5 * (world.product_latents[product_ids[a]] + world.product_latents[product_ids[a + 1]])
    content.append(mix + rng.normal(0, p.view_noise, p.latent_dim))
    owner.append(-1)
  for _ in range(n_bg):
    boxes.append(_clutter_box(rng, w, h, objects))
    bg = world.background_latents[rng.integers(len(world.background_latents))]
    content.append(bg + rng.normal(0, p.view_noise, p.latent_dim))
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
  synonyms = TYPES[prod.type_index]
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
  ranks = np.minimum(rng.zipf(1.3, size=n_mkt) - 1, len(MARKETING) - 1)
  marketing = [MARKETING[(int(r) * 7 + brand) % len(MARKETING)] for r in ranks]
  if multi and rng.random() < p.p_set_word:
    marketing.append(SET_WORDS[int(rng.integers(len(SET_WORDS)))])
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


def _item_id(split: str, index: int) -> str:
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


def _finish(world: World, drafts: Sequence[_Draft]) -> list[Sample]:
  """Computes the region features of drafts, all in one matrix product."""
  if not drafts:
    return []
  latents = np.concatenate([d.latents for d in drafts])
  style = np.concatenate(
      [np.broadcast_to(d.style, (len(d.latents), d.style.shape[0])) for d in drafts]
  )
  feats = region_features(world, latents, style, np.concatenate([d.noise for d in drafts]))
  out, start = [], 0
  for d in drafts:
    n = len(d.latents)
    regions = dataclasses.replace(d.regions, features=feats[start : start + n])
    out.append(Sample(d.annotation, regions, d.instances))
    start += n
  return out


def make_sample(
    world: World,
    seed: int,
    split: str,
    index: int,
    product_ids: Sequence[int] | None = None,
    title: str | None = None,
    item_id: str | None = None,
) -> Sample:
  """One sample of a split, a pure function of (world, seed, split, index).

  (`generate` computes features 128 samples per matrix product; those may
  differ from a lone sample's in the last float bits.)
  """
  return _finish(world, [_draft(world, seed, split, index, product_ids, title, item_id)])[0]


def _draft(
    world: World,
    seed: int,
    split: str,
    index: int,
    product_ids: Sequence[int] | None = None,
    title: str | None = None,
    item_id: str | None = None,
) -> _Draft:
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
  item_id = item_id or _item_id(split, index)
  regions, instances, latents, style, noise = _render_regions(world, rng, item_id, product_ids)
  title = title or make_title(world, rng, product_ids)
  labels = () if split == 'train' else tuple(world.products[i].label for i in product_ids)
  url, mirror = _url(item_id)
  return _Draft(
      formats.Annotation(item_id, title, url, mirror, labels),
      regions,
      instances,
      latents,
      style,
      noise,
  )


def _split_sizes(world: World) -> dict[str, int]:
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

    def draft(i: int) -> _Draft:
      q = queries[i]
      d = _draft(
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
    draft = lambda i: _draft(world, seed, split, i)
    total = _split_sizes(world)[split]
  for start in range(0, total, chunk):
    yield from _finish(world, [draft(i) for i in range(start, min(start + chunk, total))])


class _FeatureWriter:
  """Writes region features as one TSV per split or one npz per image."""

  def __init__(self, out_dir: str, split: str, feature_format: str):
    self.format = feature_format
    self.dir = os.path.join(out_dir, 'features')
    os.makedirs(self.dir, exist_ok=True)
    if feature_format == 'tsv':
      self._f = open(os.path.join(self.dir, f'{split}.tsv'), 'w', encoding='ascii')
    elif feature_format != 'npz':
      raise ValueError(f'feature_format must be tsv or npz, got {feature_format!r}')

  def write(self, rf: formats.RegionFeatures) -> None:
    if self.format == 'tsv':
      self._f.write(formats.format_tsv_row(rf) + '\n')
    else:
      formats.write_npz(os.path.join(self.dir, f'{rf.image_id}.npz'), rf)

  def close(self) -> None:
    if self.format == 'tsv':
      self._f.close()


WORLD_FILE = 'synthetic_world.json'


def _planned_files(splits: Sequence[str], feature_format: str) -> list[str]:
  """Relative paths a run writes, except npz features (one per image): `features/*.npz`."""
  out = [WORLD_FILE]
  for split in splits:
    out.append(formats.annotation_filename(split))
    if split in formats.LABELLED_SPLITS:
      out.append(formats.instances_filename(split))
    out.append(f'features/{split}.tsv' if feature_format == 'tsv' else 'features/*.npz')
  return out


def _generated_files(out_dir: str) -> list[str]:
  """The files an earlier run of the generator recorded in `out_dir`'s world file."""
  path = os.path.join(out_dir, WORLD_FILE)
  if not os.path.isfile(path):
    return []
  try:
    with open(path, encoding='utf-8') as f:
      world = json.load(f)
  except (ValueError, OSError):
    return []  # not ours after all: nothing in the folder counts as generated
  if not isinstance(world, dict) or 'preset' not in world:
    return []
  files = world.get('files')
  if not isinstance(files, list):
    # A world file of a generator from before this manifest: it wrote these.
    files = _planned_files(formats.SPLITS, 'tsv') + ['features/*.npz']
  return [str(f) for f in files]


def _check_overwrite(
    out_dir: str,
    world: World,
    splits: Sequence[str],
    real_queries: dict[str, list[formats.Annotation]],
    feature_format: str,
    overwrite: bool,
) -> None:
  """Refuses to replace a file the generator did not write (e.g. a real annotation file).

  A file counts as the generator's own when the folder's `synthetic_world.json`
  lists it (npz features: when it lists `features/*.npz`).
  """
  if overwrite or not os.path.isdir(out_dir):
    return
  ours = set(_generated_files(out_dir))
  planned = _planned_files(splits, feature_format)
  if feature_format == 'npz' and 'features/*.npz' not in ours:
    sizes = _split_sizes(world)
    for split in splits:
      ids = (
          [q.item_id for q in real_queries[split]]
          if split in real_queries
          else [_item_id(split, i) for i in range(sizes[split])]
      )
      planned += [f'features/{i}.npz' for i in ids]
  for rel in planned:
    if '*' in rel or rel in ours:
      continue
    path = os.path.join(out_dir, rel)
    if os.path.exists(path):
      raise FileExistsError(
          f'{path} exists and was not written by the synthetic generator (it is not listed in '
          f'{os.path.join(out_dir, WORLD_FILE)}); refusing to overwrite it. Choose another '
          '--out, or pass --overwrite to replace it.'
      )


def generate(
    out_dir: str,
    preset: str | Preset = 'demo',
    *,
    seed: int = 0,
    annotations: str | None = None,
    heldout_fraction: float = 0.0,
    feature_format: str = 'tsv',
    feature_dim: int | None = None,
    params: WorldParams = WorldParams(),
    splits: Sequence[str] = formats.SPLITS,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
  """Writes a synthetic Product1M folder; returns a summary (also in world.json).

  Args:
    out_dir: created if needed. Receives `product1m_{split}_ossurl_v2.txt`,
      `features/` (`{split}.tsv` or `{item_id}.npz`), `instances_{split}.jsonl`
      for gallery/dev/test, and `synthetic_world.json`.
    preset: a name in `PRESETS` or a `Preset`.
    seed: the whole folder is a deterministic function of the arguments.
    annotations: a real Product1M query file: its labels become the products,
      its lines (real ids, titles and label sets) become the dev queries; the
      gallery, training pairs and test queries are built from its labels.
    heldout_fraction: with `annotations`, the share of its query ids that become
      the test queries instead (`heldout_split`; 0: test is rendered from labels).
    feature_format: 'tsv' (base64, one file per split) or 'npz' (one per image).
    feature_dim: overrides the preset's feature width.
    params: difficulty of the world.
    splits: which splits to write.
    progress: show tqdm bars.
    overwrite: replace files in `out_dir` that the generator did not write
      (by default such a file stops the run before anything is written).

  Raises:
    FileExistsError: `out_dir` holds a file this run would write that is not
      listed as the generator's own in its `synthetic_world.json`.
  """
  p = PRESETS[preset] if isinstance(preset, str) else preset
  previous_files = _generated_files(out_dir)
  if feature_dim:
    p = dataclasses.replace(p, feature_dim=int(feature_dim))
  if heldout_fraction and not annotations:
    raise ValueError('heldout_fraction splits real queries: it needs annotations')
  real_queries: dict[str, list[formats.Annotation]] = {}  # split -> its real query lines
  if annotations:
    queries = [a for _, a in formats.read_annotations(annotations, require_labels=True)]
    max_inst = max(len(q.labels) for q in queries)
    if max_inst > p.max_regions:
      raise ValueError(
          f'{annotations}: a query has {max_inst} labels but the preset '
          f'allows {p.max_regions} regions'
      )
    # The products are the labels of every query (dev and test alike): the catalogue, like
    # the gallery rendered from it, is known before any query arrives.
    world = make_world(p, seed, params, real_labels=[l for q in queries for l in q.labels])
    if heldout_fraction:
      real_queries['dev'], real_queries['test'] = heldout_split(queries, heldout_fraction, seed)
    else:
      real_queries['dev'] = queries
    p = dataclasses.replace(
        p,
        num_dev=len(real_queries['dev']),
        num_test=len(real_queries.get('test', ())) or p.num_test,
    )
  else:
    world = make_world(p, seed, params)
  _check_overwrite(out_dir, world, splits, real_queries, feature_format, overwrite)
  os.makedirs(out_dir, exist_ok=True)
  counts = {}
  for split in splits:
    path = os.path.join(out_dir, formats.annotation_filename(split))
    writer = _FeatureWriter(out_dir, split, feature_format)
    sidecar = (
        open(os.path.join(out_dir, formats.instances_filename(split)), 'w', encoding='utf-8')
        if split in formats.LABELLED_SPLITS
        else None
    )
    split_queries = real_queries.get(split)
    total = len(split_queries) if split_queries is not None else _split_sizes(world)[split]
    n = 0
    with open(path, 'w', encoding='utf-8') as ann_file:
      # disable=None: a bar on a terminal, none in logs.
      bar = tqdm.tqdm(
          iter_split(world, seed, split, split_queries),
          total=total,
          desc=f'synthetic {split}',
          leave=False,
          disable=None if progress else True,
      )
      for s in bar:
        ann_file.write(formats.format_annotation(s.annotation) + '\n')
        writer.write(s.regions)
        if sidecar is not None:
          sidecar.write(formats.format_instances(s.annotation.item_id, s.instances) + '\n')
        n += 1
    writer.close()
    if sidecar is not None:
      sidecar.close()
    counts[split] = n
  summary = {
      'preset': dataclasses.asdict(p),
      'params': dataclasses.asdict(params),
      'seed': seed,
      'annotations': annotations,
      'heldout_fraction': heldout_fraction,
      # Splits whose queries are real annotation lines (the rest are rendered from labels).
      'real_query_splits': sorted(real_queries),
      'feature_format': feature_format,
      'feature_dim': p.feature_dim,
      'max_regions': p.max_regions,
      'counts': counts,
      'num_brands': len(world.brand_names),
      'num_products': len(world.products),
      'products': [q.label for q in world.products],
      # What this folder holds from the generator: a later run may overwrite these.
      'files': sorted(set(previous_files) | set(_planned_files(splits, feature_format))),
  }
  with open(os.path.join(out_dir, WORLD_FILE), 'w', encoding='utf-8') as f:
    json.dump(summary, f, ensure_ascii=False, indent=1)
  return summary


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', required=True, help='output folder')
  parser.add_argument('--preset', default='demo', choices=sorted(PRESETS))
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument(
      '--annotations',
      default=None,
      help='a real Product1M query file whose titles and labels to use',
  )
  parser.add_argument(
      '--heldout_fraction',
      type=float,
      default=0.0,
      help='with --annotations: this share of the real query ids becomes the test split '
      '(disjoint from dev, by --seed); 0 renders test from the labels',
  )
  parser.add_argument('--feature_format', default='tsv', choices=('tsv', 'npz'))
  parser.add_argument('--feature_dim', type=int, default=None)
  parser.add_argument('--splits', default=','.join(formats.SPLITS))
  parser.add_argument(
      '--overwrite',
      action='store_true',
      help='replace files in --out that the generator did not write (e.g. real annotations)',
  )
  args = parser.parse_args(argv)
  summary = _generate_from_args(args)
  print(
      f'wrote {args.out}: {summary["num_products"]} products of {summary["num_brands"]} '
      f'brands; ' + ', '.join(f'{k} {v}' for k, v in summary['counts'].items()),
      file=sys.stderr,
  )


def _generate_from_args(args: argparse.Namespace) -> dict:
  return generate(
      args.out,
      args.preset,
      seed=args.seed,
      annotations=args.annotations,
      heldout_fraction=args.heldout_fraction,
      feature_format=args.feature_format,
      feature_dim=args.feature_dim,
      splits=[s for s in args.splits.split(',') if s],
      overwrite=args.overwrite,
  )


if __name__ == '__main__':
  main()
