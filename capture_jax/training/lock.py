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
preconditions. gcp-storage-emulator ignores them: tests/test_storage_gcs.py
adds GCS's 412 to it, tests/test_gcs_faults.py puts a proxy enforcing them
(and injecting faults) in front of it; the tests stage the interleavings one
process can; requests of two hosts racing at a real GCS server are not tested.

Fencing: a holder that cannot confirm its lock stops before its next write
that matters (a checkpoint save, export metadata): `confirm(folder, name)`
raises `LockLostError` (a `LockedError`: the commands print it as their one
`error:` line and exit 1). On disk the lock is confirmed when the file the
holder locked is still the one at the path (a lock file deleted and created
again by another command is a takeover). On GCS `confirm` rewrites the lock
conditionally on the generation this holder last wrote, so a store that saw a
takeover refuses it (412); a refresh that fails otherwise is tolerated while
the last confirmed write is younger than half the stale window (no other
command may take the lock over before the whole window passed), and is a loss
after that. The heartbeat thread records the same losses between writes, and
every `storage.write_*` into the locked folder checks them (no network call;
a lost lock keeps refusing them after its release, until this process takes
that lock again: a writer flushed at exit must not land).
A write whose response was lost is recognised as this holder's own when its
retry is refused: the object then holds the nonce of that very write.
A commit (a checkpoint step's `commit.json`, `commit_record`) is a copy of
the lock object conditional on its generation (`ifSourceGenerationMatch`):
the store refuses it once the lock was taken over, so a stale holder's commit
never lands after the takeover.
What is not fenced: the bytes Orbax (tensorstore) writes and its own commit
marker, which land after the confirmed save started (within the lease, as
long as a save takes less than half of `STALE_AFTER_S`; a step without our
record is not restored if its checksums say one was due, see
`training.checkpoint`), and the writes of processes other than 0.

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
from capture_jax.training import distributed

# Environment overrides for tests and impatient users (seconds).
HEARTBEAT_S = float(os.environ.get('CAPTURE_LOCK_HEARTBEAT_S', '60'))
STALE_AFTER_S = float(os.environ.get('CAPTURE_LOCK_STALE_S', '300'))

# A trainer's lock in the folder it trains into: the workdir (`capture_jax.train`), and
# `{workdir}/instances` (`capture_jax.instances.trainer`, the proposer).
TRAIN_LOCK_FILE = 'train.lock'


class LockedError(RuntimeError):
  """The folder is in use by another running command."""


class LockLostError(LockedError):
  """This command's lock on its folder was taken over or cannot be confirmed: it must stop
  writing into the folder."""


# The locks this process holds (enabled or not), oldest first: what `confirm` checks.
_HELD: list[FolderLock] = []
# Locks this process lost and released since: writes into their folders stay refused (a writer
# flushed at exit, after the release, must not write into a folder another command holds).
_LOST: list[FolderLock] = []


def confirm(folder: storage.PathLike, name: str) -> None:
  """Raises LockLostError, on every process, unless process 0 still holds the lock
  `{folder}/{name}`. Call on every process (it is collective on a pod) just before a write that
  matters. A RuntimeError when this process took no such lock (a call outside its `with`)."""
  path = str(storage.absolute(folder) / name)
  lock = next((held for held in _HELD if str(held.path) == path), None)
  if lock is None:
    raise RuntimeError(f'confirm({path}): this process holds no such lock')
  distributed.decide_on_main(lock.confirm)


def commit_record(target: storage.PathLike) -> None:
  """Writes `target`: the record that what lies beside it (a checkpoint step) was committed by
  the holder of the lock of a folder above it.

  On GCS it is a copy of the lock object made on condition that the lock is still at the
  generation this holder last wrote (`ifSourceGenerationMatch`): once another command took the
  lock over, the store refuses it (412), nothing lands, and this raises LockLostError. On disk
  the lock is confirmed (`confirm`), then the record written. Without a lock held over `target`
  (a process other than 0, a tool) the record is written as is: nothing to fence it with.
  """
  held = [lock for lock in _HELD if lock.enabled and lock.covers(target)]
  if not held:
    storage.write_text(target, json.dumps({'committed': time.time()}))
    return
  lock = max(held, key=lambda lock: len(str(lock.path)))  # the innermost folder's lock
  if lock._token is None:  # pylint: disable=protected-access  (on disk)
    lock.confirm()
    storage.write_text(target, json.dumps({**_holder(), 'committed': time.time()}))
    return
  lock.copy_to(target)


def _check_write(path: storage.PathLike) -> None:
  """A guard `storage` calls before every whole-file write: refuses a write into a folder whose
  lock this process has lost (from what the heartbeat saw; no network call)."""
  for lock in list(_HELD) + list(_LOST):
    if lock.lost is not None and lock.covers(path):
      raise LockLostError(lock.lost + f'; not writing {path}')


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
    # Absolute: the paths it guards and commits are (`covers`), whatever the user's --workdir.
    self.path = storage.absolute(folder) / name
    self.what = what
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.heartbeat_s = heartbeat_s
    self.stale_after_s = stale_after_s
    self._fd = None
    self._token = None
    self._generation = None  # GCS: the generation of the lock object this holder last wrote
    self._started = None  # GCS: the start time written in the lock
    self._write_nonce = None  # GCS: the nonce of the last write attempted
    self._confirmed_at = None  # GCS: time.monotonic() of the last write known to have landed
    self._inode = None  # disk: (st_dev, st_ino) of the file locked
    self._mutex = threading.Lock()  # one lock write at a time (heartbeat and confirm)
    self.lost: str | None = None  # why the lock is no longer ours (the message of LockLostError)
    self._stop = threading.Event()
    self._thread = None

  def acquire(self) -> None:
    self.lost = None
    if self.enabled:
      if storage.is_remote(self.path):
        with storage.naming(self.path, 'taking the lock', keep=(LockedError,)):
          self._acquire_object()
      else:
        self._acquire_flock()
    # Held again: the folder is this process's to write into once more.
    _LOST[:] = [lock for lock in _LOST if str(lock.path) != str(self.path)]
    _HELD.append(self)

  def release(self) -> None:
    if self in _HELD:
      _HELD.remove(self)
      if self.lost is not None:
        _LOST.append(self)
    if self._token is not None:
      try:
        with storage.naming(self.path, 'releasing the lock'):
          self._release_object()
      except storage.StorageError as e:  # the next command takes it over once it is stale
        print(f'WARNING: {e}', flush=True)
        self._token = None
    if self._fd is None:
      return
    # Emptied before unlocking: a clean exit leaves no holder to report.
    os.ftruncate(self._fd, 0)
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

  def confirm(self) -> None:
    """Raises LockLostError unless the lock is still this holder's (see the module docstring);
    on GCS a conditional rewrite of the lock proves it at this moment."""
    if not self.enabled:
      return
    if self.lost is None:
      if self._fd is not None:
        self._confirm_flock()
      elif self._token is not None:
        with self._mutex:
          self._refresh(synchronous=True)
    if self.lost is not None:
      raise LockLostError(self.lost)

  def covers(self, path: storage.PathLike) -> bool:
    """Whether `path` lies in the folder this lock guards (relative paths made absolute)."""
    return str(storage.absolute(path)).startswith(str(self.path.parent).rstrip('/') + '/')

  def copy_to(self, target: storage.PathLike) -> None:
    """Copies the lock object (GCS) to `target` if it is still at the generation this holder
    last wrote; LockLostError otherwise (the store refused: taken over)."""
    with self._mutex:
      if self.lost is None:
        try:
          with storage.naming(target, f'committing (a copy of {self.path} conditional on it)'):
            _gcs_rewrite(self.path, target, if_source_generation=self._generation)
        except (FileExistsError, FileNotFoundError):  # 412: rewritten since; 404: removed since
          self._lose(f'was taken over by another command before {target} was committed')
    if self.lost is not None:
      raise LockLostError(self.lost)

  def _lose(self, why: str) -> None:
    self.lost = (
        f'the lock {self.path} {why}; this {self.what} stopped writing into {self.path.parent} '
        'so that two commands never write into it at once'
    )
    print(f'WARNING: {self.lost}', flush=True)

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
    self._inode = _inode(os.fstat(fd))

  def _confirm_flock(self) -> None:
    try:
      now = _inode(os.stat(self.path))
    except FileNotFoundError:
      now = None
    if now != self._inode:
      self._lose('was deleted or replaced by another command (the file locked is not there)')

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
      if not self._adopt_own_write(token):  # ... or our own write, whose response was lost
        raise self._refuse(self._read_object()) from None
    # Two takers of a stale lock both write; the object keeps one of them.
    time.sleep(0.2)
    now = self._read_object()
    if now.get('token') != token:
      raise self._refuse(now)
    self._token = token
    self._confirmed_at = time.monotonic()
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
      with self._mutex:
        if self._stop.is_set():
          return
        self._refresh(synchronous=False)
        if self.lost is not None:
          return

  def _refresh(self, synchronous: bool) -> None:
    """Rewrites the lock conditionally on our generation; records a loss in `self.lost` (a
    takeover, or no confirmed write for too long). Call with `self._mutex` held."""
    sent = getattr(self, '_write_nonce', None)
    try:
      holder = self._read_object()  # a second guard, for a store that ignores preconditions
      if holder.get('token') != self._token:
        self._lose(f'was taken over by another command ({_describe(holder)})')
        return
      self._write_object(self._token, if_generation=self._generation, started=self._started)
      self._confirmed_at = time.monotonic()
      return
    except FileExistsError:  # the store refused: rewritten by another command since our write
      try:
        if self._adopt_own_write(self._token):  # our own write, whose response was lost
          self._confirmed_at = time.monotonic()
          return
        holder = self._read_object()
      except Exception:  # pylint: disable=broad-except
        holder = {}
      self._lose(f'was taken over by another command ({_describe(holder)})')
      return
    except Exception as e:  # pylint: disable=broad-except
      error = f'{type(e).__name__}: {str(e)[:200]}'
      if self._write_nonce != sent and self._landed_anyway():
        return
    age = time.monotonic() - self._confirmed_at
    # A refresh that fails is no loss while no other command may take the lock over: that needs
    # the whole stale window without a heartbeat. A write that matters needs half of it left.
    limit = self.stale_after_s / 2 if synchronous else self.stale_after_s
    if age > limit:
      self._lose(f'could not be refreshed for {age:.0f} s (limit {limit:.0f} s; {error})')
    else:
      print(f'WARNING: could not refresh the lock {self.path} ({error}); retrying', flush=True)

  def _landed_anyway(self) -> bool:
    """After a rewrite that failed past the retries: whether it landed all the same (its answer
    lost, the retries failing). Then its generation is adopted, or the next refresh, conditional
    on the one before, would be refused and read as a takeover."""
    try:
      landed = self._adopt_own_write(self._token)
    except Exception:  # pylint: disable=broad-except  (the store still failing: decided later)
      return False
    if landed:
      self._confirmed_at = time.monotonic()
    return landed

  def _adopt_own_write(self, token: str) -> bool:
    """After a refused write: whether the object holds that very write (its response was lost
    and the client's retry was refused by the write itself). Adopts its generation if so."""
    holder, generation = self._read_object_and_generation()
    if holder.get('token') == token and holder.get('nonce') == self._write_nonce:
      self._generation = generation
      return True
    return False

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
    self._write_nonce = uuid.uuid4().hex
    info = {**_holder(), 'token': token, 'nonce': self._write_nonce, 'heartbeat': time.time()}
    if started is not None:
      info['started'] = started
    self._started = info['started']
    self._generation = _gcs_upload(self.path, json.dumps(info).encode(), if_generation)


storage.WRITE_GUARDS.append(_check_write)


def _gcs():
  import fsspec  # pylint: disable=import-outside-toplevel

  return fsspec.filesystem('gs')


def _gcs_call(method: str, path: storage.Path, **params) -> None:
  """A JSON-API call on one object (`DELETE` with preconditions: gcsfs's `rm` takes none)."""
  bucket, key = str(path).split('://', 1)[1].split('/', 1)
  _gcs().call(method, 'b/{}/o/{}', bucket, key, **params)


def _gcs_rewrite(source: storage.Path, target: storage.PathLike, if_source_generation: str) -> None:
  """Copies one object to another of the same bucket (GCS's rewrite, done in one call for an
  object this small) if the source is at `if_source_generation`; FileExistsError (GCS's 412)
  otherwise. A retry after a lost answer copies the same source again."""
  fs = _gcs()
  bucket, key = str(source).split('://', 1)[1].split('/', 1)
  target_bucket, target_key = str(target).split('://', 1)[1].split('/', 1)
  out = fs.call(
      'POST',
      'b/{}/o/{}/rewriteTo/b/{}/o/{}',
      bucket,
      key,
      target_bucket,
      target_key,
      headers={'Content-Type': 'application/json'},
      json_out=True,
      ifSourceGenerationMatch=str(if_source_generation),
  )
  if out.get('done') is False:
    raise RuntimeError(f'{target}: the copy of {source} did not finish in one call')


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


def _inode(st: os.stat_result) -> tuple[int, int]:
  return st.st_dev, st.st_ino


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
