"""Fault injection into the trainer: divergence, corrupted checkpoints, two trainers in one
workdir, replayed metrics, and resuming under another batch size or step count.

Each test asserts what the run does (exception or exit status, a message naming the thing) and
what it leaves on disk. One tiny dataset serves the module; runs are a few steps each.
"""

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
from capture_jax.training import lock as lock_lib
from capture_jax.training import state as state_lib
from capture_jax.training import sharding
from tests.test_train import trainer_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def config(tmp_path_factory):
  cfg = trainer_config(tmp_path_factory.mktemp('data'))
  cfg.train.num_steps = 4
  return cfg


def copy(cfg, **train_overrides):
  cfg = cfg.copy_and_resolve_references()
  cfg.train.update(train_overrides)
  return cfg


def steps_on_disk(workdir: Path) -> list[int]:
  return sorted(
      int(p.name) for p in checkpoint_lib.checkpoint_dir(workdir).iterdir() if p.name.isdigit()
  )


def logged_steps(workdir: Path) -> list[int]:
  return [json.loads(l)['step'] for l in (workdir / 'metrics.jsonl').read_text().splitlines()]


def saved_params_finite(cfg, workdir: Path, step: int) -> bool:
  return all(np.isfinite(x).all() for x in jax.tree.leaves(model_params(cfg, workdir, step)))


def flip_a_byte(path: Path) -> None:
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0xFF
  path.write_bytes(bytes(data))


