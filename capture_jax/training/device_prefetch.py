"""Global batches put on the devices ahead of the step, with the data position of the consumed ones.

    batches = DevicePrefetch(data_iterator, make_batch, depth=2)
    batch = next(batches)   # built by a thread while the previous steps ran
    checkpoint.save(..., data_iterator=batches)   # the position after `batch`

A thread reads the next local batch, records the data iterator's state
after it, and builds the global `jax.Array` batch (`make_batch`, e.g.
`sharding.global_batch_from_local`: the host-to-device copies are queued
there), at most `depth` batches ahead of the loop, so building batch N+1
overlaps step N and a slow batch is absorbed by the ones built before it (the
idea of big_vision's input pipeline and `flax.jax_utils.prefetch_to_device`).
`depth=0`: no thread, each batch is read and built when the loop asks for it.

Exact resume: `get_state()` is the iterator's state after the last batch
`next` returned, not the thread's (which has read up to `depth` batches
further): a checkpoint resumes with the first batch no step has trained on.
It returns the JSON bytes Grain's checkpoint handler writes for a
`DatasetIterator` (so a checkpoint restores into a plain iterator); only the
thread touches the iterator once this object exists.
"""

from __future__ import annotations

import copy
import json
import queue
import threading
from typing import Any, Callable, Iterator

_END = object()


class DevicePrefetch:
  """An iterator of device batches `depth` ahead of the consumer (see the module docstring).

  Args:
    iterator: the data iterator (local numpy batches; `get_state()` as Grain's).
    make_batch: local batch -> device batch (called on the thread when depth > 0).
    depth: device batches built ahead of the one the loop takes (0: none).
  """

  def __init__(self, iterator: Any, make_batch: Callable[[Any], Any], depth: int):
    if depth < 0:
      raise ValueError(f'data.prefetch_to_device must be >= 0, got {depth}')
    self._iterator, self._make_batch, self.depth = iterator, make_batch, depth
    self._state = copy.deepcopy(iterator.get_state())  # the position of the consumed batches
    self._queue: queue.Queue = queue.Queue()
    # Free slots: a batch is built only when fewer than `depth` wait to be taken.
    self._slots = threading.Semaphore(depth)
    self._stop = threading.Event()
    self._thread = None
    if depth:
      self._thread = threading.Thread(target=self._produce, name='device_prefetch', daemon=True)
      self._thread.start()

  def _read(self) -> tuple[Any, Any]:
    local = next(self._iterator)
    state = copy.deepcopy(self._iterator.get_state())
    return self._make_batch(local), state

  def _produce(self) -> None:
    try:
      while True:
        while not self._slots.acquire(timeout=0.1):
          if self._stop.is_set():
            return
        if self._stop.is_set():
          return
        try:
          item = self._read()
        except StopIteration:
          self._queue.put(_END)
          return
        self._queue.put(item)
    except BaseException as e:  # pylint: disable=broad-except
      # Raised in the loop's thread by `__next__` (a bad record keeps its message).
      self._queue.put(e)

  def __iter__(self) -> Iterator[Any]:
    return self

  def __next__(self) -> Any:
    if not self.depth:
      batch, self._state = self._read()
      return batch
    item = self._queue.get()
    if item is _END:
      self._queue.put(_END)
      raise StopIteration
    if isinstance(item, BaseException):
      self._queue.put(item)
      raise item
    self._slots.release()
    batch, self._state = item
    return batch

  def get_state(self) -> bytes:
    """The data iterator's state after the last batch `next` returned (Grain's JSON bytes)."""
    return json.dumps(self._state, indent=4).encode()

  def close(self) -> None:
    """Stops the thread (the batches it built are dropped); idempotent."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None


__all__ = ('DevicePrefetch',)
