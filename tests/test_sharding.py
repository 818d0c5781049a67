"""Mesh, parameter sharding rules, the global batch, multi-process start-up and the launch scripts.

Multi-device checks run in subprocesses with 8 simulated CPU devices
(`tests/multidevice/sharding_check.py`: paper-size specs on four meshes, the
demo model created sharded and run on a (2,2,2) mesh); the 2-process check
runs `tests/multidevice/sharding_two_process.py` through
`launch/local_multiprocess.sh` (2 processes x 2 CPU devices, Gloo). The rules
themselves are checked here on `AbstractMesh`es (no devices needed).
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import portpicker
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from capture_jax import param_paths
from capture_jax import config as config_lib
from capture_jax.training import distributed
from capture_jax.training import sharding
from tests.helpers import with_cpu_devices
from tests.helpers import without_compile_cache
from tests.helpers import without_device_count

REPO = Path(__file__).resolve().parents[1]
CHECK = REPO / 'tests' / 'multidevice' / 'sharding_check.py'
TWO_PROCESS = REPO / 'tests' / 'multidevice' / 'sharding_two_process.py'
LAUNCH = REPO / 'launch'
MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 1, 8)]
TOL = 1e-5


def mesh_cfg(shape=(-1, 1, 1), **overrides):
  m = config_lib.mesh_config()
  m.data, m.fsdp, m.tensor = shape
  for k, v in overrides.items():
    m[k] = v
  return m


def abstract_mesh(shape):
  return AbstractMesh(tuple(shape), sharding.MESH_AXES)


def specs_of(tree: dict, shape, **overrides) -> dict:
  """{path: spec} for a flat {path: shape} dict of parameters."""
  params = {k: jax.ShapeDtypeStruct(v, np.float32) for k, v in tree.items()}
  return sharding.param_specs(params, abstract_mesh(shape), mesh_cfg(shape, **overrides))


# ----------------------------------------------------------------------------
# Mesh.


def test_mesh_shape_fills_minus_one():
  assert sharding.mesh_shape(mesh_cfg((-1, 2, 2)), 8) == (2, 2, 2)
  assert sharding.mesh_shape(mesh_cfg((1, -1, 1)), 8) == (1, 8, 1)
  assert sharding.mesh_shape(mesh_cfg((2, 2, 2)), 8) == (2, 2, 2)
  assert sharding.mesh_shape(config_lib.mesh_config(), 4) == (
      4,
      1,
      1,
  )  # the default: pure data parallel


@pytest.mark.parametrize(
    'shape, devices, message',
    [
        ((2, 2, 2), 4, r'data=2, fsdp=2, tensor=2\) needs 8 devices, but there are 4'),
        ((-1, 4, 1), 6, r'multiple of 4 devices, but there are 6'),
        ((-1, -1, 1), 8, r'at most one mesh axis may be -1'),
        ((0, 1, 1), 1, r'positive integers or -1'),
    ],
)
def test_mesh_shape_errors(shape, devices, message):
  with pytest.raises(ValueError, match=message):
    sharding.mesh_shape(mesh_cfg(shape), devices)


def test_make_mesh_checks_before_compiling():
  devices = jax.devices()[:1]
  mesh = sharding.make_mesh(mesh_cfg((-1, 1, 1)), devices)
  assert mesh.axis_names == sharding.MESH_AXES and dict(mesh.shape) == {
      'data': 1,
      'fsdp': 1,
      'tensor': 1,
  }
  with pytest.raises(ValueError, match=r'needs 2 devices, but there are 1'):
    sharding.make_mesh(mesh_cfg((1, 2, 1)), devices)


# ----------------------------------------------------------------------------
# Rules (on abstract meshes).

LAYER = {
    'text_stream/layer_0/query/dense/kernel': (768, 768),
    'text_stream/layer_0/query/dense/bias': (768,),
    'text_stream/layer_0/attention_output/kernel': (768, 768),
    'text_stream/layer_0/attention_output/bias': (768,),
    'text_stream/layer_0/ffn/intermediate/kernel': (768, 3072),
    'text_stream/layer_0/ffn/intermediate/bias': (3072,),
    'text_stream/layer_0/ffn/output/kernel': (3072, 768),
    'text_stream/layer_0/ffn/output/bias': (768,),
    'text_stream/layer_0/attention_layer_norm/scale': (768,),
    'coattention/layer_0/key2/dense/kernel': (768, 512),
    'coattention/layer_0/dense1/kernel': (512, 768),
    'co_transformer/layer_0/out_proj/kernel': (768, 768),
    'co_transformer/layer_0/mlp/intermediate/kernel': (768, 3072),
    'word_embeddings/embedding': (21128, 768),
    'mlm_bias': (21128,),
    'mrm_decoder/kernel': (768, 2048),
    'visual_embeddings/location_embeddings/kernel': (5, 768),
}


def test_tensor_rule_is_megatron():
  s = specs_of(LAYER, (1, 1, 8))
  assert s['text_stream/layer_0/query/dense/kernel'] == P(None, 'tensor')  # heads: output dim
  assert s['text_stream/layer_0/query/dense/bias'] == P('tensor')
  assert s['text_stream/layer_0/attention_output/kernel'] == P('tensor', None)  # input dim
  assert s['text_stream/layer_0/attention_output/bias'] == P(None)
  assert s['text_stream/layer_0/ffn/intermediate/kernel'] == P(None, 'tensor')
  assert s['text_stream/layer_0/ffn/intermediate/bias'] == P('tensor')
  assert s['text_stream/layer_0/ffn/output/kernel'] == P('tensor', None)
  assert s['text_stream/layer_0/ffn/output/bias'] == P(None)
  assert s['coattention/layer_0/key2/dense/kernel'] == P(None, 'tensor')
  assert s['coattention/layer_0/dense1/kernel'] == P('tensor', None)
  assert s['co_transformer/layer_0/out_proj/kernel'] == P('tensor', None)
  assert s['co_transformer/layer_0/mlp/intermediate/kernel'] == P(None, 'tensor')
  assert s['word_embeddings/embedding'] == P('tensor', None)  # vocab-parallel
  assert s['mlm_bias'] == P('tensor')
  # Not part of a tensor-parallel block: replicated over tensor (fsdp is 1 here).
  assert s['text_stream/layer_0/attention_layer_norm/scale'] == P(None)
  assert s['mrm_decoder/kernel'] == P(None, None)


def test_tensor_rule_only_splits_divisible_dims():
  s = specs_of(
      {
          'word_embeddings/embedding': (21127, 768),
          'a/query/dense/kernel': (768, 100),
          'a/ffn/output/kernel': (100, 768),
      },
      (1, 1, 8),
  )
  assert s['word_embeddings/embedding'] == P(None, 'tensor')  # vocab not divisible: the width
  assert s['a/query/dense/kernel'] == P(None, None)
  assert s['a/ffn/output/kernel'] == P(None, None)


def test_fsdp_rule_shards_largest_free_divisible_dim_of_large_params():
  s = specs_of(LAYER, (1, 8, 1))
  assert s['text_stream/layer_0/ffn/intermediate/kernel'] == P(None, 'fsdp')  # 3072 > 768
  assert s['text_stream/layer_0/ffn/output/kernel'] == P('fsdp', None)
  assert s['text_stream/layer_0/query/dense/kernel'] == P('fsdp', None)  # tie: the first
  assert s['word_embeddings/embedding'] == P('fsdp', None)
  assert s['mlm_bias'] == P(None)  # 21128 < 2**18
  assert s['visual_embeddings/location_embeddings/kernel'] == P(None, None)
  # The threshold is inclusive; indivisible dims are skipped.
  t = specs_of(
      {'a/kernel': (512, 512), 'b/kernel': (512, 511), 'c/kernel': (7, 9)},
      (1, 8, 1),
      fsdp_min_size=512 * 511,
  )
  assert t == {'a/kernel': P('fsdp', None), 'b/kernel': P('fsdp', None), 'c/kernel': P(None, None)}
  u = specs_of({'a/kernel': (512, 511)}, (1, 8, 1), fsdp_min_size=512 * 511 + 1)
  assert u == {'a/kernel': P(None, None)}


def test_fsdp_and_tensor_combine_and_order_does_not_matter():
  s = specs_of(LAYER, (2, 2, 2))
  assert s['text_stream/layer_0/query/dense/kernel'] == P('fsdp', 'tensor')
  assert s['text_stream/layer_0/attention_output/kernel'] == P('tensor', 'fsdp')
  assert s['text_stream/layer_0/ffn/intermediate/kernel'] == P('fsdp', 'tensor')
  assert s['text_stream/layer_0/ffn/output/kernel'] == P('tensor', 'fsdp')
  assert s['word_embeddings/embedding'] == P('tensor', 'fsdp')
  assert specs_of(LAYER, (2, 2, 2), rules='tensor,fsdp') == s
  only_tensor = specs_of(LAYER, (2, 2, 2), rules='tensor')
  assert only_tensor['text_stream/layer_0/query/dense/kernel'] == P(None, 'tensor')
  only_fsdp = specs_of(LAYER, (2, 2, 2), rules='fsdp')
  assert only_fsdp['text_stream/layer_0/ffn/intermediate/kernel'] == P(None, 'fsdp')


def test_replicated_rule_and_size_one_axes():
  for shape, rules in [((2, 2, 2), 'replicated'), ((8, 1, 1), 'fsdp,tensor')]:
    s = specs_of(LAYER, shape, rules=rules)
    assert all(all(e is None for e in spec) for spec in s.values()), s
    assert all(len(spec) == len(LAYER[k]) for k, spec in s.items())


def test_scanned_params_never_shard_the_layer_axis():
  tree = {
      'text_stream/scanned/query/dense/kernel': (4, 768, 768),
      'text_stream/scanned/ffn/output/kernel': (4, 3072, 768),
      'text_stream/scanned/ffn/intermediate/bias': (4, 3072),
      'visual_stream/scanned/attention_layer_norm/scale': (8, 16),
  }
  s = specs_of(tree, (2, 2, 2))
  assert s['text_stream/scanned/query/dense/kernel'] == P(None, 'fsdp', 'tensor')
  assert s['text_stream/scanned/ffn/output/kernel'] == P(None, 'tensor', 'fsdp')
  assert s['text_stream/scanned/ffn/intermediate/bias'] == P(None, 'tensor')
  # The layer axis (8) is the only dim divisible by fsdp=8; it still is not sharded.
  t = specs_of(
      {'visual_stream/scanned/ln/scale': (8, 12), 'x/scanned/k': (8, 16, 16)},
      (1, 8, 1),
      fsdp_min_size=0,
  )
  assert t == {
      'visual_stream/scanned/ln/scale': P(None, None),
      'x/scanned/k': P(None, 'fsdp', None),
  }


@pytest.mark.parametrize(
    'rules, bad', [('fsdp,pipeline', 'pipeline'), ('tensor, expert', 'expert'), ('FSDP', 'FSDP')]
)
def test_unknown_rule_is_named(rules, bad):
  with pytest.raises(
      ValueError, match=re.escape(repr(bad)) + r".*known rules: \['replicated', 'fsdp', 'tensor'\]"
  ):
    specs_of(LAYER, (2, 2, 2), rules=rules)


def test_empty_or_repeated_rules():
  with pytest.raises(ValueError, match='empty'):
    sharding.parse_rules(' , ')
  with pytest.raises(ValueError, match='twice'):
    sharding.parse_rules('fsdp,fsdp')
  assert sharding.parse_rules(' fsdp , tensor ') == ('fsdp', 'tensor')


def test_state_shardings_like_mirrors_params():
  shapes = {'dense': {'kernel': (768, 3072), 'bias': (3072,)}, 'ln': {'scale': (768,)}}
  params = jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s, np.float32), shapes, is_leaf=lambda x: isinstance(x, tuple)
  )
  mesh = abstract_mesh((1, 8, 1))
  shardings = sharding.param_shardings(params, mesh, mesh_cfg((1, 8, 1), fsdp_min_size=1024))
  assert shardings['dense']['kernel'].spec == P(None, 'fsdp')
  # Weight decay masked to kernels, as the trainer does: a state with MaskedNodes and a count.
  mask = {'dense': {'kernel': True, 'bias': False}, 'ln': {'scale': False}}
  tx = optax.chain(
      optax.clip_by_global_norm(1.0), optax.adamw(optax.linear_schedule(1e-3, 0.0, 10), mask=mask)
  )
  state = jax.eval_shape(tx.init, params)
  out = sharding.state_shardings_like(state, params, shardings)
  leaves = jax.tree_util.tree_flatten_with_path(out)[0]
  specs = {param_paths.path_str(p): s.spec for p, s in leaves}
  mu = {k: v for k, v in specs.items() if '/mu/' in k}
  assert len(mu) == 3 and all(
      v == shardings['dense']['kernel'].spec for k, v in mu.items() if 'kernel' in k
  )
  assert sum(v == P(None, 'fsdp') for v in specs.values()) == 2  # mu and nu of the kernel
  assert all(v == P() for k, v in specs.items() if k.endswith('count'))
  assert all(s.mesh == mesh for _, s in leaves)


def test_global_batch_from_local_one_device_and_errors():
  mesh = sharding.make_mesh(mesh_cfg(), jax.devices()[:1])
  out = sharding.global_batch_from_local({'a': np.arange(6).reshape(3, 2), 'b': np.ones(3)}, mesh)
  assert out['a'].shape == (3 * jax.process_count(), 2)
  assert out['a'].sharding.spec == P(('data', 'fsdp'))
  np.testing.assert_array_equal(np.asarray(out['a']), np.arange(6).reshape(3, 2))
  with pytest.raises(ValueError, match='disagree on the local batch size'):
    sharding.global_batch_from_local({'a': np.zeros((3, 2)), 'b': np.zeros(4)}, mesh)
  with pytest.raises(ValueError, match='leading batch dimension'):
    sharding.global_batch_from_local({'a': np.float32(1.0)}, mesh)


def test_spec_table_lists_per_device_shapes():
  params = {'word_embeddings': {'embedding': jax.ShapeDtypeStruct((21128, 768), np.float32)}}
  mesh = abstract_mesh((2, 2, 2))
  text = sharding.spec_table(params, sharding.param_specs(params, mesh, mesh_cfg((2, 2, 2))), mesh)
  assert "word_embeddings/embedding  (21128, 768)  P('tensor', 'fsdp')  (10564, 384)" in text


# ----------------------------------------------------------------------------
# 8 simulated devices (subprocesses).


@pytest.fixture(scope='module')
def multidevice():
  """Runs the 'specs' and 'demo' parts of the 8-device check in two concurrent processes."""
  # conftest.py's LLVM optimisation level only shortens compiles; partitioning and numerics are
  # unchanged.
  env = with_cpu_devices(8)
  procs = {
      part: subprocess.Popen(
          [sys.executable, str(CHECK), part],
          env=env,
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
      )
      for part in ('specs', 'demo')
  }
  merged = {}
  for part, p in procs.items():
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, f'{part}:\n{err[-4000:]}'
    merged.update(json.loads(out.strip().splitlines()[-1]))
  return merged


def _rows(multidevice, shape, scan=False):
  return {r['path']: r for r in multidevice['specs'][f'{"scan" if scan else "plain"}/{shape}']}


@pytest.mark.parametrize('scan', [False, True])
@pytest.mark.parametrize('shape', MESHES)
def test_paper_specs_are_valid(multidevice, shape, scan):
  sizes = dict(zip(sharding.MESH_AXES, shape))
  rows = _rows(multidevice, shape, scan)
  assert len(rows) == (387 if not scan else 115)
  for path, r in rows.items():
    assert isinstance(r['local'], list), (path, r['local'])  # a real NamedSharding accepted it
    assert len(r['spec']) == len(r['shape']), path
    named = [a for a in r['spec'] if a is not None]
    assert len(named) == len(set(named)) and set(named) <= {'fsdp', 'tensor'}, (path, r['spec'])
    expect = [d // (sizes[a] if a else 1) for d, a in zip(r['shape'], r['spec'])]
    assert r['local'] == expect and all(
        d % (sizes[a] if a else 1) == 0 for d, a in zip(r['shape'], r['spec'])
    )
    if scan and 'scanned' in path.split('/'):
      assert r['spec'][0] is None, path


def test_paper_data_parallel_is_replicated(multidevice):
  rows = _rows(multidevice, (8, 1, 1))
  assert all(all(a is None for a in r['spec']) for r in rows.values())


def test_paper_fsdp_shards_big_kernels(multidevice):
  rows = _rows(multidevice, (1, 8, 1))
  big = {p: r for p, r in rows.items() if math.prod(r['shape']) >= 2**18}
  assert len(big) > 100
  for path, r in big.items():
    assert 'fsdp' in r['spec'], path
    assert math.prod(r['local']) * 8 == math.prod(r['shape']), path
  small = [r for r in rows.values() if math.prod(r['shape']) < 2**18]
  assert small and all('fsdp' not in r['spec'] for r in small)
  assert rows['word_embeddings/embedding']['local'] == [21128 // 8, 768]
  assert rows['text_stream/layer_0/ffn/intermediate/kernel']['spec'] == [None, 'fsdp']
  fsdp_bytes = sum(4 * math.prod(r['local']) for r in rows.values())
  full_bytes = sum(4 * math.prod(r['shape']) for r in rows.values())
  assert fsdp_bytes < 0.2 * full_bytes  # per-device parameter memory


@pytest.mark.parametrize('shape', [(1, 1, 8), (2, 2, 2)])
def test_paper_tensor_parallel_splits_heads_and_ffn(multidevice, shape):
  rows = _rows(multidevice, shape)
  column = [
      p
      for p in rows
      if re.search(r'/(query|key|value)[12]?/dense/kernel$|/intermediate/kernel$', p)
  ]
  row = [p for p in rows if re.search(r'/(attention_output|out_proj|dense[12]|output)/kernel$', p)]
  # text and visual streams 4 x (q, k, v, ffn), co-attention 4 x (6 q/k/v + 2 ffn), co-transformer 6 x 4
  assert len(column) == 4 * 4 + 4 * 4 + 4 * 8 + 6 * 4
  # streams 4 x (attention_output, ffn/output), co-attention 4 x (dense1, dense2, 2 ffn/output), co-transformer 6 x 2
  assert len(row) == 4 * 2 + 4 * 2 + 4 * 4 + 6 * 2
  for p in column:
    assert rows[p]['spec'][-1] == 'tensor', (p, rows[p]['spec'])
  for p in row:
    assert rows[p]['spec'][0] == 'tensor', (p, rows[p]['spec'])
  assert rows['word_embeddings/embedding']['spec'][0] == 'tensor'
  if shape == (2, 2, 2):
    assert rows['text_stream/layer_0/query/dense/kernel']['spec'] == ['fsdp', 'tensor']
    assert rows['text_stream/layer_0/query/dense/kernel']['local'] == [384, 384]
    assert rows['co_transformer/layer_5/out_proj/kernel']['spec'] == ['tensor', 'fsdp']


@pytest.mark.parametrize('shape', MESHES)
def test_paper_scanned_specs_equal_per_layer_specs(multidevice, shape):
  plain, scanned = _rows(multidevice, shape), _rows(multidevice, shape, scan=True)
  checked = 0
  for path, r in scanned.items():
    if 'scanned' not in path:
      assert r['spec'] == plain[path]['spec'], path
      continue
    layer0 = plain[path.replace('scanned', 'layer_0')]
    assert r['shape'][1:] == layer0['shape'] and r['spec'][1:] == layer0['spec'], path
    checked += 1
  assert checked == 80  # 4 + 4 + 4 + 6 layer stacks' worth of leaves, stacked


def test_demo_created_sharded_and_forward_matches_one_device(multidevice):
  d = multidevice['demo']
  assert d['placed'] == d['num_params'] == 195  # every parameter created in its target sharding
  assert d['sharded_fsdp'] > 50 and d['sharded_tensor'] > 50  # and really split
  assert d['out_devices'] == 8 and d['ref_devices'] == 1
  assert set(d['forward_rel_err']) >= {'mlm_logits', 'mrm_pred', 'pooled_text', 'enc_pooled_visual'}
  for key, err in d['forward_rel_err'].items():
    assert err <= TOL, (key, err)


def test_demo_optimizer_state_sharded_like_params(multidevice):
  d = multidevice['demo']
  assert d['opt_mirrored'] == 2 * d['num_params'] == d['opt_mirrored_ok']  # mu and nu
  assert d['opt_others_replicated']


def test_global_batch_from_local_on_8_devices(multidevice):
  g = multidevice['demo']['global_batch']
  assert g['shapes'] == {'a': [16, 3], 'b': [16]}
  assert g['sharding_ok'] and g['values_ok']
  assert g['shard_rows'] == [4]  # 16 rows over data x fsdp = 4, replicated over tensor
  assert (
      'global batch 10' in g['indivisible_error']
      and 'data x fsdp = 2 x 2 = 4' in g['indivisible_error']
  )


# ----------------------------------------------------------------------------
# Two processes on localhost (jax.distributed + Gloo), through the launch script.


def _launch_env(**extra):
  env = without_compile_cache(
      without_device_count(
          {k: v for k, v in os.environ.items() if not k.startswith(('CAPTURE_', 'SLURM_'))}
      )
  )
  env['PYTHON'] = sys.executable
  env.update(extra)
  return env


def test_two_processes_build_one_mesh_and_all_reduce(tmp_path):
  env = _launch_env(
      CAPTURE_MAIN=str(TWO_PROCESS),
      CAPTURE_DEVICES_PER_PROCESS='2',
      CAPTURE_PORT=str(portpicker.pick_unused_port()),
  )
  proc = subprocess.run(
      [str(LAUNCH / 'local_multiprocess.sh'), '2', str(tmp_path)],
      env=env,
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  results = [json.loads((tmp_path / f'process_{i}.json').read_text()) for i in range(2)]
  for i, r in enumerate(results):
    assert r['plan'] == 'explicit' and r['process_index'] == i and r['is_main'] == (i == 0)
    assert (r['process_count'], r['device_count'], r['local_device_count']) == (2, 4, 2)
    assert r['mesh'] == {'data': 2, 'fsdp': 2, 'tensor': 1} and r['global_shape'] == [8, 3]
    assert r['sum'] == r['psum'] == 3 * sum(range(8))  # each process only fed half of the rows
    assert r['gathered'] == list(range(8))
  assert '[p0]' in proc.stdout and '[p1]' in proc.stdout


# ----------------------------------------------------------------------------
# Launch scripts (no JAX: stand-in programs).


def _write_exe(path: Path, text: str) -> Path:
  path.write_text(text)
  path.chmod(0o755)
  return path


def test_local_multiprocess_stops_the_others_when_one_fails(tmp_path):
  prog = tmp_path / 'prog.py'
  prog.write_text(
      'import os, sys, time\n'
      'if os.environ["CAPTURE_PROCESS_ID"] == "1":\n'
      '  sys.exit(3)\n'
      'time.sleep(120)\n'
  )
  start = time.monotonic()
  proc = subprocess.run(
      [str(LAUNCH / 'local_multiprocess.sh'), '2'],
      env=_launch_env(CAPTURE_MAIN=str(prog)),
      capture_output=True,
      text=True,
      timeout=100,
  )
  assert proc.returncode == 3, proc.stderr
  assert 'process 1 exited with status 3' in proc.stderr
  assert time.monotonic() - start < 60


def test_local_multiprocess_forwards_sigterm(tmp_path):
  prog = tmp_path / 'prog.py'
  prog.write_text(
      'import os, signal, sys, time\n'
      'from pathlib import Path\n'
      'out = Path(sys.argv[1]); pid = os.environ["CAPTURE_PROCESS_ID"]\n'
      'def stop(*_):\n'
      '  (out / f"stopped_{pid}").write_text(os.environ["CAPTURE_COORDINATOR"] + " "\n'
      '      + os.environ["CAPTURE_NUM_PROCESSES"] + " " + os.environ["XLA_FLAGS"])\n'
      '  sys.exit(0)\n'
      'signal.signal(signal.SIGTERM, stop)\n'
      '(out / f"ready_{pid}").touch()\n'
      'time.sleep(120)\n'
  )
  env = _launch_env(CAPTURE_MAIN=str(prog), CAPTURE_DEVICES_PER_PROCESS='3', CAPTURE_PORT='12345')
  proc = subprocess.Popen(
      [str(LAUNCH / 'local_multiprocess.sh'), '2', str(tmp_path)],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )
  deadline = time.monotonic() + 60
  while not all((tmp_path / f'ready_{i}').exists() for i in range(2)):
    assert time.monotonic() < deadline and proc.poll() is None
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)
  proc.communicate(timeout=60)
  assert proc.returncode == 0
  # The script appends the device count to the XLA flags it was given (conftest.py's).
  flags = f"{env['XLA_FLAGS']} --xla_force_host_platform_device_count=3".strip()
  for i in range(2):
    assert (tmp_path / f'stopped_{i}').read_text() == f'localhost:12345 2 {flags}'


def test_local_multiprocess_usage():
  proc = subprocess.run(
      [str(LAUNCH / 'local_multiprocess.sh')], capture_output=True, text=True, timeout=30
  )
  assert proc.returncode == 2 and 'launch/local_multiprocess.sh N [trainer args...]' in proc.stderr


FAKE_PYTHON = """#!/usr/bin/env python3
import json, os, sys
keys = ('CAPTURE_COORDINATOR', 'CAPTURE_NUM_PROCESSES', 'CAPTURE_PROCESS_ID', 'CAPTURE_LOCAL_DEVICE_IDS')
with open(os.environ['FAKE_OUT'], 'a') as f:
  f.write(json.dumps({'argv': sys.argv[1:], **{k: os.environ.get(k) for k in keys}}) + '\\n')
