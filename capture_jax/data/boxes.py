"""Geometry of region boxes: areas, pairwise intersections, IoU and containment.

Boxes are `(x1, y1, x2, y2)` in pixels, as in the region-feature files; every function takes
[N, 4] boxes and computes in float64. Pure numpy, so that the synthetic world's detector model
(`synthetic.layout`) and the instance proposers (`instances.geometry`, `instances.compose`)
share one definition without the data generator importing the proposers' JAX models.
"""

from __future__ import annotations

import numpy as np


def box_areas(boxes: np.ndarray) -> np.ndarray:
  """[N] areas of [N, 4] boxes (0 for degenerate boxes)."""
  b = np.asarray(boxes, np.float64)
  return np.maximum(b[:, 2] - b[:, 0], 0) * np.maximum(b[:, 3] - b[:, 1], 0)


def intersections(boxes: np.ndarray) -> np.ndarray:
  """[N, N] pairwise intersection areas."""
  b = np.asarray(boxes, np.float64)
  iw = np.minimum(b[:, None, 2], b[None, :, 2]) - np.maximum(b[:, None, 0], b[None, :, 0])
  ih = np.minimum(b[:, None, 3], b[None, :, 3]) - np.maximum(b[:, None, 1], b[None, :, 1])
  return np.maximum(iw, 0) * np.maximum(ih, 0)


def iou_matrix(boxes: np.ndarray) -> np.ndarray:
  """[N, N] pairwise IoU."""
  inter = intersections(boxes)
  area = box_areas(boxes)
  union = area[:, None] + area[None, :] - inter
  return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def containment_matrix(boxes: np.ndarray) -> np.ndarray:
  """[N, N] C[i, j] = area(i & j) / area(i): how much of box i lies inside box j."""
  inter = intersections(boxes)
  area = box_areas(boxes)
  return inter / np.maximum(area[:, None], 1e-12)
