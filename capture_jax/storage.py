"""Where outputs live: local folders and `gs://` buckets through one path type.

Every path that names a workdir, a checkpoint, an export or an evaluation
output is an `etils.epath.Path` (what Orbax uses too): local paths go to the
OS, `gs://` to fsspec's `gcsfs`. The few operations where object storage
differs from a disk are here, with the same guarantee on both:

- `write_bytes` / `write_text`: a reader sees the old file or the new one,
  never a part. On disk: a temporary file beside it, fsync, rename. On GCS an
  object upload is atomic already (the object appears when the upload is
  finalised), so it is written in place.
- `AppendFile`: a growing text file (`metrics.jsonl`). GCS objects cannot be
  appended to: the whole object is uploaded again, at most every
  `upload_every_s` seconds and on `flush(force=True)` (the trainer forces it
  at every checkpoint, so the rows up to a checkpoint are in the bucket
  before it).
- `rename_tree`: one `rename` on disk; copy then delete on GCS (not atomic:
  used only to move an unreadable checkpoint aside).
- `file_listing`: the files under a folder with their sizes (and GCS's CRC32C
  from the listing, so verifying a checkpoint in a bucket needs no download).
- `check_writable`: a bucket that does not exist, or cannot be reached or
  written with the credentials at hand, is named before anything compiles.
- `exists` / `is_file` / `is_dir`: "not found" is the only answer read as
  absent (fsspec's `isfile`/`isdir` answer False on any error); an error that
  gcsfs gave up on (after `RETRIES` tries; a stalled answer is cut after
  `REQUEST_TIMEOUT_S`) is a `StorageError` naming the object and the
  operation (`naming`), one `error:` line from the commands.
- Retries: `RETRIES` tries at most `MAX_DELAY_S` apart in gcsfs and in
  Orbax's tensorstore (`bound_tensorstore_retries`), so that a fault that
  persists ends a command within a bound the user sets.
- `read_bytes` / `read_text` / `reading`: a caller's read of an output; in a
  bucket an error is a `StorageError` naming the object (one GET through
  gcsfs's `cat_file` for whole reads).
- `WRITE_GUARDS`: `training.lock` refuses writes into a folder whose lock
  this process lost.

Inputs (the data folder, ArrayRecord files, the vocab) of training, export and
evaluation stay on local disk or on a mounted bucket: `require_local` says so
for a `gs://` input. The dataset build reads its inputs from `gs://` too
(`open_input`, `read_bytes`, `find_inputs`) and uploads each shard whole
(`upload_once`).

Tests point the clients at a local emulator through their documented
endpoint settings (`STORAGE_EMULATOR_HOST` for gcsfs,
`TENSORSTORE_GCS_HTTP_URL` for Orbax's tensorstore); nothing here knows.
"""

from __future__ import annotations

import base64
import contextlib
import importlib
import io
import os
import pathlib
import shutil
import stat
import threading
import time
import uuid
from typing import Iterator, Union

from etils import epath

Path = epath.Path
PathLike = Union[str, os.PathLike]

REMOTE_PREFIXES = ('gs://',)
# How long `check_writable` waits for a bucket to answer (gcsfs retries a refused connection for
# about a minute before it gives up).
REACH_TIMEOUT_S = float(os.environ.get('CAPTURE_STORAGE_TIMEOUT_S', '120'))


# How long one request to GCS may wait for the next bytes of an answer before gcsfs gives up on it
# and retries (its default waits 5 minutes; a stalled connection would hold a run that long).
REQUEST_TIMEOUT_S = float(os.environ.get('CAPTURE_STORAGE_REQUEST_TIMEOUT_S', '60'))
# tensorstore (Orbax's arrays) talks to GCS through curl: a transfer slower than 1 byte/s for
# that long is cut (and retried by tensorstore). Read by tensorstore once per process, so set
# before it first opens a bucket (this module is imported before any checkpoint is).
os.environ.setdefault('TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES', '1')
os.environ.setdefault(
    'TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS', str(int(max(1, REQUEST_TIMEOUT_S)))
)