def largest_file(folder) -> Path:
  return max((p for p in Path(folder).rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)


# --------------------------------------------------------------------------
# Divergence.


def released_weights_with_a_nan(cfg, folder: Path) -> dict:
  """`train` overrides that start from a released state_dict one of whose tensors holds a NaN."""
  from tests.helpers import release_state_dict  # pylint: disable=import-outside-toplevel

  state_dict = release_state_dict(cfg.model, seed=3)
  state_dict['bert.embeddings.LayerNorm.bias'][0] = np.nan
  np.savez(folder / 'release.npz', **state_dict)
  return {'init': 'release', 'init_path': str(folder / 'release.npz')}


@pytest.mark.parametrize(
    'cause, message',
    [
        # Step 2 makes the parameters huge but finite; every later update is skipped.
        ('learning_rate', r'the last 3 updates \(to step 5\) were skipped'),
        # (An infinite learning rate is refused by the config schema.) Parameters that are NaN
        # from the start: the state of step 1, saved first, is refused.
        ('nan_weights', r'the parameters at step 1 are not finite; this state is not checkpointed'),
    ],
    ids=['skipped_updates', 'nonfinite_params'],
)
def test_diverged_run_stops_and_never_saves_nonfinite_parameters(config, tmp_path, cause, message):
  overrides = (
      {'learning_rate': 1e30}
      if cause == 'learning_rate'
      else released_weights_with_a_nan(config, tmp_path)
  )
  cfg = copy(config, max_consecutive_skipped=3, num_steps=8, **overrides)
  with pytest.raises(train.TrainingDivergedError, match=message):
    train.run(cfg, tmp_path)
  for step in steps_on_disk(tmp_path):
    assert saved_params_finite(cfg, tmp_path, step), step
  assert not (tmp_path / lock_lib.TRAIN_LOCK_FILE).read_text()  # the lock was released


def test_consecutive_skips_survive_a_resume(config, tmp_path):
  """A diverging run preempted more often than `max_consecutive_skipped` steps still stops: the
  count is kept in the checkpoint (`loop`), not restarted at every resume."""
  # lr 1e30: step 2 makes the parameters huge, steps 3, 4, ... are skipped.
  cfg = copy(config, learning_rate=1e30, max_consecutive_skipped=4, num_steps=6)
  first = train.run(cfg, tmp_path, stop_after_steps=3)  # steps 1-3: one skipped, saved at 3
  assert int(first.last_metrics['skipped_updates']) == 1
  manager = checkpoint_lib.make_manager(tmp_path, cfg.checkpoint)
  assert checkpoint_lib.saved_loop(manager, 3) == {'consecutive_skipped': 1}
  manager.close()
  # Steps 4-6 are the 2nd to 4th skips in a row: restarted at 0, the count would end at 3.
  with pytest.raises(train.TrainingDivergedError, match=r'the last 4 updates \(to step 6\)'):
    train.run(cfg, tmp_path)
  assert steps_on_disk(tmp_path)[-1] == 4  # saved before the 4th skip


def test_diverged_run_exits_1_from_the_command_line(config, tmp_path):
  cfg = copy(config, learning_rate=1e30, max_consecutive_skipped=3, num_steps=8)
  (tmp_path / 'config.json').write_text(cfg.to_json())
  (tmp_path / 'config.py').write_text(
      'import json, ml_collections\n'
      f'def get_config():\n  return ml_collections.ConfigDict(json.load(open({str(tmp_path / "config.json")!r})))\n'
  )
  proc = subprocess.run(
      [
          sys.executable,
          '-m',
          'capture_jax.train',
          f'--config={tmp_path / "config.py"}',
          f'--workdir={tmp_path / "run"}',
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=600,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert 'error: training diverged' in proc.stderr and 'Traceback' not in proc.stderr


# --------------------------------------------------------------------------
# Corrupted checkpoints, replayed metrics.


@pytest.fixture(scope='module')
def trained(config, tmp_path_factory):
  """A run trained to step 4 (checkpoints 1, 2 and 4: Orbax saves the first step too)."""
  workdir = tmp_path_factory.mktemp('run')
  train.run(config, workdir)
  return workdir


def test_checkpoints_carry_checksums(trained):
  for step in steps_on_disk(trained):
    folder = checkpoint_lib.checkpoint_dir(trained) / str(step)
    assert (folder / checkpoint_lib.CHECKSUMS_FILE).is_file()
    assert checkpoint_lib.checksum_problems(folder) == []


def test_flipped_bytes_are_moved_aside_and_the_step_is_saved_again(
    config, trained, tmp_path, capfd
):
  """Same size, other bytes: restored from the previous checkpoint, the corrupt one kept aside,
  the retrained step saved again, metrics.jsonl one row per step."""
  import shutil  # pylint: disable=import-outside-toplevel

  workdir = tmp_path / 'run'
  shutil.copytree(trained, workdir)
  ckpts = checkpoint_lib.checkpoint_dir(workdir)
  flip_a_byte(largest_file(ckpts / '4' / 'state'))
  capfd.readouterr()
  result = train.run(config, workdir)
  out = capfd.readouterr().out
  assert 'checkpoint 4 in' in out and 'checksums do not match' in out and 'moved aside' in out
  assert 'resumed from the checkpoint at step 2' in out
  assert int(result.state.step) == 4
  assert steps_on_disk(workdir) == [1, 2, 4]  # step 4 saved again, the others kept
  aside = checkpoint_lib.corrupt_checkpoints(workdir)
  assert [p.name.split('-')[1] for p in aside] == ['4'] and (aside[0] / 'state').is_dir()
  assert checkpoint_lib.checksum_problems(ckpts / '4') == []
  # Replayed steps 3 and 4 are logged once.
  assert logged_steps(workdir) == [1, 2, 3, 4]
  assert 'dropped 2 row(s) after step 2' in out

  # Every checkpoint unreadable: refused without the flag (nothing trained, nothing deleted).
  for step in (1, 2, 4):
    flip_a_byte(largest_file(ckpts / str(step) / 'state'))
  with pytest.raises(checkpoint_lib.UnreadableCheckpointsError, match='restart_if_unreadable'):
    train.run(config, workdir)
  assert steps_on_disk(workdir) == [] and len(checkpoint_lib.corrupt_checkpoints(workdir)) == 4
  assert logged_steps(workdir) == [1, 2, 3, 4]
  # With the flag: from step 0, metrics restarted, the corrupt ones still kept.
  again = copy(config)
  again.checkpoint.restart_if_unreadable = True
  result = train.run(again, workdir, stop_after_steps=2)
  assert int(result.state.step) == 2 and logged_steps(workdir) == [1, 2]
  assert steps_on_disk(workdir) == [1, 2] and len(checkpoint_lib.corrupt_checkpoints(workdir)) == 4


# --------------------------------------------------------------------------
# Resuming under another configuration: refused before compiling.


@pytest.mark.parametrize(
    'field, value, message',
    [
        ('data.batch_size', 16, r'data.batch_size: checkpoint 8, config 16'),
        ('train.num_steps', 3, r'train.num_steps=3 is below the checkpoint step 4'),
    ],
)
def test_resume_with_another_batch_size_or_fewer_steps_is_refused(
    config, trained, field, value, message
):
  cfg = config.copy_and_resolve_references()
  section, name = field.split('.')
  cfg[section][name] = value
  with pytest.raises(checkpoint_lib.IncompatibleCheckpointError, match=message):
    train.run(cfg, trained)


def test_finished_run_is_reused_without_training(config, trained, capfd):
  result = train.run(config, trained)
  assert int(result.state.step) == 4 and logged_steps(trained) == [1, 2, 3, 4]


# --------------------------------------------------------------------------
# Two trainers in one workdir.


def test_second_trainer_in_a_workdir_is_refused(config, tmp_path):
  with lock_lib.FolderLock(tmp_path, lock_lib.TRAIN_LOCK_FILE, 'trainer'):
    with pytest.raises(
        lock_lib.LockedError, match=rf'in use by another trainer \(host .*, pid {os.getpid()}'
    ):
      train.run(config, tmp_path)
  assert not checkpoint_lib.checkpoint_dir(tmp_path).exists()
  assert not (tmp_path / 'metrics.jsonl').exists()


def test_lock_left_by_a_dead_process_is_taken_over(tmp_path, capfd):
  dead = subprocess.run(
      [
          sys.executable,
          '-c',
          'import os; from capture_jax.training import lock; '
          f'lock.FolderLock({str(tmp_path)!r}, "train.lock", "trainer").acquire(); os._exit(0)',
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )
  assert dead.returncode == 0, dead.stderr
  holder = json.loads((tmp_path / 'train.lock').read_text())
  with lock_lib.FolderLock(tmp_path, 'train.lock', 'trainer'):
    out = capfd.readouterr().out
    assert (
        f'left by a trainer that is no longer running (host {holder["host"]}, pid {holder["pid"]}'
        in out
    )
    assert json.loads((tmp_path / 'train.lock').read_text())['pid'] == os.getpid()


def model_params(cfg, workdir: Path, step: int):
  manager = checkpoint_lib.make_manager(workdir, cfg.checkpoint)
  try:
    mesh = sharding.make_mesh(cfg.mesh)
    abstract, shardings = state_lib.model_param_layout(cfg, mesh)
    params = checkpoint_lib.restore_model_params(
        manager, step, sharding.abstract_with_shardings(abstract, shardings)
    )
  finally:
    manager.close()
  return jax.tree.map(np.asarray, params)


def test_kill_9_then_resume_is_bitwise_and_logs_each_step_once(config, trained, tmp_path):
  """A trainer killed with SIGKILL after step 3 (slowed down so that the kill lands mid-run)
  resumes to the parameters of the uninterrupted run, with one metrics row per step."""
  (tmp_path / 'config.json').write_text(config.to_json())
  script = (
      'import json, time, ml_collections; from capture_jax import train; '
      'from capture_jax.training import sharding; '
      'slow = sharding.global_batch_from_local; '
      'sharding.global_batch_from_local = lambda *a: (time.sleep(1.0), slow(*a))[1]; '
      f'cfg = ml_collections.ConfigDict(json.load(open({str(tmp_path / "config.json")!r}))); '
      f'train.run(cfg, {str(tmp_path / "run")!r})'
  )
  proc = subprocess.Popen(
      [sys.executable, '-c', script],
      cwd=REPO,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )
  metrics = tmp_path / 'run' / 'metrics.jsonl'
  deadline = time.time() + 300
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().count('\n') >= 3):
    time.sleep(0.05)
  proc.kill()
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  result = train.run(config, tmp_path / 'run')
  assert int(result.state.step) == 4
  assert logged_steps(tmp_path / 'run') == [1, 2, 3, 4]
  a, b = model_params(config, trained, 4), model_params(config, tmp_path / 'run', 4)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
