"""Writing a world's folder (`generate`): the official annotation files, region features (one
base64 TSV per split or one npz per image), the `instances_{split}.jsonl` sidecars of the
labelled splits and `synthetic_world.json` (the settings, counts, products and the files the
generator wrote, so that a later run may replace those and refuses to replace anything else).

With a real query file, its labels become the world's products and its lines (real ids, titles
and label sets) the dev queries; `heldout_split` moves a seeded share of them, whole (every
line of an id), to the test split instead, so that dev and test are disjoint halves of the real
queries. What the two splits share is what a user has before any query: the product catalogue
(labels), the gallery and the training pairs, all rendered from the labels of both halves. No
real title reaches the gallery or the training pairs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Sequence

from capture_jax import progress as progress_lib
from capture_jax.data import formats
from capture_jax.data.synthetic import samples
from capture_jax.data.synthetic import world as world_lib
from capture_jax.data.synthetic.world import PRESETS, Preset, World, WorldParams

WORLD_FILE = 'synthetic_world.json'


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
  order = world_lib.string_rng('heldout', seed).permutation(len(ids))
  test_ids = {ids[i] for i in order[:num_test]}
  dev = [q for q in queries if q.item_id not in test_ids]
  test = [q for q in queries if q.item_id in test_ids]
  return dev, test


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
    sizes = samples.split_sizes(world)
    for split in splits:
      ids = (
          [q.item_id for q in real_queries[split]]
          if split in real_queries
          else [samples.item_id_of(split, i) for i in range(sizes[split])]
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


def _world_and_queries(
    preset: Preset,
    seed: int,
    params: WorldParams,
    annotations: str | None,
    heldout_fraction: float,
) -> tuple[World, Preset, dict[str, list[formats.Annotation]]]:
  """The world to write, the preset its summary records (the real query counts) and the real
  query lines of each split that has them (none without `annotations`)."""
  if not annotations:
    return world_lib.make_world(preset, seed, params), preset, {}
  queries = [a for _, a in formats.read_annotations(annotations, require_labels=True)]
  max_inst = max(len(q.labels) for q in queries)
  if max_inst > preset.max_regions:
    raise ValueError(
        f'{annotations}: a query has {max_inst} labels but the preset '
        f'allows {preset.max_regions} regions'
    )
  # The products are the labels of every query (dev and test alike): the catalogue, like
  # the gallery rendered from it, is known before any query arrives.
  world = world_lib.make_world(
      preset, seed, params, real_labels=[l for q in queries for l in q.labels]
  )
  real_queries: dict[str, list[formats.Annotation]] = {}
  if heldout_fraction:
    real_queries['dev'], real_queries['test'] = heldout_split(queries, heldout_fraction, seed)
  else:
    real_queries['dev'] = queries
  recorded = dataclasses.replace(
      preset,
      num_dev=len(real_queries['dev']),
      num_test=len(real_queries.get('test', ())) or preset.num_test,
  )
  return world, recorded, real_queries


def _write_split(
    out_dir: str,
    world: World,
    seed: int,
    split: str,
    queries: Sequence[formats.Annotation] | None,
    *,
    feature_format: str,
    progress: bool,
) -> int:
  """Writes one split's annotation file, features and (labelled splits) sidecar; returns its
  number of samples. `queries`: the split's real query lines, or None to draw them."""
  total = len(queries) if queries is not None else samples.split_sizes(world)[split]
  bar = progress_lib.Progress(total, f'synthetic {split}', 'sample', enabled=progress)
  n = 0
  with contextlib.ExitStack() as files:
    features = _FeatureWriter(out_dir, split, feature_format)
    files.callback(features.close)
    sidecar = (
        files.enter_context(
            open(os.path.join(out_dir, formats.instances_filename(split)), 'w', encoding='utf-8')
        )
        if split in formats.LABELLED_SPLITS
        else None
    )
    path = os.path.join(out_dir, formats.annotation_filename(split))
    ann_file = files.enter_context(open(path, 'w', encoding='utf-8'))
    for s in samples.iter_split(world, seed, split, queries):
      ann_file.write(formats.format_annotation(s.annotation) + '\n')
      features.write(s.regions)
      if sidecar is not None:
        sidecar.write(formats.format_instances(s.annotation.item_id, s.instances) + '\n')
      n += 1
      bar.update()
  bar.close()
  return n


def _summary(
    world: World,
    preset: Preset,
    counts: dict[str, int],
    files: list[str],
    *,
    params: WorldParams,
    seed: int,
    annotations: str | None,
    heldout_fraction: float,
    real_queries: dict[str, list[formats.Annotation]],
    feature_format: str,
) -> dict:
  """The contents of `synthetic_world.json` (`generate`'s arguments, the world's products and
  the counts); `files`: what the folder holds from the generator."""
  return {
      'preset': dataclasses.asdict(preset),
      'params': dataclasses.asdict(params),
      'seed': seed,
      'annotations': annotations,
      'heldout_fraction': heldout_fraction,
      # Splits whose queries are real annotation lines (the rest are rendered from labels).
      'real_query_splits': sorted(real_queries),
      'feature_format': feature_format,
      'feature_dim': preset.feature_dim,
      'max_regions': preset.max_regions,
      'counts': counts,
      'num_brands': len(world.brand_names),
      'num_products': len(world.products),
      'products': [q.label for q in world.products],
      # What this folder holds from the generator: a later run may overwrite these.
      'files': files,
  }


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
    progress: show progress (`capture_jax.progress`: a bar on a terminal, lines in a log).
    overwrite: replace files in `out_dir` that the generator did not write
      (by default such a file stops the run before anything is written).

  Raises:
    FileExistsError: `out_dir` holds a file this run would write that is not
      listed as the generator's own in its `synthetic_world.json`.
    ValueError: an unknown split or feature format, `heldout_fraction` without
      `annotations` or out of (0, 1), or a real query with more labels than the preset
      has regions.
  """
  p = PRESETS[preset] if isinstance(preset, str) else preset
  unknown = [s for s in splits if s not in formats.SPLITS]
  if unknown:
    raise ValueError(f'unknown split(s) {unknown}; expected some of {formats.SPLITS}')
  previous_files = _generated_files(out_dir)
  if feature_dim:
    p = dataclasses.replace(p, feature_dim=int(feature_dim))
  if heldout_fraction and not annotations:
    raise ValueError('heldout_fraction splits real queries: it needs annotations')
  world, p, real_queries = _world_and_queries(p, seed, params, annotations, heldout_fraction)
  _check_overwrite(out_dir, world, splits, real_queries, feature_format, overwrite)
  os.makedirs(out_dir, exist_ok=True)
  counts = {}
  for split in splits:
    counts[split] = _write_split(
        out_dir,
        world,
        seed,
        split,
        real_queries.get(split),
        feature_format=feature_format,
        progress=progress,
    )
  summary = _summary(
      world,
      p,
      counts,
      sorted(set(previous_files) | set(_planned_files(splits, feature_format))),
      params=params,
      seed=seed,
      annotations=annotations,
      heldout_fraction=heldout_fraction,
      real_queries=real_queries,
      feature_format=feature_format,
  )
  with open(os.path.join(out_dir, WORLD_FILE), 'w', encoding='utf-8') as f:
    json.dump(summary, f, ensure_ascii=False, indent=1)
  return summary