"""

# srun stand-in: starts SLURM_NTASKS copies of its command (after the options) with the task variables.
FAKE_SRUN = """#!/usr/bin/env bash
while [[ "$1" == -* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$((i % (SLURM_NTASKS / SLURM_JOB_NUM_NODES))) "$@" &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
"""


@pytest.mark.parametrize('tasks_per_node', [1, 4])
def test_slurm_script_sets_coordinator_and_ranks(tmp_path, tasks_per_node):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  _write_exe(bin_dir / 'scontrol', '#!/usr/bin/env bash\nprintf "gpu-node-017\\ngpu-node-018\\n"\n')
  _write_exe(bin_dir / 'srun', FAKE_SRUN)
  fake_python = _write_exe(tmp_path / 'python', FAKE_PYTHON)
  out = tmp_path / 'calls.jsonl'
  env = _launch_env(
      PATH=f'{bin_dir}:{os.environ["PATH"]}',
      PYTHON=str(fake_python),
      FAKE_OUT=str(out),
      SLURM_JOB_ID='4242',
      SLURM_JOB_NODELIST='gpu-node-[017-018]',
      SLURM_JOB_NUM_NODES='2',
      SLURM_NTASKS=str(2 * tasks_per_node),
      SLURM_SUBMIT_DIR=str(REPO),
  )
  proc = subprocess.run(
      ['bash', str(LAUNCH / 'slurm_gpu.sbatch'), '--config=configs/demo.py', '--workdir=/w d'],
      env=env,
      capture_output=True,
      text=True,
      timeout=60,
  )
  assert proc.returncode == 0, proc.stderr
  calls = sorted(
      (json.loads(line) for line in out.read_text().splitlines()),
      key=lambda c: int(c['CAPTURE_PROCESS_ID']),
  )
  assert [c['CAPTURE_PROCESS_ID'] for c in calls] == [str(i) for i in range(2 * tasks_per_node)]
  for c in calls:
    assert c['argv'] == ['-m', 'capture_jax.train', '--config=configs/demo.py', '--workdir=/w d']
    assert c['CAPTURE_COORDINATOR'] == f'gpu-node-017:{20000 + 4242 % 20000}'
    assert c['CAPTURE_NUM_PROCESSES'] == str(2 * tasks_per_node)
  local = [c['CAPTURE_LOCAL_DEVICE_IDS'] for c in calls]
  assert local == ([None, None] if tasks_per_node == 1 else [str(i % 4) for i in range(8)])


def test_tpu_pod_script_runs_the_same_command_on_every_worker(tmp_path):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  out = tmp_path / 'gcloud.json'
  _write_exe(
      bin_dir / 'gcloud',
      '#!/usr/bin/env python3\nimport json, os, sys\n'
      'open(os.environ["FAKE_OUT"], "w").write(json.dumps(sys.argv[1:]))\n',
  )
  env = _launch_env(
      PATH=f'{bin_dir}:{os.environ["PATH"]}',
      FAKE_OUT=str(out),
      TPU_NAME='pod',
      ZONE='us-central2-b',
  )
  del env['PYTHON']  # the workers' default, python3
  args = ['--config=configs/capture_paper.py', '--workdir=gs://b/run', "--config.note=it's a b"]
  proc = subprocess.run(
      [str(LAUNCH / 'tpu_pod.sh'), *args], env=env, capture_output=True, text=True, timeout=60
  )
  assert proc.returncode == 0, proc.stderr
  argv = json.loads(out.read_text())
  assert argv[:5] == ['compute', 'tpus', 'tpu-vm', 'ssh', 'pod'] and '--worker=all' in argv
  command = next(a for a in argv if a.startswith('--command='))[len('--command=') :]
  assert 'CAPTURE_CLUSTER=tpu python3 -m capture_jax.train' in command
  # The remote shell gets back exactly the arguments.
  echoed = subprocess.run(
      ['bash', '-c', command.split(' -m capture_jax.train', 1)[1].join(['printf "%s\\n"', ''])],
      capture_output=True,
      text=True,
      check=True,
  ).stdout.splitlines()
  assert echoed == args
  # The other commands (export, evaluate, the proposer) run the same way.
  env['MODULE'] = 'capture_jax.evaluate'
  proc = subprocess.run(
      [str(LAUNCH / 'tpu_pod.sh'), '--workdir=gs://b/run', '--split=dev'],
      env=env,
      capture_output=True,
      text=True,
      timeout=60,
  )
  assert proc.returncode == 0, proc.stderr
  command = next(a for a in json.loads(out.read_text()) if a.startswith('--command='))
  assert command.endswith(
      'CAPTURE_CLUSTER=tpu python3 -m capture_jax.evaluate --workdir=gs://b/run --split=dev'
  )
  usage = subprocess.run(
      [str(LAUNCH / 'tpu_pod.sh')], env=_launch_env(), capture_output=True, text=True
  )
  assert (
      usage.returncode == 2
      and 'TPU_NAME=capture-v4-32 ZONE=us-central2-b launch/tpu_pod.sh' in usage.stderr
  )


def test_readme_tpu_commands_run_as_written_through_the_pod_script(tmp_path):
  """The README's TPU block, run by bash with a recording `gcloud`: the pod script turns it into
  one ssh per command, each running the named module with exactly the README's arguments."""
  readme = (REPO / 'README.md').read_text()
  section = readme[readme.index('### Workdirs in a bucket') :]
  block = section[section.index('    gcloud storage buckets create') :]
  lines = []
  for line in block.splitlines():
    if not line.startswith('    '):
      break
    lines.append(line[4:])
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  calls = tmp_path / 'gcloud.jsonl'
  _write_exe(
      bin_dir / 'gcloud',
      '#!/usr/bin/env python3\nimport json, os, sys\n'
      'open(os.environ["FAKE_OUT"], "a").write(json.dumps(sys.argv[1:]) + "\\n")\n',
  )
  env = _launch_env(PATH=f'{bin_dir}:{os.environ["PATH"]}', FAKE_OUT=str(calls))
  del env['PYTHON']
  script = '\n'.join(['set -euo pipefail', f'cd {REPO}', *lines])
  proc = subprocess.run(['bash', '-c', script], env=env, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  recorded = [json.loads(l) for l in calls.read_text().splitlines()]
  ssh = [c for c in recorded if c[:4] == ['compute', 'tpus', 'tpu-vm', 'ssh']]
  remote = [next(a for a in c if a.startswith('--command='))[len('--command=') :] for c in ssh]
  runs = [r for r in remote if ' -m capture_jax.' in r]
  data = (
      '--config.data.data_dir=../product1m/data --config.data.tfds_dir=../product1m/tfds '
      '--config.data.vocab_file=../product1m/vocab.txt'
  )
  workdir = '--config=configs/capture_paper.py --workdir=gs://BUCKET/capture/paper'
  assert [r.split(' -m ', 1)[1] for r in runs] == [
      f'capture_jax.train {workdir} {data}',
      f'capture_jax.instances train {workdir} {data}',
      f'capture_jax.evaluate {workdir} --split=dev {data}',
  ]
  workers = [next(a for a in c if a.startswith('--worker=')) for c in ssh if ' -m ' in str(c)]
  assert workers == ['--worker=all', '--worker=0', '--worker=all']
  assert 'pip install' in runs[0] and 'gcloud storage cp -r gs://BUCKET/product1m ..' in runs[0]
  assert any(c[:4] == ['compute', 'tpus', 'tpu-vm', 'scp'] for c in recorded)  # SYNC=1
  # Every module and flag the README uses exists.
  for module in ('train', 'export', 'evaluate'):
    assert (REPO / 'capture_jax' / f'{module}.py').is_file()
  assert (REPO / 'capture_jax' / 'instances' / '__main__.py').is_file()


# ----------------------------------------------------------------------------
# distributed.resolve: which start-up each environment gets.


def test_resolve_explicit():
  env = {
      'CAPTURE_COORDINATOR': 'host0:1234',
      'CAPTURE_NUM_PROCESSES': '4',
      'CAPTURE_PROCESS_ID': '3',
      'SLURM_JOB_ID': '1',
      'SLURM_PROCID': '0',
      'SLURM_NTASKS': '9',
  }  # explicit wins over SLURM
  plan = distributed.resolve(env)
  assert plan == distributed.Plan('explicit', 'host0:1234', 4, 3, None)
  assert plan.initialize_kwargs()['cluster_detection_method'] == 'deactivate'
  env2 = {
      'JAX_COORDINATOR_ADDRESS': 'h:1',
      'CAPTURE_NUM_PROCESSES': '2',
      'CAPTURE_PROCESS_ID': '0',
      'CAPTURE_LOCAL_DEVICE_IDS': '0,1',
  }
  assert distributed.resolve(env2) == distributed.Plan('explicit', 'h:1', 2, 0, (0, 1))
  assert distributed.resolve({'CAPTURE_NUM_PROCESSES': '1'}).method == 'single'


@pytest.mark.parametrize(
    'env, message',
    [
        ({'CAPTURE_NUM_PROCESSES': '2', 'CAPTURE_PROCESS_ID': '0'}, 'CAPTURE_COORDINATOR'),
        (
            {'CAPTURE_COORDINATOR': 'h:1', 'CAPTURE_NUM_PROCESSES': '2', 'CAPTURE_PROCESS_ID': '2'},
            r'must be in \[0',
        ),
        (
            {
                'CAPTURE_COORDINATOR': 'h:1',
                'CAPTURE_NUM_PROCESSES': 'two',
                'CAPTURE_PROCESS_ID': '0',
            },
            'integer',
        ),
        (
            {'CAPTURE_COORDINATOR': 'h', 'CAPTURE_NUM_PROCESSES': '2', 'CAPTURE_PROCESS_ID': '0'},
            'host:port',
        ),
        ({'CAPTURE_CLUSTER': 'mpi'}, 'CAPTURE_CLUSTER must be one of'),
        ({'CAPTURE_CLUSTER': 'slurm'}, 'not a SLURM step'),
    ],
)
def test_resolve_errors(env, message):
  with pytest.raises(ValueError, match=message):
    distributed.resolve(env)


def test_resolve_slurm_and_tpu_and_single():
  step = {
      'SLURM_JOB_ID': '7',
      'SLURM_PROCID': '1',
      'SLURM_STEP_NUM_TASKS': '2',
      'SLURM_STEP_NUM_NODES': '2',
  }
  one_per_node = distributed.resolve({**step, 'CUDA_VISIBLE_DEVICES': '0,1,2,3'})
  assert one_per_node == distributed.Plan('slurm', None, 2, 1, (0, 1, 2, 3))  # every local GPU
  assert one_per_node.initialize_kwargs() == {
      'cluster_detection_method': 'slurm',
      'local_device_ids': [0, 1, 2, 3],
  }
  assert distributed.resolve({**step, 'SLURM_GPUS_ON_NODE': '8'}).local_device_ids == tuple(
      range(8)
  )
  per_gpu = distributed.resolve(
      {**step, 'SLURM_STEP_NUM_TASKS': '16', 'CUDA_VISIBLE_DEVICES': '0,1,2,3,4,5,6,7'}
  )
  assert per_gpu.method == 'slurm' and per_gpu.local_device_ids is None  # JAX: GPU SLURM_LOCALID
  assert distributed.resolve({**step, 'SLURM_STEP_NUM_TASKS': '1'}).method == 'single'
  assert distributed.resolve({'TPU_WORKER_HOSTNAMES': 'w0,w1,w2,w3'}).method == 'tpu'
  assert distributed.resolve({'TPU_WORKER_HOSTNAMES': 'w0'}).method == 'single'
  assert distributed.resolve({}, on_tpu_vm=True).method == 'tpu'
  assert distributed.resolve({}).method == 'single'
  assert distributed.resolve({**step, 'CAPTURE_CLUSTER': 'none'}).method == 'single'


def test_initialize_single_process_does_nothing():
  plan = distributed.initialize({})
  assert plan.method == 'single' and not jax.distributed.is_initialized()
  assert distributed.is_main_process()
