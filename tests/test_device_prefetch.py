"""`DevicePrefetch`: batches ahead on a thread, checkpoints at the consumed position."""

from __future__ import annotations

import json
import time

import grain
import numpy as np
import pytest

from capture_jax.training import device_prefetch


def _iterator(n=50):
  return iter(grain.MapDataset.range(n).map(lambda i: {'x': np.full(2, i)}).to_iter_dataset())


@pytest.mark.parametrize('depth', [0, 1, 3])
def test_the_saved_position_is_after_the_last_consumed_batch(depth):
  it = _iterator()
  batches = device_prefetch.DevicePrefetch(it, lambda b: b['x'] * 10, depth)
  try:
    assert [int(next(batches)[0]) for _ in range(5)] == [0, 10, 20, 30, 40]
    time.sleep(0.2)  # the thread fills its slots
    state = batches.get_state()
    # The thread read ahead, but never more than `depth` batches.
    ahead = json.loads(json.dumps(it.get_state()))
    fresh = _iterator()
    fresh.set_state(ahead)
    assert int(next(fresh)['x'][0]) == 5 + depth
    # A checkpoint of `batches` resumes with the first batch no step consumed.
    resumed = _iterator()
    resumed.set_state(json.loads(state.decode()))
    assert int(next(resumed)['x'][0]) == 5
  finally:
    batches.close()


def test_errors_and_the_end_reach_the_consumer_in_order():
  def build(b):
    if int(b['x'][0]) == 3:
      raise ValueError('bad record 3')
    return b['x']

  batches = device_prefetch.DevicePrefetch(_iterator(), build, 2)
  assert [int(next(batches)[0]) for _ in range(3)] == [0, 1, 2]
  with pytest.raises(ValueError, match='bad record 3'):
    next(batches)
  batches.close()
  short = device_prefetch.DevicePrefetch(_iterator(2), lambda b: b['x'], 2)
  assert len(list(short)) == 2
  short.close()
  with pytest.raises(ValueError, match='prefetch_to_device must be >= 0'):
    device_prefetch.DevicePrefetch(_iterator(), lambda b: b, -1)