# How many times one request to GCS is tried, and the longest wait between two tries (an
# exponential backoff from 1 s: 1, 2, 4, ... capped there), in every layer: gcsfs (metadata,
# metrics, exports, reports, the lock; its own setting is a fixed 6 tries) and tensorstore (Orbax's
# arrays; its own default is 32 tries up to 32 s apart, about 15 minutes). The defaults give up
# after about 2.5 minutes of failures; the tests set a few tries 0.2 s apart.
RETRIES = int(os.environ.get('CAPTURE_STORAGE_RETRIES', '10'))
MAX_DELAY_S = float(os.environ.get('CAPTURE_STORAGE_MAX_DELAY_S', '32'))


def _configure_gcsfs() -> None:
  """gcsfs caches folder listings for the life of the process by default; other processes (the
  other hosts of a pod, a resumed run) and tensorstore (Orbax's arrays) write objects it does not
  see, so a cached listing would miss checkpoints and shards. Listings are read fresh. A request
  whose answer stalls is cut after `REQUEST_TIMEOUT_S` (and retried by gcsfs).

  gcsfs itself is imported by fsspec the first time a `gs://` path is used, through
  `storage_gcsfs` (which bounds its retries): it takes ~0.4 s that a command on local disks
  does not pay."""
  import aiohttp  # pylint: disable=import-outside-toplevel  (installed with gcsfs)
  import fsspec.config  # pylint: disable=import-outside-toplevel

  timeout = aiohttp.ClientTimeout(
      total=None, sock_connect=REQUEST_TIMEOUT_S, sock_read=REQUEST_TIMEOUT_S
  )
  for protocol in ('gs', 'gcs'):
    conf = fsspec.config.conf.setdefault(protocol, {})
    conf.setdefault('use_listings_cache', False)
    conf.setdefault('requests_timeout', timeout)
    fsspec.register_implementation(
        protocol, 'capture_jax.storage_gcsfs.GCSFileSystem', clobber=True
    )
    if protocol in fsspec.registry:  # resolved before this import: fsspec will not import it
      importlib.import_module('capture_jax.storage_gcsfs')


def bound_tensorstore_retries() -> None:
  """Makes Orbax's tensorstore contexts retry a GCS request `RETRIES` times, at most
  `MAX_DELAY_S` apart (tensorstore's `gcs_request_retries` resource; Orbax builds every context
  from two private dicts and offers no option for it). Called when `training.checkpoint` is
  imported (so `$CAPTURE_STORAGE_RETRIES` is read then; call again after changing `RETRIES`);
  importing Orbax here would slow every command."""
  from orbax.checkpoint._src.serialization import tensorstore_utils  # pylint: disable=import-outside-toplevel

  bounds = {
      'max_retries': max(1, RETRIES),
      'initial_delay': f'{min(1.0, MAX_DELAY_S)}s',
      'max_delay': f'{MAX_DELAY_S}s',
  }
  for context in (
      tensorstore_utils._BASE_TS_CONTEXT,  # pylint: disable=protected-access
      tensorstore_utils._DEFAULT_OCDBT_TS_CONTEXT,  # pylint: disable=protected-access
  ):
    context['gcs_request_retries'] = dict(bounds)


_configure_gcsfs()


# Called with the path before every `write_bytes`/`write_text` (`training.lock` refuses writes
# into a folder whose lock this process lost).
WRITE_GUARDS: list = []


class StorageError(RuntimeError):
  """An output location that cannot be used (no such bucket, no access, unreachable)."""


def as_path(path: PathLike) -> epath.Path:
  text = os.fspath(path)
  if text.startswith('gs:/') and not text.startswith('gs://'):
    # What pathlib makes of 'gs://b/x': written as is, it would become a local folder 'gs:'.
    raise ValueError(f'{text!r}: a gs:// path that went through pathlib; pass it as a string')
  return epath.Path(path)


def absolute(path: PathLike) -> epath.Path:
  """`path` made absolute (a `gs://` path is already; epath's `absolute()` would prepend the
  working directory to it)."""
  return as_path(path) if is_remote(path) else as_path(os.path.abspath(path))


def is_remote(path: PathLike) -> bool:
  """Whether `path` is in object storage (`gs://...`), where there is no rename, append or flock."""
  return str(path).startswith(REMOTE_PREFIXES)


def require_local(path: PathLike, what: str) -> pathlib.Path:
  """`path` as a local path; a `gs://` input is refused with what to do instead."""
  if is_remote(path):
    raise ValueError(
        f'{what}={path}: inputs are read from local disk (ArrayRecord and the region-feature '
        'readers open local files). Copy them to the host (gcloud storage cp -r) or mount the '
        'bucket (gcsfuse) and pass the local path; outputs (--workdir, --out) can be gs://.'
    )
  return pathlib.Path(path)


