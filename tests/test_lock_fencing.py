"""Fencing: a command whose folder lock was taken over (or cannot be confirmed) stops before its
next write that matters, and the command exits 1 with one `error:` line.

On disk (a lock file deleted and created again by another command); the same on GCS, against
the emulator, is in `tests/test_storage_gcs.py` and `tests/test_gcs_faults.py`.
"""

from __future__ import annotations

import os
import textwrap
import time
from pathlib import Path

import pytest

from capture_jax import storage
from capture_jax.training import lock as lock_lib
from tests.helpers import start_python
from tests.helpers import write_config_module
from tests.test_train import trainer_config


def test_a_lock_file_replaced_by_another_command_is_a_loss(tmp_path):
  lock = lock_lib.FolderLock(tmp_path, 'x.lock', 'export', enabled=True)
  with lock:
    lock_lib.confirm(tmp_path, 'x.lock')  # still ours
    storage.write_text(tmp_path / 'a.txt', 'a')
    (tmp_path / 'x.lock').unlink()
    other = lock_lib.FolderLock(tmp_path, 'x.lock', 'export', enabled=True)
    other.acquire()  # free to take: the file it locks is a new one
    try:
      with pytest.raises(lock_lib.LockLostError, match=r'x.lock was deleted or replaced'):
        lock_lib.confirm(tmp_path, 'x.lock')
      # Every later write into the folder is refused too, with the same reason.
      with pytest.raises(lock_lib.LockLostError, match=r'not writing .*b.txt'):
        storage.write_text(tmp_path / 'b.txt', 'b')
    finally:
      other.release()
  assert not (tmp_path / 'b.txt').exists()


def test_a_lock_taken_with_a_relative_folder_guards_its_absolute_paths(tmp_path, monkeypatch):
  """`--workdir runs/x` is relative; the checkpoint paths Orbax writes are absolute: the lock
  must cover both (before, a relative lock guarded nothing and committed without confirming)."""
  monkeypatch.chdir(tmp_path)
  os.makedirs('runs/x')
  with lock_lib.FolderLock('runs/x', 'x.lock', 'training', enabled=True) as lock:
    lock_lib.confirm('runs/x', 'x.lock')
    assert lock.covers(tmp_path / 'runs/x/checkpoints/2/commit.json')
    assert lock.covers('runs/x/metrics.jsonl') and not lock.covers(tmp_path / 'runs/y/a')
    os.unlink('runs/x/x.lock')  # another command deletes the lock file and takes it again
    other = lock_lib.FolderLock(tmp_path / 'runs/x', 'x.lock', 'training', enabled=True)
    other.acquire()
    try:
      with pytest.raises(lock_lib.LockLostError, match=r'deleted or replaced'):
        lock_lib.commit_record(tmp_path / 'runs/x/checkpoints/2/commit.json')
      with pytest.raises(lock_lib.LockLostError, match=r'not writing'):
        storage.write_text(tmp_path / 'runs/x/b.txt', 'b')
    finally:
      other.release()
  assert not (tmp_path / 'runs/x/checkpoints/2/commit.json').exists()


def test_confirm_outside_the_lock_is_a_programming_error(tmp_path):
  with pytest.raises(RuntimeError, match='holds no such lock'):
    lock_lib.confirm(tmp_path, 'x.lock')


def finalized(workdir: str) -> list[int]:
  folder = storage.as_path(workdir) / 'checkpoints'
  if not folder.exists():
    return []
  return sorted(
      int(p.name)
      for p in folder.iterdir()
      if p.name.isdigit()
      and (not storage.is_remote(workdir) or (p / 'commit_success.txt').exists())
  )


def run_trainer_and_take_over(config, workdir: str, tmp_path: Path, take_over) -> tuple[int, str]:
  """Runs `capture_jax.train` in `workdir` (its steps slowed to 3 s) and calls `take_over()` as
  soon as it has compiled: before its first checkpoint. Returns the exit status and the output."""
  write_config_module(tmp_path / 'config.py', config)
  script = textwrap.dedent(f"""
      import sys, time
      from capture_jax import train
      from capture_jax.training import sharding
      slow = sharding.global_batch_from_local
      sharding.global_batch_from_local = lambda *a: (time.sleep(3.0), slow(*a))[1]
      sys.argv = ['train', '--config={tmp_path / 'config.py'}', '--workdir={workdir}']
      train.console_main()
  """)
  proc = start_python(script)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith('compiled the train step'):
      take_over()
      break
  out, _ = proc.communicate(timeout=300)
  return proc.returncode, ''.join(lines) + out


def check_stopped_before_its_first_checkpoint(code: int, out: str, workdir: str, why: str) -> None:
  assert code == 1, out
  errors = [l for l in out.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and why in errors[0], out
  assert 'Traceback' not in out, out
  assert finalized(workdir) == [], out


@pytest.mark.slow
def test_a_trainer_whose_lock_was_taken_over_stops_before_its_next_checkpoint(tmp_path):
  config = trainer_config(tmp_path / 'data')
  config.train.num_steps = 4
  workdir = str(tmp_path / 'run')
  taker = lock_lib.FolderLock(workdir, lock_lib.TRAIN_LOCK_FILE, 'trainer', enabled=True)

  def take_over():
    os.unlink(os.path.join(workdir, lock_lib.TRAIN_LOCK_FILE))  # e.g. a cleanup of the folder
    taker.acquire()

  try:
    code, out = run_trainer_and_take_over(config, workdir, tmp_path, take_over)
  finally:
    taker.release()
  check_stopped_before_its_first_checkpoint(
      code, out, workdir, 'train.lock was deleted or replaced'
  )
