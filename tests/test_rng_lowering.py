"""The unrolled CPU threefry lowering draws the same bits as JAX's rolled default.

Run in a fresh process: the lowering is registered process-wide, and the
comparison needs a process that still has JAX's default.
"""

import json

from tests.helpers import start_python

SCRIPT = r"""
import json
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

def draws():
  # Fresh functions per call: jit caches lowerings per function.
  key = jax.random.PRNGKey(7)
  out = {
      'bits': jax.jit(lambda k: jax.random.bits(k, (64, 24, 128), jnp.uint32))(key),
      'odd_bits': jax.jit(lambda k: jax.random.bits(k, (3, 5, 7), jnp.uint32))(key),
      'bernoulli': jax.jit(lambda k: jax.random.bernoulli(k, 0.9, (64, 4, 24, 17)))(key),
      'fold_in': jax.jit(lambda k: jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(k), 123)))(key),
      'split': jax.jit(lambda k: jax.random.split(k, 5))(key),
      'dropout': jax.jit(lambda k: nn.Dropout(0.1).apply({}, jnp.ones((8, 24, 128)), deterministic=False,
                                                        rngs={'dropout': k}))(key),
  }
  hlo = jax.jit(lambda k: jax.random.bits(k, (64, 24, 128), jnp.uint32)).lower(key).compile().as_text()
  return {k: np.asarray(v) for k, v in out.items()}, ' while(' in hlo

before, before_loops = draws()
from capture_jax.training import rng_lowering
active = rng_lowering.unroll_threefry_on_cpu()
again = rng_lowering.unroll_threefry_on_cpu()
after, after_loops = draws()
print(json.dumps({
    'active': active, 'again': again,
    'before_loops': before_loops, 'after_loops': after_loops,
    'equal': {k: bool(np.array_equal(before[k], after[k])) for k in before},
    'dropout_kept': float(after['dropout'].astype(bool).mean()),
}))
"""


def test_unrolled_threefry_draws_the_same_bits_without_a_loop():
  proc = start_python(SCRIPT)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out
  result = json.loads(out.strip().splitlines()[-1])
  # Active on the pinned JAX: a JAX upgrade that moves the private rule fails here, not silently.
  assert result['active'] and result['again']
  assert result['before_loops'], 'JAX default on CPU is a rolled loop; the comparison needs it'
  assert not result['after_loops']
  assert result['equal'] == {k: True for k in result['equal']}, result['equal']
  assert 0.85 < result['dropout_kept'] < 0.95  # the comparison is of real dropout masks
