"""The trainer end to end on a tiny dataset: exact resume, preemption, corrupted and incompatible
checkpoints, and configuration errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from capture_jax import train
from capture_jax.training import checkpoint as checkpoint_lib
from tests.helpers import no_device_fetches
from tests.helpers import start_python
from tests.helpers import trainer_config
from tests.helpers import with_cpu_devices
from tests.helpers import without_compile_cache

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def dataset_config(tmp_path_factory):
  return trainer_config(tmp_path_factory.mktemp('data'))


def params_of(result):
  return jax.tree.map(np.asarray, jax.device_get(result.state.params))


def assert_trees_equal(a, b):
  flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert len(flat_a) == len(flat_b)
  for (path, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def test_exact_resume_is_bitwise_identical(dataset_config, tmp_path, monkeypatch):
  """2N steps in one go == N steps, stop, resume for N more (parameters, optimizer state, data),
  with batches prefetched to the devices and no device fetch between the sync points."""
  monkeypatch.setattr(train, 'BETWEEN_SYNC_POINTS', no_device_fetches)
  assert dataset_config.data.prefetch_to_device >= 2
  straight = train.run(dataset_config, tmp_path / 'straight')
  first = train.run(dataset_config, tmp_path / 'resumed', stop_after_steps=3)
  assert int(first.state.step) == 3
  second = train.run(dataset_config, tmp_path / 'resumed')
  assert int(second.state.step) == 6
  assert_trees_equal(params_of(straight), params_of(second))
  assert_trees_equal(
      jax.device_get(straight.state.opt_state), jax.device_get(second.state.opt_state)
  )
  # The losses after the resume are the ones the uninterrupted run logged.
  log = lambda d: [json.loads(line) for line in (d / 'metrics.jsonl').read_text().splitlines()]
  straight_losses = {r['step']: r['loss/total'] for r in log(tmp_path / 'straight')}
  resumed_losses = {r['step']: r['loss/total'] for r in log(tmp_path / 'resumed')}
  assert straight_losses == resumed_losses
  assert straight.last_metrics['loss/total'] > 0 and straight.last_metrics['skipped_updates'] == 0

  # A corrupted latest checkpoint is reported and the previous one is used.
  ckpts = checkpoint_lib.checkpoint_dir(tmp_path / 'resumed')
  steps = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
  assert steps[-1] == 6 and 4 in steps
  for f in Path(ckpts / '6' / 'state').rglob('*'):
    if f.is_file():
      f.write_bytes(b'garbage')
  again = train.run(dataset_config, tmp_path / 'resumed', stop_after_steps=1)
  assert int(again.state.step) == 5  # resumed from 4, one more step


def test_incompatible_workdir_is_refused_before_compiling(dataset_config, tmp_path):
  train.run(dataset_config, tmp_path, stop_after_steps=1)
  other = dataset_config.copy_and_resolve_references()
  other.model.intermediate_size = 64
  with pytest.raises(
      checkpoint_lib.IncompatibleCheckpointError,
      match=r'model.intermediate_size: checkpoint 48, config 64',
  ):
    train.run(other, tmp_path)


def test_batch_not_divisible_by_the_mesh_is_reported(dataset_config):
  mesh = jax.sharding.AbstractMesh((4, 2, 1), ('data', 'fsdp', 'tensor'))
  cfg = dataset_config.copy_and_resolve_references()
  cfg.data.batch_size = 12
  with pytest.raises(
      ValueError,
      match=r"data.batch_size=12 is not divisible by the 8 devices of the mesh's "
      r'batch axes \(data=4 x fsdp=2\)',
  ):
    train.validate_config(cfg, mesh)


@pytest.mark.parametrize(
    'field, value, message',
    [
        ('train.microbatches', 3, 'train.microbatches=3 must divide the per-device batch 8'),
        ('train.init', 'imagenet', r"config.train.init='imagenet' is not allowed: expected one of"),
        ('mesh.data', 3, r'mesh \(data=3, fsdp=1, tensor=1\) needs 3 devices'),
    ],
)
def test_bad_configuration_is_reported_before_compiling(
    dataset_config, tmp_path, field, value, message
):
  cfg = dataset_config.copy_and_resolve_references()
  section, name = field.split('.')
  cfg[section][name] = value
  with pytest.raises(ValueError, match=message):
    train.run(cfg, tmp_path)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(dataset_config, tmp_path):
  config_file = tmp_path / 'config.json'
  cfg = dataset_config.copy_and_resolve_references()
  cfg.train.num_steps = 10_000
  cfg.checkpoint.every_steps = 10_000
  config_file.write_text(cfg.to_json())
  script = (
      'import json, sys, ml_collections; from capture_jax import train; '
      f'cfg = ml_collections.ConfigDict(json.load(open({str(config_file)!r}))); '
      f'r = train.run(cfg, {str(tmp_path / "run")!r}); sys.exit(0 if r.preempted else 3)'
  )
  proc = start_python(script)
  metrics = tmp_path / 'run' / 'metrics.jsonl'
  deadline = time.time() + 240
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().count('\n') >= 2):
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=240)
  assert proc.returncode == 0, out
  assert 'received SIGTERM' in out and 'Run the same command again to resume' in out
  steps = [
      int(p.name)
      for p in checkpoint_lib.checkpoint_dir(tmp_path / 'run').iterdir()
      if p.name.isdigit()
  ]
  assert steps and max(steps) >= 2


def read_losses(workdir: Path) -> dict[int, float]:
  return {
      r['step']: r['loss/total']
      for r in map(json.loads, (workdir / 'metrics.jsonl').read_text().splitlines())
  }


def test_two_processes_train_like_one_process_with_the_same_devices(dataset_config, tmp_path):
  """2 processes x 2 CPU devices (Gloo) get the losses of 1 process x 4 devices on the same global
  batches, with the host input and with the split resident on the devices.

  Dropout is off: its masks follow a row's place in the global array, which differs
  between the two layouts (process p feeds stream positions p, p + 2, ...).
  """
  cfg = dataset_config.copy_and_resolve_references()
  cfg.model.hidden_dropout_prob = cfg.model.attention_probs_dropout_prob = 0.0
  cfg.checkpoint.every_steps = 2
  config_json = tmp_path / 'config.json'
  config_json.write_text(cfg.to_json())
  script = REPO / 'tests' / 'multidevice' / 'train_process.py'
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHON': sys.executable}
  single = subprocess.run(
      [sys.executable, str(script), str(config_json), str(tmp_path / 'one'), '3'],
      cwd=REPO,
      text=True,
      capture_output=True,
      timeout=600,
      env=with_cpu_devices(4, env),
  )
  assert single.returncode == 0, single.stdout + single.stderr

  def two_processes(config, workdir):
    config_file = tmp_path / f'{workdir}.json'
    config_file.write_text(config.to_json())
    proc = subprocess.run(
        [str(REPO / 'launch' / 'local_multiprocess.sh'), '2', str(config_file)]
        + [str(tmp_path / workdir), '3'],
        cwd=REPO,
        text=True,
        capture_output=True,
        timeout=600,
        env={
            **without_compile_cache(env),
            'CAPTURE_MAIN': str(script),
            'CAPTURE_DEVICES_PER_PROCESS': '2',
        },
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc

  two_processes(cfg, 'two')
  # The same on 2 processes with the split resident in the 4 devices' memory: each process loads
  # its devices' rows and feeds only record indices.
  cfg.data.resident = True
  resident = two_processes(cfg, 'resident')
  assert 'into device memory' in resident.stdout
  one, two = read_losses(tmp_path / 'one'), read_losses(tmp_path / 'two')
  on_devices = read_losses(tmp_path / 'resident')
  assert sorted(one) == sorted(two) == sorted(on_devices) == [1, 2, 3]
  np.testing.assert_allclose([two[s] for s in (1, 2, 3)], [one[s] for s in (1, 2, 3)], rtol=1e-5)
  np.testing.assert_allclose(
      [on_devices[s] for s in (1, 2, 3)], [one[s] for s in (1, 2, 3)], rtol=1e-5
  )
  # Every process wrote its share of the checkpoint: the data iterator state of both processes.
  data_dir = checkpoint_lib.checkpoint_dir(tmp_path / 'two') / '3' / 'data'
  assert sorted(p.name for p in data_dir.iterdir() if p.suffix == '.json') == [
      'process_0-of-2.json',
      'process_1-of-2.json',
  ]


def test_checkpoint_restores_onto_a_different_mesh(dataset_config, tmp_path):
  config_json = tmp_path / 'config.json'
  config_json.write_text(dataset_config.to_json())
  result = subprocess.run(
      [
          sys.executable,
          str(REPO / 'tests' / 'multidevice' / 'restore_on_other_mesh.py'),
          str(config_json),
          str(tmp_path / 'run'),
      ],
      cwd=REPO,
      text=True,
      capture_output=True,
      timeout=600,
      env=with_cpu_devices(8),
  )
  assert result.returncode == 0 and 'OK' in result.stdout, result.stdout + result.stderr


def test_initialise_from_a_released_checkpoint(dataset_config, tmp_path):
  """`train.init=release` places the converted weights, already sharded, as step 0's parameters."""
  from tests.helpers import release_state_dict  # pylint: disable=import-outside-toplevel
  from capture_jax import convert  # pylint: disable=import-outside-toplevel

  cfg = dataset_config.copy_and_resolve_references()
  state_dict = release_state_dict(cfg.model, seed=3)
  np.savez(tmp_path / 'release.npz', **state_dict)
  cfg.train.update(init='release', init_path=str(tmp_path / 'release.npz'))
  result = train.run(cfg, tmp_path / 'run', stop_after_steps=0)
  expected, _ = convert.from_release_state_dict(state_dict, cfg.model)
  assert_trees_equal(params_of(result)['model'], jax.tree.map(np.asarray, expected))


