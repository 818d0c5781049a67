"""The bucket under faults: every client of the project talks to the GCS emulator through
`tests/gcs_proxy.FaultProxy`, which injects 503/429/500 answers, connection resets, stalls past
the client's timeout and writes whose answer is lost, and enforces generation preconditions
(the emulator ignores them; the proxy refuses with 412 as GCS does).

A transient fault is retried and ends with the same bytes as without it; a fault that persists
is an error naming the object; the lock's create, refresh and release survive transient faults,
and a holder that cannot confirm its lock stops (LockLostError).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import aiohttp
import fsspec
import fsspec.config
import pytest

from capture_jax import storage
from capture_jax.training import lock as lock_lib
from tests.gcs_proxy import Fault
from tests.gcs_proxy import FaultProxy
from tests.test_storage_gcs import BUCKET
from tests.test_storage_gcs import _send_generation_headers
from tests.test_storage_gcs import free_port
from tests.test_lock_fencing import check_stopped_before_its_first_checkpoint
from tests.test_lock_fencing import run_trainer_and_take_over
from tests.test_train import trainer_config

os.environ.setdefault('NO_GCE_CHECK', 'true')

OBJECTS = r'/storage/v1/b/[^/]+/o'
# The bounds on retries in these tests ($CAPTURE_STORAGE_RETRIES, $CAPTURE_STORAGE_MAX_DELAY_S).
RETRIES = 3
MAX_DELAY_S = 0.2
REPO = Path(__file__).resolve().parents[1]


def _clear_clients() -> None:
  """fsspec caches one gcsfs client per set of arguments: a client made for another endpoint
  (another test module's emulator) would bypass the proxy."""
  import gcsfs  # pylint: disable=import-outside-toplevel

  gcsfs.GCSFileSystem.clear_instance_cache()


def _bound_tensorstore() -> None:
  from capture_jax.training import checkpoint  # pylint: disable=import-outside-toplevel,unused-import

  storage.bound_tensorstore_retries()


@pytest.fixture(scope='module')
def proxy():
  """An emulator that ignores preconditions, behind the proxy; the clients pointed at the proxy
  (os.environ, for this module's tests and their subprocesses)."""
  try:
    from gcp_storage_emulator.server import create_server  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    pytest.skip(f'gcp-storage-emulator is not installed ({e}); it is in requirements-test.txt')
  _send_generation_headers()
  port = free_port()
  server = create_server('localhost', port, in_memory=True, default_bucket=BUCKET)
  server.start()
  with FaultProxy(f'http://localhost:{port}') as p:
    env = {
        'STORAGE_EMULATOR_HOST': p.url,
        'TENSORSTORE_GCS_HTTP_URL': p.url,
        'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',
        'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
        # A fault that persists ends after 3 tries 0.2 s apart (subprocesses read these).
        'CAPTURE_STORAGE_RETRIES': str(RETRIES),
        'CAPTURE_STORAGE_MAX_DELAY_S': str(MAX_DELAY_S),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    # A stalled answer is cut after 2 s here (`storage.REQUEST_TIMEOUT_S`, 60 s by default).
    confs = [fsspec.config.conf[protocol] for protocol in ('gs', 'gcs')]  # gcsfs reads both
    saved_timeout = confs[0]['requests_timeout']
    for conf in confs:
      conf['requests_timeout'] = aiohttp.ClientTimeout(total=None, sock_connect=2, sock_read=2)
    saved_bounds = storage.RETRIES, storage.MAX_DELAY_S
    storage.RETRIES, storage.MAX_DELAY_S = RETRIES, MAX_DELAY_S
    _bound_tensorstore()
    _clear_clients()
    try:
      yield p
    finally:
      storage.RETRIES, storage.MAX_DELAY_S = saved_bounds
      _bound_tensorstore()
      p.script()
      lock_lib._LOST.clear()  # pylint: disable=protected-access  (the module's lost locks)
      for conf in confs:
        conf['requests_timeout'] = saved_timeout
      for k, v in saved.items():
        if v is None:
          os.environ.pop(k, None)
        else:
          os.environ[k] = v
      _clear_clients()
      server.stop()


@pytest.fixture
def faults(proxy):
  """The proxy with no faults; cleared after the test."""
  proxy.script()
  yield proxy
  proxy.script()


def gs(name: str) -> str:
  return f'gs://{BUCKET}/faults/{name}'


# --------------------------------------------------------------------------
# Reads, writes and listings under transient faults: the same bytes as without them.


@pytest.mark.parametrize(
    'fault',
    [
        Fault('GET', OBJECTS + r'/.*data\.bin', 'status', status=503),
        Fault('GET', OBJECTS + r'/.*data\.bin', 'status', status=429),
        Fault('GET', OBJECTS + r'/.*data\.bin', 'status', status=500),
        Fault('GET', OBJECTS + r'/.*data\.bin', 'reset'),
        Fault('GET', OBJECTS + r'/.*data\.bin', 'stall', stall_s=30.0),  # past the 2 s timeout
    ],
    ids=['503', '429', '500', 'reset', 'stall'],
)
def test_a_read_is_retried(faults, fault):
  path = storage.as_path(gs(f'read-{fault.kind}-{fault.status}/data.bin'))
  storage.write_bytes(path, b'\x00\x01' * 1000)
  faults.script(fault)
  assert path.read_bytes() == b'\x00\x01' * 1000
  assert faults.injected() == 1, faults.log[-5:]


@pytest.mark.parametrize(
    'fault',
    [
        Fault('POST', r'/upload/.*data\.bin', 'status', status=503),
        Fault('POST', r'/upload/.*data\.bin', 'status', status=429),
        Fault('POST', r'/upload/.*data\.bin', 'reset'),
        Fault('POST', r'/upload/.*data\.bin', 'lost'),
    ],
    ids=['503', '429', 'reset', 'lost'],
)
def test_a_write_is_retried(faults, fault):
  path = storage.as_path(gs(f'write-{fault.kind}-{fault.status}/data.bin'))
  faults.script(fault)
  storage.write_bytes(path, b'payload')
  assert faults.injected() == 1, faults.log[-5:]
  faults.script()
  assert path.read_bytes() == b'payload'


@pytest.mark.parametrize(
    'fault',
    [
        Fault('GET', OBJECTS + r'\?.*prefix=faults/listing', 'status', status=503),
        Fault('GET', OBJECTS + r'\?.*prefix=faults/listing', 'reset'),
    ],
    ids=['503', 'reset'],
)
def test_a_listing_is_retried(faults, fault):
  root = storage.as_path(gs('listing'))
  storage.write_text(root / 'a' / 'b.txt', 'hello')
  expected = storage.file_listing(root)
  faults.script(fault)
  assert storage.file_listing(root) == expected
  assert faults.injected() == 1, faults.log[-5:]


def test_the_proxy_enforces_generation_preconditions(faults):
  """The emulator behind it ignores them: what refuses is the proxy, as GCS would."""
  path = storage.as_path(gs('precondition/x.lock'))
  storage.write_text(path, 'first')
  with pytest.raises(FileExistsError):
    lock_lib._gcs_upload(path, b'second', if_generation='0')  # pylint: disable=protected-access
  assert '412' in [what for _, _, what in faults.log[-3:]], faults.log[-3:]
  assert path.read_text() == 'first'


def test_no_error_reads_as_absent(faults):
  """fsspec's `isfile`/`isdir` (epath's `is_file`/`is_dir`) answer False on any error; `storage`'s raise, naming the
  object and the operation (403: not retried by gcsfs, so the test is quick)."""
  path = storage.as_path(gs('persisting/data.bin'))
  storage.write_bytes(path, b'x')
  faults.script(Fault('GET', OBJECTS + r'.*persisting/', 'status', nth=None, status=403))
  fs = fsspec.filesystem('gs')
  assert not fs.isfile(str(path)) and not path.parent.is_dir()  # the trap: errors read as absent
  for check in (storage.exists, storage.is_file, storage.is_dir):
    with pytest.raises(
        storage.StorageError, match=r'persisting/data\.bin: reading the metadata of failed'
    ):
      check(path)


def test_a_fault_that_persists_is_one_error_naming_the_object_and_the_operation(faults):
  root = storage.as_path(gs('persisting-write'))
  faults.script(Fault('POST', r'/upload/.*persisting-write', 'status', nth=None, status=403))
  with pytest.raises(storage.StorageError, match=r'persisting-write/a\.txt: writing failed'):
    storage.write_text(root / 'a.txt', 'a')
  faults.script(
      Fault('GET', OBJECTS + r'\?.*prefix=faults/persisting-write', 'status', nth=None, status=403)
  )
  with pytest.raises(storage.StorageError, match=r'persisting-write: listing failed'):
    storage.file_listing(root)


# --------------------------------------------------------------------------
# The lock.


def lock_object(folder: str) -> dict:
  return json.loads(storage.as_path(folder + '/x.lock').read_text())


def test_a_lock_create_whose_answer_was_lost_is_ours(faults):
  """The create lands, its answer is lost, gcsfs sends it again and the store refuses it (412:
  the object exists): the lock recognises its own write by the nonce and holds the lock."""
  folder = gs('lost-create')
  faults.script(Fault('POST', r'/upload/.*lost-create/x\.lock', 'lost'))
  lock = lock_lib.FolderLock(folder, 'x.lock', 'export', enabled=True)
  with lock:
    assert faults.injected() == 1, faults.log[-5:]
    assert '412' in [what for _, _, what in faults.log], faults.log
    assert lock_object(folder)['token'] == lock._token  # pylint: disable=protected-access
    lock.confirm()
  assert not storage.as_path(folder + '/x.lock').exists()


@pytest.mark.parametrize('kind', ['status', 'reset', 'lost'])
def test_a_lock_refresh_survives_a_transient_fault(faults, kind):
  folder = gs(f'refresh-{kind}')
  with lock_lib.FolderLock(folder, 'x.lock', 'export', enabled=True) as lock:
    faults.script(Fault('POST', rf'/upload/.*refresh-{kind}/x\.lock', kind))
    lock.confirm()  # a conditional rewrite, through the fault
    assert faults.injected() == 1, faults.log[-5:]
    faults.script()
    lock.confirm()
    before = lock_object(folder)['heartbeat']
  assert before and not storage.as_path(folder + '/x.lock').exists()


def test_a_lock_refresh_that_landed_but_failed_past_the_retries_is_kept(faults):
  """The rewrite lands, its answer is lost, and every retry fails (503): the refresh failed, but
  the object holds it. The next refresh must not read its own write as a takeover."""
  folder = gs('refresh-landed')
  upload = r'/upload/.*refresh-landed/x\.lock'
  with lock_lib.FolderLock(folder, 'x.lock', 'export', enabled=True, heartbeat_s=3600) as lock:
    faults.script(
        Fault('POST', upload, 'lost', nth=(1,)),
        Fault('POST', upload, 'status', nth=tuple(range(2, RETRIES + 1)), status=503),
    )
    lock.confirm()  # fails past the retries, within the stale window: tolerated
    assert faults.injected() == RETRIES, faults.log[-5:]
    faults.script()
    lock.confirm()  # conditional on the landed write's generation
    lock.confirm()
    assert lock.lost is None
  assert not storage.as_path(folder + '/x.lock').exists()


def test_a_holder_whose_lock_was_taken_over_stops(faults, capfd):
  folder = gs('taken-over')
  lock = lock_lib.FolderLock(folder, 'x.lock', 'export', enabled=True, heartbeat_s=3600)
  with lock:
    storage.write_text(folder + '/a.txt', 'a')
    # Another command rewrites it (same token: only the store's generation check can tell).
    holder = lock_object(folder)
    storage.write_text(folder + '/x.lock', json.dumps({**holder, 'pid': 1, 'nonce': 'theirs'}))
    with pytest.raises(lock_lib.LockLostError, match=r'x\.lock was taken over .*pid 1'):
      lock_lib.confirm(folder, 'x.lock')
    with pytest.raises(lock_lib.LockLostError, match=r'not writing .*b\.txt'):
      storage.write_text(folder + '/b.txt', 'b')
  assert lock_object(folder)['pid'] == 1  # the release left the other holder's lock
  assert '412' in [what for _, _, what in faults.log]
  # Released, the lost lock still refuses writes (a writer flushed at exit must not land).
  with pytest.raises(lock_lib.LockLostError, match=r'not writing .*c\.txt'):
    storage.write_text(folder + '/c.txt', 'c')


def test_a_holder_that_cannot_refresh_past_the_stale_window_stops(faults):
  folder = gs('unreachable')
  lock = lock_lib.FolderLock(
      folder, 'x.lock', 'export', enabled=True, heartbeat_s=0.5, stale_after_s=8.0
  )
  with lock:
    # Every refresh refused with an error that is not a takeover (403: not retried by gcsfs).
    # The window is wide enough for a loaded CI machine: the first confirm comes well within
    # half of it (the margin before a write that matters).
    faults.script(Fault('POST', r'/upload/.*unreachable/x\.lock', 'status', nth=None, status=403))
    lock.confirm()  # within the window: tolerated
    time.sleep(8.5)
    with pytest.raises(lock_lib.LockLostError, match=r'could not be refreshed for \d+ s'):
      lock.confirm()
    faults.script()


@pytest.mark.slow
def test_a_trainer_in_a_bucket_whose_lock_was_taken_over_stops(faults, tmp_path):
  config = trainer_config(tmp_path / 'data')
  config.train.num_steps = 4
  workdir = gs('trainer-taken-over')
  lock_path = storage.as_path(workdir + '/' + lock_lib.TRAIN_LOCK_FILE)

  def take_over():
    # Same token: the store's generation check is what refuses the trainer's next refresh.
    holder = json.loads(lock_path.read_text())
    storage.write_text(lock_path, json.dumps({**holder, 'pid': 1, 'nonce': 'theirs'}))

  code, out = run_trainer_and_take_over(config, workdir, tmp_path, take_over)
  check_stopped_before_its_first_checkpoint(code, out, workdir, 'train.lock was taken over')
  assert '412' in [what for _, _, what in faults.log], faults.log[-10:]
  assert json.loads(lock_path.read_text())['pid'] == 1  # the other holder's lock is left


# --------------------------------------------------------------------------
# Checkpoints (Orbax: arrays through tensorstore, the commit marker and metadata through gcsfs).


def _checkpoint_cfg():
  import ml_collections  # pylint: disable=import-outside-toplevel

  return ml_collections.ConfigDict(
      {'every_steps': 1, 'keep_last': 2, 'keep_every': 0, 'async_save': True}
  )


def save_and_restore(workdir: str, tree, step: int = 1):
  """Saves `tree` as the checkpoint `step` of `workdir` (our manager, options of the trainer's
  config), records its checksums, and restores it after verifying them."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  from capture_jax.training import checkpoint as checkpoint_lib  # pylint: disable=import-outside-toplevel

  manager = checkpoint_lib.make_manager(workdir, _checkpoint_cfg())
  try:
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree)))
    manager.wait_until_finished()
    checkpoint_lib.record_checksums(manager)
    assert manager.all_steps() == [step]
    assert checkpoint_lib.checksum_problems(checkpoint_lib.step_dir(manager, step)) == []
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(tree)))
    return restored['state']
  finally:
    manager.close()


def test_a_checkpoint_saved_and_restored_under_transient_faults_is_the_same(faults):
  import numpy as np  # pylint: disable=import-outside-toplevel

  tree = {
      'a': np.arange(4096, dtype=np.float32).reshape(64, 64),
      'b': np.full((7,), 3, dtype=np.int32),
  }
  faults.script(
      # tensorstore's array writes and reads (OCDBT files), gcsfs's metadata and commit marker.
      Fault('POST', r'/upload/.*#name=faults/ckpt/checkpoints/1/state/.*d/', 'status', nth=(1,)),
      # A conditional write (OCDBT's manifest) that lands but whose answer is lost.
      Fault('POST', r'/upload/.*ifGenerationMatch=0#name=faults/ckpt/.*manifest', 'lost', nth=(1,)),
      Fault('POST', r'/upload/.*#name=faults/ckpt/checkpoints/1/commit_success', 'reset', nth=(1,)),
      Fault(
          'GET', r'/o/faults/ckpt/checkpoints/1/state/.*alt=media', 'status', nth=(1,), status=429
      ),
      Fault('GET', r'/o/faults/ckpt/checkpoints/1/state/.*d/.*alt=media', 'reset', nth=(2,)),
      Fault('GET', r'/o/faults/ckpt/checkpoints/1/checksums', 'status', nth=(1,), status=500),
  )
  restored = save_and_restore(gs('ckpt'), tree)
  hits = [f.hits for f in faults.faults]
  assert all(hits), (hits, '\n'.join(map(str, [l for l in faults.log if 'ckpt' in l[1]])))
  for k, v in tree.items():
    np.testing.assert_array_equal(np.asarray(restored[k]), v)


# --------------------------------------------------------------------------
# Metrics and TensorBoard uploads; the lock's release.


def test_metrics_and_tensorboard_uploads_under_transient_faults(faults):
  from capture_jax.training import metrics as metrics_lib  # pylint: disable=import-outside-toplevel

  workdir = storage.as_path(gs('metrics'))
  faults.script(
      Fault('POST', r'/upload/.*#name=faults/metrics/metrics\.jsonl', 'status', nth=(1, 3)),
      Fault('POST', r'/upload/.*#name=faults/metrics/tensorboard/', 'reset', nth=(1,)),
  )
  writer = metrics_lib.MetricWriter(workdir, enabled=True, start_step=0)
  for step in (1, 2, 3):
    writer.write(step, {'loss': step / 10})
  writer.flush()
  text = writer._jsonl._text  # pylint: disable=protected-access
  writer.close()
  assert (workdir / 'metrics.jsonl').read_text() == text
  assert [f.hits for f in faults.faults] == [2, 1], faults.log[-10:]
  events = [n for n in storage.file_listing(workdir / 'tensorboard') if 'tfevents' in n]
  assert len(events) == 1
  # Reopened to resume from step 2 (a read and a rewrite under faults): rows 1 and 2 are left.
  faults.script(
      Fault('GET', r'/o/faults/metrics/metrics\.jsonl.*alt=media', 'status', status=429),
      Fault('POST', r'/upload/.*#name=faults/metrics/metrics\.jsonl', 'lost'),
  )
  metrics_lib.MetricWriter(workdir, enabled=True, start_step=2).close()
  assert (workdir / 'metrics.jsonl').read_text() == ''.join(text.splitlines(True)[:2])
  assert [f.hits for f in faults.faults] == [1, 1], faults.log[-10:]


@pytest.mark.parametrize('kind', ['status', 'reset', 'lost'])
def test_a_lock_release_survives_a_transient_fault(faults, kind):
  folder = gs(f'release-{kind}')
  with lock_lib.FolderLock(folder, 'x.lock', 'export', enabled=True):
    faults.script(Fault('DELETE', rf'/o/faults/release-{kind}/x\.lock', kind))
  assert faults.injected() == 1, faults.log[-5:]
  assert not storage.as_path(folder + '/x.lock').exists()


def test_a_restore_the_bucket_fails_to_serve_keeps_the_checkpoint(faults):
  """A verified checkpoint whose arrays cannot be read (a fault past the retries; 403 here, which
  tensorstore does not retry) is a StorageError naming the step, not an unreadable checkpoint
  moved aside (that would lose a good checkpoint to a transient fault)."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  from capture_jax.training import checkpoint as checkpoint_lib  # pylint: disable=import-outside-toplevel

  tree = {'a': np.arange(16, dtype=np.float32)}
  workdir = gs('restore-fails')
  save_and_restore(workdir, tree)
  faults.script(
      Fault(
          'GET',
          r'/o/faults/restore-fails/checkpoints/1/state/.*d/.*alt=media',
          'status',
          nth=None,
          status=403,
      )
  )
  manager = checkpoint_lib.make_manager(workdir, _checkpoint_cfg())
  try:
    with pytest.raises(
        storage.StorageError, match=r'checkpoints/1: restoring failed although its files match'
    ):
      checkpoint_lib.restore_latest(manager, tree, None, move_unreadable=True)
  finally:
    manager.close()
  faults.script()
  assert checkpoint_lib.corrupt_checkpoints(workdir) == []
  assert storage.is_dir(workdir + '/checkpoints/1')


def test_a_stalled_checkpoint_read_is_cut_and_retried(faults, tmp_path):
  """tensorstore (Orbax's arrays) waits as long as the connection lives; storage sets curl's
  low-speed limit ($CAPTURE_STORAGE_REQUEST_TIMEOUT_S, here 2 s) so a stalled read is cut and
  retried. In a subprocess: tensorstore reads the setting once per process."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  tree = {'a': np.arange(64, dtype=np.float32)}
  workdir = gs('stalled-read')
  save_and_restore(workdir, tree)
  faults.script(
      Fault(
          'GET', r'/o/faults/stalled-read/checkpoints/1/state/.*d/.*alt=media', 'stall', stall_s=60
      )
  )
  script = textwrap.dedent(f"""
      import numpy as np
      from tests.test_gcs_faults import _checkpoint_cfg
      from capture_jax.training import checkpoint as checkpoint_lib
      manager = checkpoint_lib.make_manager({workdir!r}, _checkpoint_cfg())
      state, step = checkpoint_lib.restore_latest(manager, {{'a': np.zeros(64, np.float32)}}, None)
      assert step == 1 and (np.asarray(state['a']) == np.arange(64)).all(), state
      print('restored')
  """)
  # What this process's `storage` set from its own timeout: the child derives them from its own.
  env = {k: v for k, v in os.environ.items() if not k.startswith('TENSORSTORE_CURL_')}
  start = time.time()
  out = subprocess.run(
      [sys.executable, '-c', script],
      cwd=REPO,
      env={**env, 'JAX_PLATFORMS': 'cpu', 'CAPTURE_STORAGE_REQUEST_TIMEOUT_S': '2'},
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert out.returncode == 0 and 'restored' in out.stdout, out.stdout + out.stderr[-3000:]
  assert faults.injected() == 1, faults.log[-5:]
  assert time.time() - start < 50  # cut long before the 60 s stall ends


def test_a_lock_create_that_keeps_failing_is_one_error_and_a_held_lock_still_refuses(faults):
  folder = gs('create-fails')
  faults.script(
      Fault('POST', r'/upload/.*#name=faults/create-fails/x\.lock', 'status', nth=None, status=403)
  )
  with pytest.raises(storage.StorageError, match=r'create-fails/x\.lock: taking the lock failed'):
    lock_lib.FolderLock(folder, 'x.lock', 'export', enabled=True).acquire()
  faults.script()
  with lock_lib.FolderLock(folder, 'x.lock', 'export', enabled=True):
    with pytest.raises(lock_lib.LockedError, match='in use by another export'):  # not wrapped
      lock_lib.FolderLock(folder, 'x.lock', 'export', enabled=True).acquire()


# --------------------------------------------------------------------------
# Bounds the user sets: a fault that persists ends within them, in every layer.


def test_a_fault_that_persists_ends_within_the_bounds_in_every_layer(faults):
  """503 (retried by gcsfs and tensorstore) on every try: a write through gcsfs, a checkpoint's
  array writes and its array reads (tensorstore) each end after `RETRIES` tries with one
  StorageError naming the object and the operation, in seconds (tensorstore's own default is 32
  tries, about 15 minutes)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  from capture_jax.training import checkpoint as checkpoint_lib  # pylint: disable=import-outside-toplevel

  start = time.time()
  faults.script(Fault('POST', r'/upload/.*#name=faults/bounded/a\.txt', 'status', nth=None))
  with pytest.raises(storage.StorageError, match=r'bounded/a\.txt: writing failed .*3 tries'):
    storage.write_text(gs('bounded/a.txt'), 'a')
  assert faults.injected() == RETRIES, faults.log[-5:]

  tree = {'a': np.arange(16, dtype=np.float32)}
  workdir = gs('bounded-save')
  faults.script(
      Fault('POST', r'/upload/.*#name=faults/bounded-save/checkpoints/1/state/', 'status', nth=None)
  )
  manager = checkpoint_lib.make_manager(workdir, _checkpoint_cfg())
  try:
    with pytest.raises(
        storage.StorageError,
        match=r'bounded-save/checkpoints: saving a checkpoint into failed .*Error writing '
        r'.*bounded-save/checkpoints/1/state/.*3 retry attempts failed',
    ):
      with checkpoint_lib.saving(manager):
        manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(tree)))
        manager.wait_until_finished()
  finally:
    manager.close()

  workdir = gs('bounded-restore')
  save_and_restore(workdir, tree)
  faults.script(
      Fault('GET', r'/o/faults/bounded-restore/checkpoints/1/state/.*alt=media', 'status', nth=None)
  )
  manager = checkpoint_lib.make_manager(workdir, _checkpoint_cfg())
  try:
    with pytest.raises(
        storage.StorageError,
        match=r'bounded-restore/checkpoints/1: restoring failed although its files match',
    ):
      checkpoint_lib.restore_latest(manager, tree, None, move_unreadable=True)
  finally:
    manager.close()
  # Tensorstore's own retries would take about 15 minutes; the bound is seconds (the margin is
  # for a loaded machine running two test workers).
  assert time.time() - start < 300


