"""The proposal contract, the proposals file and proposal quality.

A proposer maps one sample's regions to its product instances: disjoint
groups of region indices, each with a score; regions in no group are
background. On disk proposals use the instance sidecar's format
(`formats.Instance(label, regions)`, one JSON line per sample) with an empty
label and an extra `score` field that `formats.read_instances` ignores, so
export and evaluation read proposals and the oracle sidecar alike.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Sequence

import numpy as np

from capture_jax import storage
from capture_jax.data import formats

METHODS = ('learned', 'boxes', 'oracle')


@dataclasses.dataclass(frozen=True)
class Proposal:
  """One proposed product instance: region indices (sorted, into the sample's
  regions as stored) and a score in [0, 1] (higher: more likely a product)."""

  regions: tuple[int, ...]
  score: float

  def to_instance(self) -> formats.Instance:
    return formats.Instance('', tuple(int(r) for r in self.regions))


def sort_proposals(proposals: Sequence[Proposal]) -> list[Proposal]:
  """By decreasing score, ties by first region (deterministic)."""
  return sorted(proposals, key=lambda p: (-p.score, p.regions[0] if p.regions else -1))


def check_record(record: Mapping[str, Any], feature_dim: int | None) -> dict[str, np.ndarray]:
  """Validates the regions of one sample for a proposer; returns boxes and features.

  Raises:
    ValueError: no regions, boxes not [N, 4], features of another width than
      `feature_dim` (None: not checked), or a non-positive image size; the
      message names the item id and what was expected.
  """
  item = record.get('item_id', '<unknown>')
  boxes = np.asarray(record['boxes'], np.float32)
  if boxes.ndim != 2 or boxes.shape[-1] != 4:
    raise ValueError(f'sample {item}: boxes have shape {boxes.shape}, expected [num_regions, 4]')
  if boxes.shape[0] == 0:
    raise ValueError(
        f'sample {item}: has no regions, expected at least 1 to propose product instances'
    )
  if not (float(record['image_w']) > 0 and float(record['image_h']) > 0):
    raise ValueError(
        f'sample {item}: image size {record["image_w"]}x{record["image_h"]}, expected positive'
    )
  out = {'boxes': boxes}
  if feature_dim is not None:
    feats = np.asarray(record['features'])
    if feats.ndim != 2 or feats.shape != (boxes.shape[0], feature_dim):
      raise ValueError(
          f'sample {item}: region features have shape {feats.shape}, expected '
          f'[{boxes.shape[0]}, {feature_dim}] (the proposer was built for features of width '
          f'{feature_dim})'
      )
    out['features'] = feats.astype(np.float32)
  return out


def format_proposals(item_id: str, proposals: Sequence[Proposal]) -> str:
  """One line of a proposals file: the sidecar's JSON with label '' and a score."""
  return json.dumps(
      {
          'item_id': item_id,
          'instances': [
              {'label': '', 'regions': [int(r) for r in p.regions], 'score': round(p.score, 6)}
              for p in proposals
          ],
      },
      ensure_ascii=False,
  )


def proposals_filename(split: str) -> str:
  return f'proposals_{split}.jsonl'


def write_proposals(
    path: storage.PathLike,
    proposals: Mapping[str, Sequence[Proposal]],
    item_ids: Sequence[str] | None = None,
) -> None:
  """Writes a proposals file (readable with `formats.read_instances`), in `item_ids` order,
  atomically (on disk or in a bucket)."""
  lines = [
      format_proposals(item_id, proposals[item_id]) + '\n'
      for item_id in (item_ids if item_ids is not None else proposals)
  ]
  storage.write_text(path, ''.join(lines))


def as_instances(proposals: Mapping[str, Sequence[Proposal]]) -> dict[str, list[formats.Instance]]:
  """item_id -> `formats.Instance`s (label ''), the type the instance pipeline takes."""
  return {k: [p.to_instance() for p in v] for k, v in proposals.items()}