def _filesystem(path: PathLike):
  import fsspec  # pylint: disable=import-outside-toplevel

  return fsspec.filesystem(str(path).split('://', 1)[0])


def _bucket(path: PathLike) -> str:
  return str(path).split('://', 1)[1].split('/', 1)[0]


# --------------------------------------------------------------------------
# Reachability.


def check_writable(path: PathLike, timeout_s: float | None = None) -> None:
  """Raises StorageError naming `path` when it is in a bucket that does not exist, cannot be
  reached within `timeout_s` (default `$CAPTURE_STORAGE_TIMEOUT_S`, 120 s), or cannot be written
  (a small probe object is written and deleted). Local paths pass (their folders are created
  when written)."""
  if not is_remote(path):
    return
  timeout_s = REACH_TIMEOUT_S if timeout_s is None else timeout_s
  bucket = f'gs://{_bucket(path)}'

  def probe() -> None:
    # A probe object written and deleted: needs only object permissions (checking the bucket
    # itself would need storage.buckets.get, which a writer may lack).
    fs = _filesystem(path)
    name = str(as_path(path) / f'.write-probe-{uuid.uuid4().hex}')
    try:
      fs.pipe_file(name, b'')
    except FileNotFoundError:
      raise StorageError(
          f'{path}: the bucket {bucket} does not exist (or these credentials cannot see it); '
          'create it (gcloud storage buckets create) or fix --workdir/--out'
      ) from None
    fs.rm_file(name)

  # A daemon thread: a probe stuck on a silent endpoint must not keep the process alive after
  # the error is reported.
  outcome: list[BaseException | None] = []
  thread = threading.Thread(target=lambda: outcome.append(_capture(probe)), daemon=True)
  thread.start()
  thread.join(timeout_s)
  if not outcome:
    raise StorageError(
        f'{path}: no answer from Google Cloud Storage within {timeout_s:.0f} s (network, '
        'endpoint or credentials; $CAPTURE_STORAGE_TIMEOUT_S sets the wait); nothing was started'
    )
  error = outcome[0]
  if isinstance(error, StorageError):
    raise error
  if error is not None:
    raise StorageError(
        f'{path} cannot be written ({type(error).__name__}: {str(error)[:300]}); check the '
        'bucket, its permissions and the credentials (gcloud auth application-default login)'
    )


def _capture(fn) -> BaseException | None:
  try:
    fn()
  except Exception as e:  # pylint: disable=broad-except
    return e
  return None


# --------------------------------------------------------------------------
# What is there: "not found" is the only answer read as absent.


@contextlib.contextmanager
def naming(path: PathLike, operation: str, keep: tuple = ()) -> Iterator[None]:
  """Turns an error of a `gs://` operation that gcsfs gave up on (after its retries) into a
  StorageError naming the object and the operation: the commands print it as one `error:`
  line. "Not found", a refused precondition and the types in `keep` pass as they are (callers
  decide on them)."""
  try:
    yield
  except (FileNotFoundError, FileExistsError, StorageError, *keep):
    raise
  except Exception as e:  # pylint: disable=broad-except
    # tensorstore appends its whole spec (kilobytes of JSON) to its errors; the object and the
    # cause come before it.
    message = ' '.join(str(e).split(' [tensorstore_spec=', 1)[0].split())  # one line
    raise StorageError(
        f'{path}: {operation} failed ({type(e).__name__}: {message[:400]}); Google Cloud '
        f'Storage kept failing after the retries ({RETRIES} tries; $CAPTURE_STORAGE_RETRIES)'
    ) from e


@contextlib.contextmanager
def reading(path: PathLike, keep: tuple = (), operation: str = 'reading') -> Iterator[None]:
  """Around a caller's read of `path` (epath's `read_text`, `read_bytes`, `open`): in a bucket,
  an error gcsfs gave up on is a StorageError naming the object ("reading"); "not found" and
  the types in `keep` (a parser's errors) pass as they are. On disk errors pass as they are."""
  if not is_remote(path):
    yield
    return
  with naming(path, operation, keep=keep):
    yield


