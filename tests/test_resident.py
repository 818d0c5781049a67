"""The device-resident training split: its memory and the gather inside `jit`.

The 8-device cases run `tests/multidevice/resident_check.py` in their own process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from capture_jax import batch as batch_lib
from capture_jax import train
from capture_jax.data import source as source_lib
from capture_jax.data import train_input
from capture_jax.training import resident
from tests.helpers import trainer_config
from tests.helpers import with_cpu_devices

CHECK = Path(__file__).parent / 'multidevice' / 'resident_check.py'
PAPER_ROW = {'image_feat': ((36, 2048), np.float16)}


@pytest.fixture(scope='module')
def eight_devices():
  env = with_cpu_devices(8)
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


# --------------------------------------------------------------------------
# The resident mode of the trainer (one CPU device here; the gather's multi-device cases above).


@pytest.fixture(scope='module')
def dataset_config(tmp_path_factory):
  return trainer_config(tmp_path_factory.mktemp('data'))


def _resident(config):
  c = config.copy_and_resolve_references()
  c.data.resident = True
  return c


def test_resident_batches_are_the_host_batches_of_the_same_positions(dataset_config):
  host_config, resident_config = dataset_config, _resident(dataset_config)
  mesh = _one_cpu_mesh()
  source = source_lib.make_source(resident_config, 'train')
  layout = batch_lib.BatchLayout.from_config(resident_config)
  rows = layout.row_shapes()
  tables = resident.load_tables(
      train_input.resident_rows(resident_config, source), rows, len(source), mesh, chunk=5
  )
  gather = jax.jit(lambda t, i: resident.gather_rows(t, i, mesh))
  # Two processes' shares of each global batch, for four batches (past an epoch of this split).
  for process in (0, 1):
    kwargs = dict(process_index=process, process_count=2)
    hosts = train_input.make_train_iterator(host_config, **kwargs)
    indices = train_input.make_train_iterator(resident_config, **kwargs)
    for _ in range(4):
      host, index = next(hosts), next(indices)
      assert set(index) == set(batch_lib.INDEX_KEYS)
      np.testing.assert_array_equal(index['positions'], host['positions'])
      gathered = jax.device_get(gather(tables, index['record_index']))
      assert set(gathered) | {'positions'} == set(host)
      for key, value in gathered.items():
        assert value.dtype == host[key].dtype, key
        np.testing.assert_array_equal(value.view(np.uint8), host[key].view(np.uint8), key)


def test_resident_training_resumes_bitwise_and_follows_the_host_mode(dataset_config, tmp_path):
  config = _resident(dataset_config)
  straight = train.run(config, tmp_path / 'straight')
  first = train.run(config, tmp_path / 'resumed', stop_after_steps=3)
  assert int(first.state.step) == 3
  second = train.run(config, tmp_path / 'resumed')
  params = lambda r: jax.tree.map(np.asarray, jax.device_get(r.state.params))
  for a, b in zip(jax.tree.leaves(params(straight)), jax.tree.leaves(params(second))):
    np.testing.assert_array_equal(a, b)
  log = lambda d: [json.loads(l) for l in (d / 'metrics.jsonl').read_text().splitlines()]
  losses = lambda d: {r['step']: r['loss/total'] for r in log(d)}
  assert losses(tmp_path / 'straight') == losses(tmp_path / 'resumed')
  # The same records at the same positions as the host mode: the same losses (the programs
  # differ by the gather, so XLA may fuse differently: to float tolerance, not bit for bit).
  host = train.run(dataset_config, tmp_path / 'host')
  host_losses, resident_losses = losses(tmp_path / 'host'), losses(tmp_path / 'straight')
  assert host_losses.keys() == resident_losses.keys()
  for step, loss in host_losses.items():
    assert resident_losses[step] == pytest.approx(loss, rel=1e-5), step


def test_a_split_over_the_memory_budget_is_refused_before_compiling(dataset_config, tmp_path):
  config = _resident(dataset_config)
  config.data.resident_memory_fraction = 1e-9
  with pytest.raises(resident.ResidentSplitTooLargeError, match='does not fit: .* records x'):
    train.run(config, tmp_path / 'run')
  assert not (tmp_path / 'run' / 'metrics.jsonl').exists()
