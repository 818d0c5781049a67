"""A lock on a folder, so that two commands never write into one run (or one export) at once.

On disk: `fcntl.flock` on `{folder}/{name}`. The kernel releases it when the
holder exits, however it exits, so a lock left by a dead process is free to
take (and is reported as taken over). flock needs a filesystem that supports
it (local disks and NFSv4 do).

On GCS (`gs://` folders, where there is no flock): the lock is an object
created only if absent (`ifGenerationMatch=0`). The holder rewrites it every
`HEARTBEAT_S` seconds; a lock whose heartbeat is older than `STALE_AFTER_S`
(its holder was killed, or its VM preempted without a signal), or that names
a process of this host that no longer runs, is taken over with a note. A clean
exit deletes it. Every write and delete after the creation is conditional on
the generation last seen (`ifGenerationMatch=G`): of two commands taking over
one stale lock at once only one write succeeds (the other is refused), a
heartbeat never overwrites a lock taken over meanwhile, and a release never
deletes another holder's lock. The lock is also read back after taking it
(the token must be ours), a second guard for a store that ignores
preconditions. gcp-storage-emulator (tests/test_storage_gcs.py) ignores them:
the tests add GCS's 412 to it, and test the interleavings one process can
stage; requests of two hosts racing at a real GCS server are not tested.

The lock holds the holder's host, pid and start time, for the message that
refuses a second writer. Only process 0 of a multi-process run takes it (the
other processes of the same run write into the same folder and must not be
blocked).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import jax

from capture_jax import storage

HEARTBEAT_S = 60.0
STALE_AFTER_S = 300.0

# A trainer's lock in the folder it trains into: the workdir (`capture_jax.train`), and
# `{workdir}/instances` (`capture_jax.instances.trainer`, the proposer).
TRAIN_LOCK_FILE = 'train.lock'


class LockedError(RuntimeError):
  """The folder is in use by another running command."""


class FolderLock:
  """`with FolderLock(folder, 'train.lock', 'training'):` holds the lock for the block."""

  def __init__(
      self,
      folder: storage.PathLike,
      name: str,
      what: str,
      enabled: bool | None = None,
      *,
      heartbeat_s: float = HEARTBEAT_S,
      stale_after_s: float = STALE_AFTER_S,
  ):
    self.path = storage.as_path(folder) / name
    self.what = what
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.heartbeat_s = heartbeat_s
    self.stale_after_s = stale_after_s
    self._fd = None
    self._token = None
    self._generation = None  # GCS: the generation of the lock object this holder last wrote
    self._stop = threading.Event()
    self._thread = None

  def acquire(self) -> None:
    if not self.enabled:
      return
    if storage.is_remote(self.path):
      self._acquire_object()
    else:
      self._acquire_flock()

  def release(self) -> None:
    if self._token is not None:
      self._release_object()
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

  def _refuse(self, holder: dict) -> LockedError:
    return LockedError(
        f'{self.path.parent} is in use by another {self.what} ({_describe(holder)}); wait for it '
        f'to finish or stop it, or use another folder (lock file {self.path})'
    )

  def _note_takeover(self, previous: dict, why: str = 'that is no longer running') -> None:
    print(
        f'note: taking over the lock {self.path} left by a {self.what} {why} '
        f'({_describe(previous)})',
        flush=True,
    )

  # -- on disk ---------------------------------------------------------------

  def _acquire_flock(self) -> None:
    local = Path(self.path)
    local.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(local, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_fd(fd)
      os.close(fd)
      raise self._refuse(holder) from None
    previous = _read_fd(fd)
    if previous:
      self._note_takeover(previous)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_holder()).encode(), 0)
    self._fd = fd

  # -- on GCS ----------------------------------------------------------------

  def _acquire_object(self) -> None:
    previous, generation = self._read_object_and_generation()
    if previous:
      why = self._stale(previous)
      if why is None:
        raise self._refuse(previous)
      self._note_takeover(previous, why)
    token = uuid.uuid4().hex
    try:
      # Created only if absent, or replaced only if still the stale one we read.
      self._write_object(token, if_generation='0' if not previous else generation)
    except FileExistsError:  # another command created it, or took it over, since we looked
      raise self._refuse(self._read_object()) from None
    # Two takers of a stale lock both write; the object keeps one of them.
    time.sleep(0.2)
    now = self._read_object()
    if now.get('token') != token:
      raise self._refuse(now)
    self._token = token
    self._stop.clear()
    self._thread = threading.Thread(target=self._heartbeat, name='lock-heartbeat', daemon=True)
    self._thread.start()

  def _release_object(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    try:
      if self._read_object().get('token') == self._token:
        _gcs_call('DELETE', self.path, ifGenerationMatch=self._generation)
    except (FileNotFoundError, FileExistsError):  # gone, or taken over since: not ours to delete
      pass
    self._token = None
    self._generation = None

  def _heartbeat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        holder = self._read_object()
        if holder.get('token') != self._token:
          print(
              f'WARNING: the lock {self.path} was taken over by {_describe(holder)} while this '
              f'{self.what} runs; two commands may now write into {self.path.parent}',
              flush=True,
          )
          return
        self._write_object(
            self._token, if_generation=self._generation, started=holder.get('started')
        )
      except FileExistsError:  # rewritten by another command since our last write
        print(
            f'WARNING: the lock {self.path} was taken over while this {self.what} runs; two '
            f'commands may now write into {self.path.parent}',
            flush=True,
        )
        return
      except Exception as e:  # pylint: disable=broad-except
        # A missed heartbeat is not fatal; STALE_AFTER_S spans several of them.
        print(f'WARNING: could not refresh the lock {self.path}: {e}', flush=True)

  def _stale(self, holder: dict) -> str | None:
    """Why a holder may be replaced (a phrase), or None while it is alive."""
    if 'heartbeat' not in holder:
      return 'whose lock cannot be read'
    if holder.get('host') == socket.gethostname() and not _pid_alive(holder.get('pid')):
      return 'that is no longer running'
    age = time.time() - float(holder['heartbeat'])
    if age > self.stale_after_s:
      return f'whose last heartbeat is {age:.0f} s old (limit {self.stale_after_s:.0f} s)'
    return None

  def _read_object(self) -> dict:
    try:
      text = self.path.read_text(encoding='utf-8')
    except FileNotFoundError:
      return {}
    try:
      return json.loads(text) if text.strip() else {'unreadable': True}
    except ValueError:
      return {'unreadable': True}

  def _read_object_and_generation(self) -> tuple[dict, str | None]:
    """The lock's contents and the generation they were read from (`{}, None` when absent)."""
    while True:
      try:
        generation = str(_gcs().info(str(self.path))['generation'])
      except FileNotFoundError:
        return {}, None
      holder = self._read_object()
      try:  # the same generation after reading: the contents are of that generation
        if str(_gcs().info(str(self.path))['generation']) == generation:
          return holder, generation
      except FileNotFoundError:
        return {}, None

  def _write_object(self, token: str, if_generation: str | None, started=None) -> None:
    """Writes the lock if its generation is still `if_generation` ('0': only if absent);
    FileExistsError otherwise (GCS's 412)."""
    info = {**_holder(), 'token': token, 'heartbeat': time.time()}
    if started is not None:
      info['started'] = started
    self._generation = _gcs_upload(self.path, json.dumps(info).encode(), if_generation)