def _start_two_processes(config_json: Path, workdir: Path, steps: int, out: Path, log: Path):
  """The two processes of one job (2 x 2 CPU devices, Gloo), logging to `log`.{0,1}."""
  import socket  # pylint: disable=import-outside-toplevel

  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  script = REPO / 'tests' / 'multidevice' / 'preempt_process.py'
  procs = []
  for i in range(2):
    env = {
        **without_compile_cache(with_cpu_devices(2)),
        'CAPTURE_COORDINATOR': f'localhost:{port}',
        'CAPTURE_NUM_PROCESSES': '2',
        'CAPTURE_PROCESS_ID': str(i),
    }
    f = open(f'{log}.{i}', 'w', encoding='utf-8')  # pylint: disable=consider-using-with
    procs.append(
        subprocess.Popen(
            [sys.executable, str(script), str(config_json), str(workdir), str(steps), str(out)],
            cwd=REPO,
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
        )
    )
  return procs


def _results(procs, log: Path) -> list[dict]:
  outs = []
  for i, p in enumerate(procs):
    p.wait(timeout=600)
    text = Path(f'{log}.{i}').read_text(encoding='utf-8')
    assert p.returncode == 0, f'process {i}:\n{text}'
    outs.append(json.loads(text.split('RESULT ', 1)[1].splitlines()[0]))
  return outs


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step_without_syncs(
    dataset_config, tmp_path
):
  """Two processes with the loop's device-to-host transfer guard on between the sync points
  (logging every 4 steps, checkpoints every 3): SIGTERM to process 1 only stops both at the same
  step through JAX's coordination service, with one checkpoint there; resuming from it ends
  bitwise where an uninterrupted run does."""
  cfg = dataset_config.copy_and_resolve_references()
  cfg.train.update(num_steps=1000, log_every=4)
  cfg.checkpoint.update(every_steps=3, keep_last=100)
  config_json = tmp_path / 'config.json'
  config_json.write_text(cfg.to_json())
  end = 15  # the stop lands a few steps after checkpoint 3 (7 in the runs seen)

  straight = _start_two_processes(
      config_json, tmp_path / 'straight', end, tmp_path / 'straight.npz', tmp_path / 'straight'
  )
  assert [r['step'] for r in _results(straight, tmp_path / 'straight')] == [end, end]

  run = tmp_path / 'run'
  procs = _start_two_processes(config_json, run, end, tmp_path / 'first.npz', tmp_path / 'first')
  ckpts = checkpoint_lib.checkpoint_dir(run)
  deadline = time.time() + 300
  while time.time() < deadline and not (ckpts / '3').is_dir():
    time.sleep(0.1)
  procs[1].send_signal(signal.SIGTERM)
  first = _results(procs, tmp_path / 'first')
  stop = first[0]['step']
  assert first == [{'step': stop, 'preempted': True}] * 2
  assert 3 <= stop < end
  saved = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
  # Orbax's first-step save, the regular ones, then one at the stop.
  assert saved == sorted({1, *range(3, stop, 3), stop})
  assert sorted(p.name for p in (ckpts / str(stop) / 'data').iterdir() if p.suffix == '.json') == [
      'process_0-of-2.json',
      'process_1-of-2.json',
  ]

  resumed = _start_two_processes(
      config_json, run, end - stop, tmp_path / 'resumed.npz', tmp_path / 'resumed'
  )
  assert [r['step'] for r in _results(resumed, tmp_path / 'resumed')] == [end, end]
  a, b = np.load(tmp_path / 'straight.npz'), np.load(tmp_path / 'resumed.npz')
  assert sorted(a) == sorted(b) and len(a) > 0
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert read_losses(tmp_path / 'straight') == read_losses(run)