def read_bytes(path: PathLike) -> bytes:
  """The bytes of `path`; a read error in a bucket is a StorageError naming it (`reading`).

  In a bucket one GET (gcsfs's `cat_file`, retried as a whole): gcsfs's file reader (what
  `epath`'s `read_bytes` and `open` use) prefetches in the background and was seen to hand its
  reader a short read after a persistent error, which a parser then takes for a damaged file."""
  with reading(path):
    if is_remote(path):
      return _filesystem(path).cat_file(str(path))
    return as_path(path).read_bytes()


def read_text(path: PathLike) -> str:
  """The UTF-8 text of `path`; a read error in a bucket is a StorageError naming it."""
  return read_bytes(path).decode('utf-8')


def _info(path: epath.Path) -> dict | None:
  """gcsfs's info of a `gs://` path; None when nothing is there. Any other error raises:
  fsspec's `exists`, `isfile` and `isdir` (and so `epath.Path`'s) answer False on every
  error, so a 503 or a reset would read as "absent" and, say, restart a run from step 0."""
  try:
    with naming(path, 'reading the metadata of'):
      return _filesystem(path).info(str(path))
  except FileNotFoundError:
    return None


def exists(path: PathLike) -> bool:
  """Whether a file or a folder (an object prefix on GCS) is at `path`; raises on a read error."""
  path = as_path(path)
  return _info(path) is not None if is_remote(path) else os.path.exists(path)


def is_file(path: PathLike) -> bool:
  """Whether a file (an object) is at `path`; raises on a read error."""
  path = as_path(path)
  if not is_remote(path):
    return os.path.isfile(path)
  info = _info(path)
  return info is not None and info.get('type') == 'file'


def is_dir(path: PathLike) -> bool:
  """Whether a folder (on GCS: objects under the prefix) is at `path`; raises on a read error."""
  path = as_path(path)
  if not is_remote(path):
    return os.path.isdir(path)
  info = _info(path)
  return info is not None and info.get('type') == 'directory'


# --------------------------------------------------------------------------
# Whole-file writes.


def write_bytes(path: PathLike, data: bytes) -> None:
  """Writes `data` to `path` so that a reader never sees a partial file."""
  path = as_path(path)
  for guard in WRITE_GUARDS:
    guard(path)
  if is_remote(path):
    with naming(path, 'writing'):
      path.write_bytes(data)  # one object upload: all or nothing
    return
  local = pathlib.Path(path)
  local.parent.mkdir(parents=True, exist_ok=True)
  tmp = local.with_name(f'.{local.name}.tmp-{os.getpid()}')
  try:
    with open(tmp, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, local)
  finally:
    if tmp.exists():
      tmp.unlink()


def write_text(path: PathLike, text: str) -> None:
  write_bytes(path, text.encode('utf-8'))


# --------------------------------------------------------------------------
# Folders.


def makedirs(path: PathLike) -> None:
  """Creates a local folder (and its parents); GCS has no folders to create."""
  if not is_remote(path):
    pathlib.Path(path).mkdir(parents=True, exist_ok=True)


def rename_tree(source: PathLike, target: PathLike) -> None:
  """Moves a folder: `os.rename` on disk, copy and delete on GCS."""
  if is_remote(source):
    # Copy then delete (gcsfs's own `mv` first tries the object-move API of hierarchical
    # buckets and retries for half a minute where there is none).
    fs = _filesystem(source)
    with naming(source, f'moving it to {target}'):
      fs.copy(str(source), str(target), recursive=True)
      fs.rm(str(source), recursive=True)
  else:
    os.rename(source, target)


def file_listing(folder: PathLike) -> dict[str, dict[str, object]]:
  """Relative POSIX name -> {'bytes': size[, 'crc32c': GCS's checksum]} of every file under
  `folder` (recursively; empty when it does not exist)."""
  folder = as_path(folder)
  if not is_remote(folder):
    root = pathlib.Path(folder)
    if not root.is_dir():
      return {}
    out = {}
    for p in sorted(root.rglob('*')):
      try:
        st = p.stat()
      except FileNotFoundError:  # renamed or removed since the walk (a marker's temporary file)
        continue
      if stat.S_ISREG(st.st_mode):
        out[p.relative_to(root).as_posix()] = {'bytes': st.st_size}
    return out
  fs = _filesystem(folder)
  prefix = str(folder).split('://', 1)[1].rstrip('/') + '/'
  out = {}
  # `find` lists with gcsfs's `_ls`, which raises on errors (an empty answer is a real one).
  with naming(folder, 'listing'):
    found = fs.find(str(folder), detail=True)
  for name, info in sorted(found.items()):
    if info.get('type') == 'directory' or not name.startswith(prefix):
      continue
    entry = {'bytes': int(info['size'])}
    if info.get('crc32c'):
      entry['crc32c'] = info['crc32c']
    out[name[len(prefix) :]] = entry
  return out


