"""The device-resident training split: its memory and the gather inside `jit`.

The 8-device cases run `tests/multidevice/resident_check.py` in their own process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from capture_jax.training import resident

CHECK = Path(__file__).parent / 'multidevice' / 'resident_check.py'
PAPER_ROW = {'image_feat': ((36, 2048), np.float16)}


@pytest.fixture(scope='module')
def eight_devices():
  env = dict(
      os.environ,
      JAX_PLATFORMS='cpu',
      XLA_FLAGS='--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0',
  )
  proc = subprocess.run(
      [sys.executable, str(CHECK)], env=env, capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  return [json.loads(line) for line in proc.stdout.strip().splitlines()]


def test_gather_is_bitwise_numpy_indexing_on_every_mesh(eight_devices):
  assert [tuple(r['mesh']) for r in eight_devices] == [(8, 1, 1), (2, 2, 2), (1, 2, 4), (1, 1, 8)]
  for row in eight_devices:
    assert all(row['bitwise'].values()), row  # negative zero and a NaN payload included


def test_every_device_holds_an_eighth_and_every_record_is_read_once(eight_devices):
  for row in eight_devices:
    assert row['table_rows'] == 40 and row['per_device_rows'] == 5  # 37 records padded to 40
    assert row['records_read'], row


class _Shape:
  """A stand-in mesh for the arithmetic: only `.shape` is read."""

  def __init__(self, data, fsdp, tensor):
    self.shape = {'data': data, 'fsdp': fsdp, 'tensor': tensor}


def test_product1m_features_per_device():
  # 1M pairs of 36 x 2,048 float16 regions: 147.5 GB, 18.4 GB on each of 8 H200s.
  assert resident.row_bytes(PAPER_ROW) == 36 * 2048 * 2
  per_h200 = resident.bytes_per_device(PAPER_ROW, 1_000_000, _Shape(8, 1, 1))
  assert per_h200 == 1_000_000 // 8 * 147_456
  assert resident.bytes_per_device(PAPER_ROW, 1_000_001, _Shape(4, 2, 1)) == 125_001 * 147_456


def test_gather_traffic_is_the_global_batch_less_the_own_share():
  assert resident.gather_bytes_per_device(PAPER_ROW, 2048, _Shape(8, 1, 1)) == 1792 * 147_456
  assert resident.gather_bytes_per_device(PAPER_ROW, 2048, _Shape(1, 1, 8)) == 0


def test_a_row_of_another_shape_is_refused():
  rows = {'image_feat': np.zeros((4, 36, 2048), np.float32)}  # float32 where float16 is stored
  with pytest.raises(
      ValueError,
      match=r"'image_feat': records \[0, 4\) read as .* float32, "
      r'expected \(4, 36, 2048\) float16',
  ):
    resident.load_tables(lambda a, b: rows, PAPER_ROW, 4, _one_cpu_mesh())


def _one_cpu_mesh():
  return Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ('data', 'fsdp', 'tensor'))