def _gcs():
  import fsspec  # pylint: disable=import-outside-toplevel

  return fsspec.filesystem('gs')


def _gcs_call(method: str, path: storage.Path, **params) -> None:
  """A JSON-API call on one object (`DELETE` with preconditions: gcsfs's `rm` takes none)."""
  bucket, key = str(path).split('://', 1)[1].split('/', 1)
  _gcs().call(method, 'b/{}/o/{}', bucket, key, **params)


def _gcs_upload(path: storage.Path, data: bytes, if_generation: str | None) -> str:
  """Uploads one object with `ifGenerationMatch` (gcsfs's `pipe_file` sets it only to 0, for
  mode='create'); returns the new generation. A failed precondition is FileExistsError."""
  fs = _gcs()
  bucket, key = str(path).split('://', 1)[1].split('/', 1)
  metadata = json.dumps({'name': key})
  body = (
      (
          f'--==0==\nContent-Type: application/json; charset=UTF-8\n\n{metadata}\n--==0==\n'
          'Content-Type: application/json\n\n'
      ).encode()
      + data
      + b'\n--==0==--'
  )
  params = {} if if_generation is None else {'ifGenerationMatch': str(if_generation)}
  out = fs.call(
      'POST',
      f'{fs._location}/upload/storage/v1/b/{bucket}/o',  # pylint: disable=protected-access
      uploadType='multipart',
      headers={'Content-Type': 'multipart/related; boundary="==0=="'},
      data=body,
      json_out=True,
      **params,
  )
  return str(out['generation'])


def _holder() -> dict:
  return {'host': socket.gethostname(), 'pid': os.getpid(), 'started': time.time()}


def _pid_alive(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except (ProcessLookupError, TypeError, ValueError):
    return False
  except PermissionError:
    return True
  return True


def _read_fd(fd: int) -> dict:
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