# --------------------------------------------------------------------------
# A commit conditional on the lock's generation.


def test_a_stale_holders_checkpoint_commit_is_refused_and_never_restored(faults, capfd):
  """Holder A saves step 1 (Orbax finalises it); B takes the lock over before A commits it. A's
  commit, a copy of the lock conditional on the generation A last wrote, is refused by the store
  (412): A stops (LockLostError), and B's restore does not count A's step (moved aside), while a
  step committed before the takeover is restored."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  from capture_jax.training import checkpoint as checkpoint_lib  # pylint: disable=import-outside-toplevel

  workdir = gs('stale-commit')
  lock_path = storage.as_path(workdir + '/' + lock_lib.TRAIN_LOCK_FILE)
  trees = {step: {'a': np.full((8,), step, dtype=np.float32)} for step in (1, 2)}
  lock = lock_lib.FolderLock(workdir, lock_lib.TRAIN_LOCK_FILE, 'trainer', True, heartbeat_s=3600)
  manager = checkpoint_lib.make_manager(workdir, _checkpoint_cfg())
  try:
    with lock:
      for step in (1, 2):
        lock_lib.confirm(workdir, lock_lib.TRAIN_LOCK_FILE)  # what train.py does before a save
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(trees[step])))
        manager.wait_until_finished()
        if step == 1:  # committed while A holds the lock: a copy of the lock
          checkpoint_lib.record_checksums(manager)
          record = json.loads((checkpoint_lib.step_dir(manager, 1) / 'commit.json').read_text())
          assert record['token'] == lock._token  # pylint: disable=protected-access
      # B takes the lock over (same token: only the store's generation check can tell).
      holder = json.loads(lock_path.read_text())
      storage.write_text(lock_path, json.dumps({**holder, 'pid': 1, 'nonce': 'theirs'}))
      with pytest.raises(lock_lib.LockLostError, match=r'taken over .*2/commit\.json'):
        checkpoint_lib.record_checksums(manager)
  finally:
    manager.close()
  assert '412' in [what for _, _, what in faults.log], faults.log[-10:]
  step_2 = storage.as_path(workdir + '/checkpoints/2')
  assert storage.is_file(step_2 / 'commit_success.txt')  # Orbax's marker landed: not enough
  assert not storage.exists(step_2 / 'commit.json')
  # B resumes: A's step 2 is not a checkpoint of the run; step 1 is.
  manager = checkpoint_lib.make_manager(workdir, _checkpoint_cfg())
  try:
    state, step = checkpoint_lib.restore_latest(manager, trees[1], None, move_unreadable=True)
  finally:
    manager.close()
  assert step == 1
  np.testing.assert_array_equal(np.asarray(state['a']), trees[1]['a'])
  assert (
      'lost the lock, or was killed, between checksums.json and its commit'
      in capfd.readouterr().out
  )
  assert [p.name.split('-')[1] for p in checkpoint_lib.corrupt_checkpoints(workdir)] == ['2']


# --------------------------------------------------------------------------
# Exports, proposals, the evaluation's outputs and the listings they decide from.


def _snapshot(folder: str) -> dict[str, bytes]:
  """Relative name -> bytes of every file under `folder` (locks left out; the times and speeds
  that an export's metadata, `evaluation.json` and `report.md` record left out too)."""
  root = storage.as_path(folder)
  out = {}
  timings = {
      '/metadata.json': ('created', 'samples_per_s'),
      '/evaluation.json': ('search_seconds', 'stage_seconds', 'export_samples_per_s'),
  }
  for name in storage.file_listing(root):
    if name.endswith('.lock'):
      continue
    out[name] = (root / name).read_bytes()
    for suffix, keys in timings.items():
      if name.endswith(suffix):
        fields = json.loads(out[name])
        out[name] = json.dumps({k: v for k, v in fields.items() if k not in keys}).encode()
    if name.endswith('/report.md'):
      lines = out[name].decode().splitlines(True)
      out[name] = ''.join(l for l in lines if 'samples/s' not in l).encode()
  return out


def _outputs(cfg, workdir: str, name: str) -> None:
  """The proposals and an evaluation of `workdir` (its exports: `{workdir}/embeddings`) into
  `{workdir}/{name}/...`."""
  from capture_jax import instances  # pylint: disable=import-outside-toplevel
  from capture_jax.retrieval import evaluation  # pylint: disable=import-outside-toplevel

  instances.evaluate_proposers(
      cfg, 'dev', methods=('boxes',), workdir=workdir, out_dir=f'{workdir}/{name}/proposals'
  )
  evaluation.evaluate(cfg, workdir, 'dev', out_dir=f'{workdir}/{name}/eval')


@pytest.mark.slow
def test_exports_proposals_and_an_evaluation_under_transient_faults_are_the_same_bytes(
    faults, tmp_path
):
  """The outputs of a trained run made twice: without faults, then with a transient fault on
  each kind of bucket operation (shard and metadata writes and reads, the proposals, report.md,
  metrics.json, the plot, the listings of the checkpoints and of an export folder). Every
  file is the same, byte for byte; a fault that persists on report.md is one StorageError."""
  from capture_jax import train  # pylint: disable=import-outside-toplevel
  from capture_jax.retrieval import evaluation  # pylint: disable=import-outside-toplevel

  cfg = trainer_config(tmp_path / 'data')
  cfg.train.num_steps = 2
  cfg.eval.update(shard_size=16, progress_bar=False)
  workdir = gs('outputs')
  train.run(cfg, workdir)
  _outputs(cfg, workdir, 'clean')
  clean = _snapshot(workdir)
  assert any(n.startswith('embeddings/') for n in clean), sorted(clean)
  # The evaluation's exports are made again under faults.
  fsspec.filesystem('gs').rm(f'{workdir}/embeddings', recursive=True)
  out = r'/upload/.*#name=faults/outputs/'
  faults.script(
      Fault('GET', OBJECTS + r'\?.*prefix=faults/outputs/checkpoints/', 'status', status=503),
      Fault('GET', OBJECTS + r'\?.*prefix=faults/outputs/embeddings/', 'reset'),
      Fault('POST', out + r'embeddings/.*/shard-', 'status', status=503),
      Fault('POST', out + r'embeddings/.*/metadata', 'lost'),
      Fault('GET', r'/o/faults/outputs/.*shard-.*alt=media', 'reset', nth=(2,)),
      Fault('GET', r'/o/faults/outputs/.*metadata\.json.*alt=media', 'status', status=500),
      Fault('POST', out + r'faulty/proposals/', 'reset'),
      Fault('POST', out + r'faulty/eval/report\.md', 'status', status=429),
      Fault('POST', out + r'faulty/eval/metrics\.json', 'status', status=500),
      Fault('POST', out + r'faulty/eval/metrics\.png', 'stall', stall_s=30.0),
  )
  _outputs(cfg, workdir, 'faulty')
  hits = [f.hits for f in faults.faults]
  faults.script()
  assert all(hits), (hits, faults.log[-30:])
  after = _snapshot(workdir)
  mine = {n: b for n, b in after.items() if not n.startswith('faulty/')}
  assert sorted(mine) == sorted(clean)
  assert [n for n in clean if mine[n] != clean[n]] == []
  faulty = {
      n.replace('faulty/', 'clean/', 1): b for n, b in after.items() if n.startswith('faulty/')
  }
  cleans = {n: b for n, b in clean.items() if n.startswith('clean/')}
  assert sorted(faulty) == sorted(cleans)
  differ = [n for n in cleans if faulty[n].replace(b'faulty', b'clean') != cleans[n]]
  assert differ == [], differ

  faults.script(Fault('POST', out + r'persist/eval/report\.md', 'status', nth=None, status=503))
  with pytest.raises(storage.StorageError, match=r'persist/eval/report\.md: writing failed'):
    evaluation.evaluate(cfg, workdir, 'dev', out_dir=f'{workdir}/persist/eval')


def test_reads_of_exports_and_metrics_name_the_object_and_never_read_as_absent(faults):
  """A fault that persists (403: not retried) on reading an export's metadata, its shards (is it
  there whole?) and metrics.jsonl (to resume) is a StorageError naming the object; a shard the
  bucket fails to serve is not read as missing (which would write it again)."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  from capture_jax.retrieval import export_format  # pylint: disable=import-outside-toplevel
  from capture_jax.retrieval import identity  # pylint: disable=import-outside-toplevel
  from capture_jax.training import metrics as metrics_lib  # pylint: disable=import-outside-toplevel

  out = gs('reads')
  shard = f'{out}/shard-00000-of-00001.npz'
  export_format.write_shard(shard, {'embeddings': np.zeros((2, 4), np.float32)})
  export_format.write_metadata(out, {'num_shards': 1})
  storage.write_text(f'{out}/metrics.jsonl', '{"step": 1}\n')
  faults.script(Fault('GET', r'/o/faults/reads/.*alt=media', 'status', nth=None, status=403))
  with pytest.raises(storage.StorageError, match=r'reads/metadata\.json: reading failed'):
    export_format.read_metadata(out)
  with pytest.raises(storage.StorageError, match=r'reads/metrics\.jsonl: reading failed'):
    metrics_lib.MetricWriter(storage.as_path(out), enabled=True, start_step=1)
  with pytest.raises(
      storage.StorageError, match=r'reads/shard-00000-of-00001\.npz: reading failed'
  ):
    export_format._read_shard(storage.as_path(shard), storage.as_path(out), 4)  # pylint: disable=protected-access
  faults.script(Fault('GET', OBJECTS + r'.*faults/reads/', 'status', nth=None, status=403))
  with pytest.raises(
      storage.StorageError, match=r'shard-00000-of-00001\.npz: reading the metadata'
  ):
    identity.shard_readable(shard)
  faults.script()
