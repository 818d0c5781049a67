"""Dropout's random bits on CPU: the unrolled threefry lowering, same bits, fewer thunks.

JAX lowers `threefry2x32` (behind every `jax.random` draw, so behind every
dropout mask) differently per platform: on GPU and TPU as 20 unrolled rounds,
on CPU as a 5-iteration `fori_loop` of 4 rounds each, to keep CPU compile
times down. XLA's CPU runtime runs such a loop as a `while` thunk whose body
re-executes ~20 small thunks per iteration, each a full pass over the bits,
and copies the loop carry between iterations: the demo's train step (27
dropout sites) ran 27 while loops and 2,033 copy thunks per step
(`docs/BENCHMARKS.md`, "Where the step's time goes").

`set_cpu_threefry_unrolled(True)` registers JAX's own unrolled lowering (the GPU/TPU
default) for CPU too. The rounds, constants and order are the same, so every
random bit is the same (`tests/test_rng_lowering.py` compares them), and
XLA fuses the rounds instead of looping. Measured alternating, it speeds the demo
step up and slows capture_paper's down, and compiles longer (docs/BENCHMARKS.md,
"Where the step's time goes"), so `train.cpu_unrolled_threefry` chooses it per run
(configs/demo.py turns it on). It touches a private JAX module, so it checks what
it patches and leaves JAX alone (returning False) when a JAX version no longer has
it; a test pins that it is active on the pinned JAX.
"""

from __future__ import annotations


def set_cpu_threefry_unrolled(unrolled: bool) -> bool:
  """Lowers `threefry2x32` on CPU unrolled (True) or as JAX's rolled loop (False, JAX's default).

  Process-wide, for programs lowered after the call (the train step calls it with
  `train.cpu_unrolled_threefry` each time it is built, so two configs in one process each get
  their own). Returns False, changing nothing, when this JAX lacks the private rules.
  """
  try:
    from jax._src.interpreters import mlir  # pylint: disable=import-outside-toplevel
    from jax._src.random import threefry2x32  # pylint: disable=import-outside-toplevel

    primitive = threefry2x32.threefry2x32_p
    unrolled_rule = threefry2x32._threefry2x32_lowering_rule  # pylint: disable=protected-access
    rolled_rule = threefry2x32._threefry2x32_cpu_lowering_rule  # pylint: disable=protected-access
    register = mlir.register_lowering
  except (ImportError, AttributeError):
    return False
  if unrolled:
    # Out of line, as JAX registers it for GPU: one function called by each draw.
    register(primitive, unrolled_rule, platform='cpu', inline=False)
  else:
    register(primitive, rolled_rule, platform='cpu')  # as JAX registers it
  return True
