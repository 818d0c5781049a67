"""The global-batch contrastive loss equals the dense loss on one device, value and gradients.

The multi-device cases run `tests/multidevice/contrastive_check.py` in
subprocesses with 8 simulated CPU devices (meshes (8,1,1), (2,4,1), (2,2,2) of
('data', 'fsdp', 'tensor'), batch on ('data', 'fsdp')); the single-device cases
run here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from capture_jax import losses
from capture_jax.training.contrastive import global_contrastive_loss
from tests.helpers import with_cpu_devices
from tests.multidevice.contrastive_check import loss_setup

CHECK = Path(__file__).parent / 'multidevice' / 'contrastive_check.py'
TOL = 1e-5


def _rel(got, ref):
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  return np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30)


def _one_device_mesh():
  return Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ('data', 'fsdp', 'tensor'))


@pytest.fixture(scope='module')
def multidevice_result():
  """Runs the 8-device check, chunk 0 and chunk 4 in two concurrent processes."""
  # conftest.py's LLVM optimisation level only shortens compiles (half the CPU time); the
  # HLO, the partitioning and the collectives under test are the same.
  env = with_cpu_devices(8)
  procs = [
      subprocess.Popen(
          [sys.executable, str(CHECK), '--chunks', chunks],
          env=env,
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
      )
      for chunks in ('0', '4')
  ]
  results = []
  for p in procs:
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-4000:]
    results.append(json.loads(out.strip().splitlines()[-1]))
  merged = results[0]
  merged['cases'] += results[1]['cases']
  return merged


def test_multidevice_all_cases_ran(multidevice_result):
  ran = {(tuple(c['mesh']), c['kind'], c['chunk']) for c in multidevice_result['cases']}
  expected = {
      (m, k, c)
      for m in [(8, 1, 1), (2, 4, 1), (2, 2, 2)]
      for k in losses.CONTRASTIVE_KINDS
      for c in (0, 4)
  }
  assert ran == expected


@pytest.mark.parametrize('kind', losses.CONTRASTIVE_KINDS)
def test_multidevice_equals_dense(multidevice_result, kind):
  params = {
      'ntxent': [],
      'clip': ['d_log_inv_temperature'],
      'siglip': ['d_log_inv_temperature', 'd_bias'],
  }[kind]
  cases = [c for c in multidevice_result['cases'] if c['kind'] == kind]
  assert len(cases) == 6
  for case in cases:
    for name in ['loss', 'd_text', 'd_visual'] + params:
      assert case[name] <= TOL, (name, case)


def test_local_batch_loss_differs_from_global(multidevice_result):
  # Control: were negatives taken from each device's slice only, the loss would
  # be far from the global one, so the equality above is not an accident.
  for kind, c in multidevice_result['controls'].items():
    assert abs(c['mean_of_local'] - c['global']) > 0.1 * abs(c['global']), kind


def test_indivisible_global_batch_is_refused(multidevice_result):
  assert any('not divisible' in e for e in multidevice_result['errors_raised'])


@pytest.mark.parametrize('kind,chunk', [('ntxent', 0), ('ntxent', 2), ('clip', 0), ('siglip', 0)])
def test_one_device_equals_dense(kind, chunk):
  kt, kv = jax.random.split(jax.random.key(1))
  text = jax.random.normal(kt, (8, 16), jnp.float32)
  visual = jax.random.normal(kv, (8, 16), jnp.float32) + 0.5 * text
  cfg, params = loss_setup(kind, chunk)
  mesh = _one_device_mesh()
  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))
  ref = grad(lambda t, v, p: losses.contrastive_loss(t, v, cfg, p))(text, visual, params)
  got = grad(lambda t, v, p: global_contrastive_loss(t, v, cfg, p, mesh))(text, visual, params)
  assert _rel(got[0], ref[0]) <= TOL
  assert jax.tree.structure(got[1]) == jax.tree.structure(ref[1])
  for g, r in zip(jax.tree.leaves(got[1]), jax.tree.leaves(ref[1])):
    assert np.max(np.abs(np.asarray(r))) > 0  # every gradient is nonzero, so the check has teeth
    assert _rel(g, r) <= TOL


def test_bad_configuration_is_refused():
  mesh = _one_device_mesh()
  x = jnp.ones((8, 16), jnp.float32)
  cfg, params = loss_setup('clip', chunk=3)
  with pytest.raises(ValueError, match='contrastive_chunk=3 must divide'):
    global_contrastive_loss(x, x, cfg, params, mesh)
  cfg, params = loss_setup('clip')
  with pytest.raises(ValueError, match='not axes of the mesh'):
    global_contrastive_loss(x, x, cfg, params, mesh, batch_axes=('batch',))
  cfg.contrastive = 'triplet'
  with pytest.raises(ValueError, match='must be one of'):
    global_contrastive_loss(x, x, cfg, params, mesh)