def iter_files(folder: PathLike) -> Iterator[tuple[str, epath.Path]]:
  """(relative POSIX name, path) of every file under `folder`."""
  folder = as_path(folder)
  for name in file_listing(folder):
    yield name, folder / name


# --------------------------------------------------------------------------
# A growing text file.


class AppendFile:
  """Appends text lines to `path`; on GCS, uploads the whole file again when flushed.

  `flush()` uploads if `upload_every_s` passed since the last upload (GCS
  allows about one write per second to one object) or if nothing was uploaded
  yet; `flush(force=True)` always does. On disk every flush is an OS flush, as
  with `open(path, 'a')`.
  """

  def __init__(self, path: PathLike, upload_every_s: float = 10.0):
    self.path = as_path(path)
    self.remote = is_remote(self.path)
    self.upload_every_s = upload_every_s
    if self.remote:
      self._text = ''
      if is_file(self.path):
        self._text = read_text(self.path)
      self._dirty = False
      # None until the first upload: `time.monotonic()` counts from an arbitrary origin (the
      # boot on Linux), so no number stands for "never" (0.0 meant "just now" on a machine
      # booted less than `upload_every_s` ago).
      self._uploaded: float | None = None
      self._file = None
    else:
      makedirs(self.path.parent)
      self._file = open(self.path, 'a', encoding='utf-8')

  def write(self, text: str) -> None:
    if self.remote:
      self._text += text
      self._dirty = True
    else:
      self._file.write(text)

  def flush(self, force: bool = False) -> None:
    if not self.remote:
      self._file.flush()
      return
    if self._dirty and (force or self._upload_due()):
      try:
        write_text(self.path, self._text)
      except Exception as e:  # pylint: disable=broad-except
        if force:
          raise
        # A periodic upload that fails is retried at the next flush (the rows stay in memory);
        # only the forced one before a checkpoint must succeed.
        print(
            f'WARNING: could not upload {self.path} ({type(e).__name__}: {e}); retrying', flush=True
        )
        self._uploaded = time.monotonic()
        return
      self._dirty = False
      self._uploaded = time.monotonic()

  def _upload_due(self) -> bool:
    return self._uploaded is None or time.monotonic() - self._uploaded >= self.upload_every_s

  def close(self) -> None:
    if self.remote:
      self.flush(force=True)
    elif self._file is not None:
      self._file.close()
      self._file = None


# --------------------------------------------------------------------------
# Inputs and whole-file uploads (the dataset build reads its annotations, features and vocab
# from disk or a bucket, and uploads each finished shard).

# Read-ahead of a sequential read of a `gs://` input (annotation files, feature TSVs being
# indexed): one request per this many bytes.
INPUT_BLOCK_BYTES = 16 * 2**20


def open_input(path: PathLike, mode: str = 'rb', cache: bool = True):
  """A file of `path` open for reading: the OS's for a local path, gcsfs's for `gs://` (seekable;
  `cache=False`: each `read(n)` is one range request of exactly those bytes, for random access;
  else reads ahead `INPUT_BLOCK_BYTES`). Not found: FileNotFoundError naming the path."""
  if not is_remote(path):
    return open(path, mode)
  with naming(path, 'opening'):
    f = _filesystem(path).open(str(path), mode, cache_type='none')
  if not cache:
    return f
  # io's buffered reader: fsspec's own `readline` reads a whole block per line and seeks back (a
  # copy of `INPUT_BLOCK_BYTES` per line of a feature TSV).
  return io.BufferedReader(f, buffer_size=INPUT_BLOCK_BYTES)


def find_inputs(folder: PathLike, suffixes: tuple[str, ...]) -> list[str]:
  """Every file under `folder` (recursively) whose name ends with one of `suffixes`, sorted, as
  paths of the same kind as `folder` (`gs://...` for a bucket)."""
  folder = os.fspath(folder)
  if not is_remote(folder):
    return sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(folder, followlinks=True)  # as glob's '**' does
        for name in names
        if name.endswith(suffixes)
    )
  with naming(folder, 'listing'):
    found = _filesystem(folder).find(folder)
  return sorted(f'gs://{name}' for name in found if name.endswith(suffixes))


