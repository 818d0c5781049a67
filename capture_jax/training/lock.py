"""A lock on a folder, so that two commands never write into one run (or one export) at once.

`fcntl.flock` on `{folder}/{name}`: the kernel releases it when the holder
exits, however it exits, so a lock left by a dead process is free to take
(and is reported as taken over). The file holds the holder's host, pid and
start time, for the message that refuses a second writer. Only process 0 of
a multi-process run takes it (the other processes of the same run write
into the same folder and must not be blocked). flock needs a filesystem that
supports it (local disks and NFSv4 do).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

import jax


class LockedError(RuntimeError):
  """The folder is in use by another running command."""


class FolderLock:
  """`with FolderLock(folder, 'train.lock', 'training'):` holds the lock for the block."""

  def __init__(self, folder: str | Path, name: str, what: str, enabled: bool | None = None):
    self.path = Path(folder) / name
    self.what = what
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._fd = None

  def acquire(self) -> None:
    if not self.enabled:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _describe(_read(fd))
      os.close(fd)
      raise LockedError(
          f'{self.path.parent} is in use by another {self.what} ({holder}); wait for it to '
          f'finish or stop it, or use another folder (lock file {self.path})'
      ) from None
    previous = _read(fd)
    if previous:
      print(
          f'note: taking over the lock {self.path} left by a {self.what} that is no longer '
          f'running ({_describe(previous)})',
          flush=True,
      )
    info = {'host': socket.gethostname(), 'pid': os.getpid(), 'started': time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    self._fd = fd

  def release(self) -> None:
    if self._fd is None:
      return
    # Emptied before unlocking: a clean exit leaves no holder to report.
    os.ftruncate(self._fd, 0)
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

  def __enter__(self) -> FolderLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def _read(fd: int) -> dict:
  try:
    text = os.pread(fd, 4096, 0).decode('utf-8')
    return json.loads(text) if text.strip() else {}
  except (ValueError, UnicodeDecodeError):
    return {'unreadable': True}


def _describe(info: dict) -> str:
  if not info or 'pid' not in info:
    return 'holder unknown'
  started = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info.get('started', 0)))
  return f'host {info.get("host")}, pid {info["pid"]}, started {started}'