def region_set_iou(a: Sequence[int], b: Sequence[int]) -> float:
  sa, sb = set(a), set(b)
  union = len(sa | sb)
  return len(sa & sb) / union if union else 0.0


def match_instances(
    truth: Sequence[Sequence[int]], props: Sequence[Sequence[int]], iou_threshold: float
) -> tuple[list[float], int]:
  """One sample's true instances matched to its proposals (region sets), one-to-one, each
  instance to its best unused proposal of IoU >= `iou_threshold`: (per instance the best IoU of
  any proposal, the number of matches)."""
  best_ious, used = [], set()
  for g in truth:
    ious = [region_set_iou(g, p) for p in props]
    best_ious.append(max(ious, default=0.0))
    hits = [k for k, v in enumerate(ious) if v >= iou_threshold and k not in used]
    if hits:
      used.add(max(hits, key=lambda k: ious[k]))
  return best_ious, len(used)


def proposal_quality(
    proposals: Mapping[str, Sequence[formats.Instance] | Sequence[Proposal]],
    truth: Mapping[str, Sequence[formats.Instance]],
    num_regions: Mapping[str, int],
    iou_threshold: float = 0.5,
) -> dict[str, float]:
  """Quality of proposals against an instance sidecar, over the samples of `num_regions`.

  A proposal matches a true instance when their region sets have IoU >=
  `iou_threshold` (at 0.5 and above a match is one-to-one, as both sides are
  disjoint groups). True instances are restricted to the regions a sample
  has (`num_regions`: regions truncated away at build time are dropped);
  instances left with no region are not counted.

  Args:
    proposals: item_id -> proposals (`Proposal`s or `formats.Instance`s);
      a sample absent here has no proposal.
    truth: item_id -> true instances (the sidecar).
    num_regions: item_id -> number of regions of the sample as stored.
  Returns:
    recall (matched true instances / true instances), precision (matched
    proposals / proposals), proposals_per_sample, instances_per_sample,
    background_assigned (background regions inside a proposal / background
    regions), mean_best_iou (per true instance, the best IoU of any
    proposal), samples.
  """
  n_true = n_prop = matched = 0  # a match is one true instance and one proposal
  bg_total = bg_assigned = 0
  best_ious = []
  for item_id, n in num_regions.items():
    gt = [
        tuple(r for r in inst.regions if 0 <= r < n)
        for inst in truth.get(item_id, ())
        if any(0 <= r < n for r in inst.regions)
    ]
    props = [tuple(p.regions) for p in proposals.get(item_id, ())]
    n_true += len(gt)
    n_prop += len(props)
    best, hits = match_instances(gt, props, iou_threshold)
    best_ious += best
    matched += hits
    owned = {r for g in gt for r in g}
    background = set(range(n)) - owned
    assigned = {r for p in props for r in p}
    bg_total += len(background)
    bg_assigned += len(background & assigned)
  samples = max(len(num_regions), 1)
  return {
      'recall': matched / max(n_true, 1),
      'precision': matched / max(n_prop, 1),
      'proposals_per_sample': n_prop / samples,
      'instances_per_sample': n_true / samples,
      'background_assigned': bg_assigned / max(bg_total, 1),
      'mean_best_iou': float(np.mean(best_ious)) if best_ious else 0.0,
      'samples': len(num_regions),
  }


def quality_table(rows: Mapping[str, Mapping[str, float]]) -> str:
  """A Markdown table of `proposal_quality` results, one row per proposer."""
  lines = [
      '| proposer | instance recall | instance precision | proposals / sample '
      '| true instances / sample | background assigned | mean best IoU |',
      '|---|---|---|---|---|---|---|',
  ]
  for name, q in rows.items():
    label = 'oracle (upper bound)' if name == 'oracle' else name
    lines.append(
        f'| {label} | {q["recall"]:.3f} | {q["precision"]:.3f} | '
        f'{q["proposals_per_sample"]:.2f} | {q["instances_per_sample"]:.2f} | '
        f'{q["background_assigned"]:.3f} | {q["mean_best_iou"]:.3f} |'
    )
  return '\n'.join(lines)