def input_versions(path: PathLike) -> list:
  """[relative name, size, version] of the file at `path` or of every file under it: what a
  resumed build compares to know its inputs did not change (version: the modification time in
  ns on disk, the object's generation on GCS, which changes at every upload)."""
  path = os.fspath(path)
  if not is_remote(path):
    if os.path.isfile(path):
      st = os.stat(path)
      return [[os.path.basename(path), st.st_size, st.st_mtime_ns]]
    out = []
    for root, _, names in sorted(os.walk(path)):
      for name in sorted(names):
        st = os.stat(os.path.join(root, name))
        out.append([os.path.relpath(os.path.join(root, name), path), st.st_size, st.st_mtime_ns])
    return out
  with naming(path, 'listing'):
    found = _filesystem(path).find(path, detail=True, withdirs=False)
  prefix = path.split('://', 1)[1].rstrip('/')
  out = []
  for name, info in sorted(found.items()):
    rel = name[len(prefix) + 1 :] if name != prefix else os.path.basename(name)
    out.append([rel, int(info['size']), str(info.get('generation', ''))])
  return out


def object_info(path: PathLike) -> dict | None:
  """{'bytes': size, 'crc32c': GCS's checksum} of the object at a `gs://` path; None if absent
  (any other error raises, see `_info`)."""
  info = _info(as_path(path))
  if info is None or info.get('type') != 'file':
    return None
  return {'bytes': int(info['size']), 'crc32c': info.get('crc32c')}


def file_crc32c(local: PathLike) -> str:
  """GCS's checksum of a local file: base64 of the big-endian CRC32C, as object listings give."""
  import google_crc32c  # pylint: disable=import-outside-toplevel  (installed with gcsfs)

  crc = google_crc32c.Checksum()
  with open(local, 'rb') as f:
    for block in iter(lambda: f.read(4 * 2**20), b''):
      crc.update(block)
  return base64.b64encode(crc.digest()).decode('ascii')


def upload_once(local: PathLike, target: PathLike) -> str:
  """Uploads the local file `local` whole to the object `target`; returns its CRC32C.

  Create-only (`ifGenerationMatch=0`): the object appears whole or not at all. A refused
  precondition is not taken for a conflict as such: when the object there has this file's
  CRC32C it is this upload (a retry after a lost answer) or an identical one (a task run twice)
  and is kept; otherwise it is a leftover of an upload whose build was killed before its marker,
  and is replaced (deleted conditionally on its generation, then created again). If the object
  changes under this call again, FileExistsError names it (two builds writing one folder).
  """
  crc = file_crc32c(local)
  fs = _filesystem(target)
  for attempt in range(2):
    try:
      with naming(target, 'uploading'):
        fs.put_file(os.fspath(local), str(target), mode='create')
      return crc
    except FileExistsError:
      info = fs.info(str(target))
      if info.get('crc32c') == crc and int(info['size']) == os.path.getsize(local):
        return crc
      if attempt:
        break
      bucket, key = str(target).split('://', 1)[1].split('/', 1)
      try:
        fs.call('DELETE', 'b/{}/o/{}', bucket, key, ifGenerationMatch=str(info['generation']))
      except FileNotFoundError:
        pass
  raise FileExistsError(
      f'{target}: another writer keeps replacing this object (is a second build writing into '
      'the same folder?)'
  )


def remove_tree(path: PathLike) -> None:
  """Removes a folder (or a file) and everything under it; nothing there is not an error."""
  path = os.fspath(path)
  if not is_remote(path):
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)
    return
  fs = _filesystem(path)
  with naming(path, 'removing'):
    try:
      fs.rm(path, recursive=True)
    except FileNotFoundError:
      pass


def copy_objects(sources: list[str], targets: list[str]) -> None:
  """Copies objects within GCS (server-side copies, concurrent; no bytes through this host)."""
  if not sources:
    return
  fs = _filesystem(sources[0])
  with naming(sources[0], f'copying it (and {len(sources) - 1} more) to {targets[0]}'):
    fs.copy(list(sources), list(targets))
