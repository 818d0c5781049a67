"""Stop requests (SIGTERM, SIGINT) that every process of a job acts on at the same step.

    with preemption.Preemption() as stop:
      while step < end:
        ...dispatch step...
        step += 1
        if stop.reached(step):  # host-only: no device work, no collective
          save a checkpoint at `step`; break

One process: a Python signal handler sets a flag, `reached` returns it.

Several processes (`jax.distributed` initialised, `jax.process_count() > 1`):
JAX's coordination service agrees on the step. `jax.distributed.initialize`
starts a preemption sync manager (`jax_enable_preemption_service`, on by
default at JAX 0.10.2) whose C++ SIGTERM handler tells the coordinator; the
processes then agree, in a background thread and through the coordinator's
key-value store, on the step after the largest one any of them has reported
(`multihost_utils.reached_preemption_sync_point`, what MaxText and Orbax's
`CheckpointManager.reached_preemption` use). So a SIGTERM that reaches one
process only stops all of them at the same step, and no process waits for
the devices or the other hosts at the steps in between (the per-step
`process_allgather` this replaces did both). Hence, on that path:
  - SIGTERM is left to JAX's handler (a Python handler would replace it);
    SIGINT is turned into a SIGTERM to this process, to reach the same handler.
  - `reached(step)` must be called at every step, with consecutive steps from
    the same first step on every process (the sync point is a step number).
  - Call `reached(start)` once as soon as the first step is known (before
    compiling), so that a notice during compilation is agreed on from there.
"""

from __future__ import annotations

import os
import signal
import threading

import jax

DEFAULT_MESSAGE = 'finishing this step, saving a checkpoint, then exiting'


def coordination_service_available() -> bool:
  """Whether stop requests go through JAX's coordination service (several processes, with
  `jax.distributed` initialised and its preemption sync manager running)."""
  from jax._src import distributed as jax_distributed  # pylint: disable=import-outside-toplevel

  state = jax_distributed.global_state
  return (
      jax.process_count() > 1
      and state.client is not None
      and state.preemption_sync_manager is not None
  )


class Preemption:
  """Turns SIGTERM / SIGINT into a stop that every process takes at the same step.

  Signal handlers are installed on the main thread only (Python allows no
  other); elsewhere only the coordination service (several processes) can stop
  the loop.
  """

  def __init__(self, message: str = DEFAULT_MESSAGE):
    self.message = message
    self.requested = False  # this process was signalled (one process; SIGINT on several)
    self.coordinated = False
    self._previous = {}

  def __enter__(self) -> 'Preemption':
    self.coordinated = coordination_service_available()
    if jax.process_count() > 1 and not self.coordinated:
      raise RuntimeError(
          f"{jax.process_count()} processes but JAX's preemption service is not running "
          '(jax.distributed not initialised, or jax_enable_preemption_service=False): the '
          'processes could not agree on a stop step without a collective at every step'
      )
    if threading.current_thread() is threading.main_thread():
      signals = (signal.SIGINT,) if self.coordinated else (signal.SIGTERM, signal.SIGINT)
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    del frame
    self.requested = True
    print(f'\nreceived {signal.Signals(signum).name}: {self.message}', flush=True)
    if self.coordinated:  # JAX's handler tells the coordinator; the others learn from it
      os.kill(os.getpid(), signal.SIGTERM)

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def reached(self, step: int) -> bool:
    """Whether to stop after `step` (the same answer on every process; host-only, cheap)."""
    if not self.coordinated:
      return self.requested
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    return bool(multihost_utils.reached_preemption_sync_point(int(step)))


__all__ = ('Preemption', 'coordination_service_available')
