"""Per-step metrics: JSON lines and TensorBoard event files (tensorboardX, no TensorFlow), process 0 only."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Mapping

import jax

from capture_jax.training import distributed

# Peak dense bf16 FLOP/s per device, for model FLOP utilisation.
PEAK_FLOPS = {
    'H100': 989e12,
    'H200': 989e12,
    'A100': 312e12,
    'L4': 121e12,
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,
    'TPU v5e': 197e12,
    'TPU v5p': 459e12,
    'TPU v6 lite': 918e12,
}


def peak_flops(device: jax.Device) -> float | None:
  kind = device.device_kind
  for name, flops in PEAK_FLOPS.items():
    if name in kind:
      return flops
  return None


class MetricWriter:
  """Writes `{workdir}/metrics.jsonl` and TensorBoard events under `{workdir}/tensorboard` on process 0."""

  def __init__(self, workdir: str | Path, enabled: bool | None = None):
    self.enabled = distributed.is_main_process() if enabled is None else enabled
    self._jsonl = None
    self._tb = None
    if self.enabled:
      Path(workdir).mkdir(parents=True, exist_ok=True)
      self._jsonl = open(Path(workdir) / 'metrics.jsonl', 'a', encoding='utf-8')
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel

      self._tb = SummaryWriter(str(Path(workdir) / 'tensorboard'))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    record = {'step': int(step), 'time': time.time(), **{k: float(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    for key, value in metrics.items():
      self._tb.add_scalar(key, float(value), int(step))

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
