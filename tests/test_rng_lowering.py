"""The unrolled CPU threefry lowering draws the same bits as JAX's rolled default.

Run in a fresh process: the lowering is registered process-wide, and the
comparison needs a process that starts with JAX's default.
"""

import json

from tests.helpers import start_python

SCRIPT = r"""
import json
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from capture_jax.training import rng_lowering

KEY = jax.random.PRNGKey(7)
PROGRAMS = {  # every way the train step draws random bits
    'bits': lambda k: jax.random.bits(k, (64, 24, 128), jnp.uint32),
    'odd_bits': lambda k: jax.random.bits(k, (3, 5, 7), jnp.uint32),
    'bernoulli': lambda k: jax.random.bernoulli(k, 0.9, (64, 4, 24, 17)),
    'fold_in': lambda k: jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(k), 123)),
    'split': lambda k: jax.random.split(k, 5),
    'dropout': lambda k: nn.Dropout(0.1).apply(
        {}, jnp.ones((8, 24, 128)), deterministic=False, rngs={'dropout': k}
    ),
}

def draws():
  # A fresh jit per call: jit caches lowerings per function.
  values, loops = {}, {}
  for name, fn in PROGRAMS.items():
    compiled = jax.jit(lambda k, fn=fn: fn(k)).lower(KEY).compile()
    values[name] = np.asarray(compiled(KEY))
    loops[name] = ' while(' in compiled.as_text()
  return values, loops

default, default_loops = draws()
active = rng_lowering.set_cpu_threefry_unrolled(True)
unrolled, unrolled_loops = draws()
rng_lowering.set_cpu_threefry_unrolled(False)
rolled, rolled_loops = draws()
print('RESULT ' + json.dumps({
    'active': active,
    'loops': {'default': default_loops, 'unrolled': unrolled_loops, 'rolled': rolled_loops},
    'unrolled_equal': {k: bool(np.array_equal(default[k], unrolled[k])) for k in default},
    'rolled_equal': {k: bool(np.array_equal(default[k], rolled[k])) for k in default},
    'dropout_kept': float(unrolled['dropout'].astype(bool).mean()),
}))
"""


def test_unrolled_threefry_draws_the_same_bits_without_a_loop_and_switches_back():
  proc = start_python(SCRIPT)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out
  lines = [line for line in out.splitlines() if line.startswith('RESULT ')]
  assert len(lines) == 1, out
  result = json.loads(lines[0][len('RESULT ') :])
  # Active on the pinned JAX: a JAX upgrade that moves the private rules fails here, not silently.
  assert result['active']
  everywhere = {name: True for name in result['loops']['default']}
  nowhere = {name: False for name in everywhere}
  # Every program: JAX's CPU default loops, the unrolled one does not, and False restores the loop.
  assert result['loops'] == {'default': everywhere, 'unrolled': nowhere, 'rolled': everywhere}
  assert result['unrolled_equal'] == everywhere, result['unrolled_equal']
  assert result['rolled_equal'] == everywhere, result['rolled_equal']
  assert 0.85 < result['dropout_kept'] < 0.95  # the comparison is of real dropout masks
