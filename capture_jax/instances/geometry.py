"""The training-free `boxes` proposer: product instances from box geometry alone.

Boxes are `(x1, y1, x2, y2)` in pixels, as in the region-feature files; their areas, IoU and
containment are `capture_jax.data.boxes`.
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections
import numpy as np

from capture_jax.data import boxes as boxes_lib
from capture_jax.instances import proposals as proposals_lib


def propose_boxes(
    record: Mapping[str, Any], config: ml_collections.ConfigDict
) -> list[proposals_lib.Proposal]:
  """Product instances from box geometry alone (no training, no features).

  The rule:

  0. Boxes smaller than `instances.boxes_min_area` of the image (specks) or
     larger than `instances.boxes_max_area` (the whole-image or scene box
     that detectors also write) are background.
  The others, greedily from the largest to the smallest:

  1. A box joins an existing group when it is a duplicate of the group's
     anchor (IoU >= `instances.boxes_iou`) or lies inside it (containment
     >= `instances.boxes_containment`: a part box); it joins the anchor it
     overlaps most.
  2. Otherwise it starts a new group, with itself as anchor.

  The score of a group is its share of the image's object evidence: the
  number of its boxes over the largest group's, times 0.5, plus 0.5 when the
  group has more than one box (clutter is mostly a lone box). Its known
  failure modes are the ones the synthetic world models: a box spanning two
  neighbours swallows both, overlapping products merge, and clutter of
  object size becomes an instance.

  Args:
    record: one sample's regions: `boxes` [N, 4], `image_w`, `image_h` (other
      keys are ignored).
    config: reads `config.instances.boxes_*`.
  Returns:
    Proposals, disjoint, by decreasing score.
  """
  boxes = proposals_lib.check_record(record, feature_dim=None)['boxes']
  cfg = config.instances
  area = boxes_lib.box_areas(boxes)
  image_area = float(record['image_w']) * float(record['image_h'])
  order = [
      i
      for i in np.argsort(-area, kind='stable')
      if cfg.boxes_min_area * image_area <= area[i] <= cfg.boxes_max_area * image_area
  ]
  members = _group_by_anchor(boxes, order, cfg.boxes_iou, cfg.boxes_containment)
  if not members:
    return []
  largest = max(len(m) for m in members.values())
  out = [
      proposals_lib.Proposal(
          tuple(sorted(m)), 0.5 * len(m) / largest + (0.5 if len(m) > 1 else 0.0)
      )
      for m in members.values()
  ]
  return proposals_lib.sort_proposals(out)


def _group_by_anchor(
    boxes: np.ndarray, order: list, iou_min: float, containment_min: float
) -> dict[int, list[int]]:
  """Anchor -> its boxes (anchors in the order they were found), visiting the boxes `[N, 4]`
  in `order` (rules 1 and 2 of `propose_boxes`)."""
  iou = boxes_lib.iou_matrix(boxes)
  contain = boxes_lib.containment_matrix(boxes)
  members: dict[int, list[int]] = {}
  for i in order:
    best, best_overlap = -1, 0.0
    for a in members:
      overlap = max(iou[i, a], contain[i, a])
      joins = iou[i, a] >= iou_min or contain[i, a] >= containment_min
      if joins and overlap > best_overlap:
        best, best_overlap = a, overlap
    if best < 0:
      members[int(i)] = [int(i)]
    else:
      members[best].append(int(i))
  return members
