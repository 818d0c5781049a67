"""`gs://` workdirs end to end, against a local GCS emulator (gcp-storage-emulator, a test
requirement) started on a free localhost port for this module.

The clients are pointed at it through their documented endpoint settings:
`STORAGE_EMULATOR_HOST` (gcsfs, which `etils.epath` uses for gs://) and
`TENSORSTORE_GCS_HTTP_URL` + `GOOGLE_AUTH_TOKEN_FOR_TESTING` (tensorstore,
which writes Orbax's arrays). Nothing in `capture_jax` knows it is an emulator.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from capture_jax import instances
from capture_jax import storage
from capture_jax import train
from capture_jax.retrieval import evaluation
from capture_jax.retrieval import exporting
from capture_jax.data import source as source_lib
from capture_jax.training import checkpoint as checkpoint_lib
from capture_jax.training import lock as lock_lib
from capture_jax.training import metrics as metrics_lib
from tests.helpers import start_python
from tests.helpers import trainer_config
from tests.helpers import write_config_module

# No GCE metadata server here: without this, google-auth and gcsfs wait for one (about 30 s)
# before using anonymous credentials. Read when google.auth is imported, so set on collection.
os.environ.setdefault('NO_GCE_CHECK', 'true')

REPO = Path(__file__).resolve().parents[1]
BUCKET = 'test-bucket'

pytestmark = pytest.mark.slow


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _send_generation_headers() -> None:
  """Makes the emulator send `x-goog-generation` with an object's bytes, as GCS does.

  gcp-storage-emulator leaves the header out; tensorstore (Orbax's array
  writer) reads the generation of what it downloads from it, and without it
  every OCDBT checkpoint write fails ('Malformed StorageGeneration'). This is
  a fidelity fix to the emulator, not a change to what our code sees from GCS.
  """
  from gcp_storage_emulator import server as emulator_server  # pylint: disable=import-outside-toplevel
  from gcp_storage_emulator.handlers import objects  # pylint: disable=import-outside-toplevel

  original = objects.download
  if getattr(original, 'sends_generation', False):
    return

  def download(request, response, storage_, *args, **kwargs):
    try:
      obj = storage_.get_file_obj(request.params['bucket_name'], request.params['object_id'])
      response['x-goog-generation'] = str(obj['generation'])
      response['x-goog-metageneration'] = str(obj['metageneration'])
    except Exception:  # pylint: disable=broad-except
      pass  # the original handler answers 404
    return original(request, response, storage_, *args, **kwargs)

  download.sends_generation = True
  objects.download = download  # `objects.get` calls it by name for ?alt=media
  for _, handlers in emulator_server.HANDLERS:
    for method, handler in list(handlers.items()):
      if handler is original:
        handlers[method] = download


def _honour_generation_preconditions() -> None:
  """Makes the emulator refuse an upload or a delete whose `ifGenerationMatch` is not the
  object's generation ('0': the object must be absent) with 412, as GCS does.

  gcp-storage-emulator ignores preconditions: without this, the lock's create-only and
  generation-conditional writes would pass untested. A fidelity fix to the emulator, like
  `_send_generation_headers`.
  """
  from http import HTTPStatus  # pylint: disable=import-outside-toplevel

  from gcp_storage_emulator import server as emulator_server  # pylint: disable=import-outside-toplevel
  from gcp_storage_emulator.exceptions import NotFound  # pylint: disable=import-outside-toplevel
  from gcp_storage_emulator.handlers import objects  # pylint: disable=import-outside-toplevel

  def guarded(original):
    if getattr(original, 'honours_preconditions', False):
      return original

    def handler(request, response, storage_, *args, **kwargs):
      wanted = request.query.get('ifGenerationMatch')
      if wanted:
        name = request.params.get('object_id') or request.query.get('name', [None])[0]
        if name is None:
          name = (request.data or {}).get('meta', {}).get('name')
        try:
          current = str(storage_.get_file_obj(request.params['bucket_name'], name)['generation'])
        except NotFound:
          current = '0'
        if current != wanted[0]:
          response.status = HTTPStatus.PRECONDITION_FAILED
          return None
      return original(request, response, storage_, *args, **kwargs)

    handler.honours_preconditions = True
    return handler

  for original in (objects.insert, objects.delete):
    replacement = guarded(original)
    for _, handlers in emulator_server.HANDLERS:
      for method, h in list(handlers.items()):
        if h is original:
          handlers[method] = replacement


@pytest.fixture(scope='module')
def gcs():
  """The emulator's environment (also set in os.environ for this module's tests and their
  subprocesses); skipped with the reason when the emulator cannot start."""
  try:
    from gcp_storage_emulator.server import create_server  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    pytest.skip(f'gcp-storage-emulator is not installed ({e}); it is in requirements-test.txt')
  _send_generation_headers()
  _honour_generation_preconditions()
  port = free_port()
  server = create_server('localhost', port, in_memory=True, default_bucket=BUCKET)
  try:
    server.start()
  except OSError as e:
    pytest.skip(f'the GCS emulator could not start on localhost:{port}: {e}')
  url = f'http://localhost:{port}'
  env = {
      'STORAGE_EMULATOR_HOST': url,
      'TENSORSTORE_GCS_HTTP_URL': url,
      'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',
      # gcsfs's bucket-type probe needs real credentials; the plain client is what the emulator
      # speaks.
      'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
  }
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    yield env
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    server.stop()


@pytest.fixture(scope='module')
def config(tmp_path_factory):
  cfg = trainer_config(tmp_path_factory.mktemp('data'))
  cfg.eval.update(shard_size=16, progress_bar=False)
  return cfg


def gs(name: str) -> str:
  return f'gs://{BUCKET}/{name}'


# --------------------------------------------------------------------------
# The storage primitives on GCS.


def test_whole_file_writes_listing_and_rename(gcs):
  root = storage.as_path(gs('primitives'))
  storage.write_text(root / 'a' / 'b.txt', 'hello')
  storage.write_bytes(root / 'c.bin', b'\x00\x01')
  assert (root / 'a' / 'b.txt').read_text() == 'hello'
  listing = storage.file_listing(root)
  assert set(listing) == {'a/b.txt', 'c.bin'}
  assert listing['a/b.txt']['bytes'] == 5
  storage.rename_tree(root / 'a', root / 'moved')
  assert not (root / 'a' / 'b.txt').exists()
  assert (root / 'moved' / 'b.txt').read_text() == 'hello'
  assert storage.file_listing(storage.as_path(gs('nothing-here'))) == {}


def test_append_file_uploads_whole_and_continues_after_reopening(gcs):
  path = storage.as_path(gs('append/metrics.jsonl'))
  log = storage.AppendFile(path, upload_every_s=3600)
  log.write('{"step": 1}\n')
  log.flush()  # the first flush uploads
  assert path.read_text() == '{"step": 1}\n'
  log.write('{"step": 2}\n')
  log.flush()  # within the upload interval: not uploaded yet
  assert path.read_text() == '{"step": 1}\n'
  log.flush(force=True)
  assert path.read_text().count('\n') == 2
  log.write('{"step": 3}\n')
  log.close()  # uploads what is left
  log = storage.AppendFile(path)
  log.write('{"step": 4}\n')
  log.close()
  assert [json.loads(l)['step'] for l in path.read_text().splitlines()] == [1, 2, 3, 4]
  assert metrics_lib.truncate_after(path, 2) == 2
  assert path.read_text().splitlines() == ['{"step": 1}', '{"step": 2}']


def test_append_file_first_flush_uploads_on_a_machine_booted_seconds_ago(gcs, monkeypatch):
  # `time.monotonic()` counts from the boot on Linux: a new TPU VM reads a few seconds. The first
  # flush must upload there too (it did not when "never uploaded" was written as 0.0).
  clock = [5.0]
  monkeypatch.setattr(storage, 'time', types.SimpleNamespace(monotonic=lambda: clock[0]))
  path = storage.as_path(gs('append-fresh-boot/metrics.jsonl'))
  log = storage.AppendFile(path, upload_every_s=10)
  log.write('{"step": 1}\n')
  log.flush()
  assert path.read_text() == '{"step": 1}\n'
  log.write('{"step": 2}\n')
  clock[0] = 9.0
  log.flush()  # 4 s after the upload: within the interval
  assert path.read_text() == '{"step": 1}\n'
  clock[0] = 15.0
  log.flush()  # 10 s after it: due
  assert path.read_text().count('\n') == 2


def test_missing_bucket_is_named_before_anything_compiles(gcs, config):
  with pytest.raises(storage.StorageError, match=r'gs://no-such-bucket/run: the bucket'):
    train.run(config, 'gs://no-such-bucket/run')
  with pytest.raises(storage.StorageError, match=r'gs://no-such-bucket/out'):
    exporting.export(config, 'unused', 'gallery', out='gs://no-such-bucket/out', random_init=True)


def test_commands_refuse_a_missing_bucket_with_one_line(gcs, config, tmp_path):
  config_file = write_config_module(tmp_path / 'config.py', config)
  for command in (['capture_jax.train'], ['capture_jax.instances', 'train']):
    proc = subprocess.run(
        [
            sys.executable,
            '-m',
            *command,
            f'--config={config_file}',
            '--workdir=gs://no-such-bucket/run',
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
    )
    assert proc.returncode == 1, proc.stderr
    assert 'error: gs://no-such-bucket/run: the bucket gs://no-such-bucket does not exist' in (
        proc.stderr
    )
    assert 'Traceback' not in proc.stderr and 'compiled' not in proc.stdout


def test_unreachable_storage_is_named_within_the_timeout(gcs):
  """An endpoint that accepts connections and never answers: the check gives up after
  $CAPTURE_STORAGE_TIMEOUT_S with the path, instead of hanging before the run."""
  silent = socket.socket()
  silent.bind(('localhost', 0))
  silent.listen(16)
  url = f'http://localhost:{silent.getsockname()[1]}'
  script = (
      'from capture_jax import storage\n'
      'try:\n'
      f'  storage.check_writable({gs("run")!r})\n'
      'except storage.StorageError as e:\n'
      '  print("refused:", e)\n'
  )
  env = {**os.environ, 'STORAGE_EMULATOR_HOST': url, 'CAPTURE_STORAGE_TIMEOUT_S': '3'}
  start = time.time()
  out = subprocess.run(
      [sys.executable, '-c', script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
  )
  silent.close()
  assert f'refused: {gs("run")}: no answer from Google Cloud Storage within 3 s' in out.stdout, (
      out.stdout + out.stderr
  )
  assert time.time() - start < 60


def test_inputs_in_a_bucket_are_refused_with_what_to_do(config):
  cfg = config.copy_and_resolve_references()
  cfg.data.tfds_dir = gs('tfds')
  with pytest.raises(ValueError, match=r'--config.data.tfds_dir=gs://.*gcsfuse'):
    source_lib.require_local_inputs(cfg)
  with pytest.raises(ValueError, match=r'data.tfds_dir=gs://'):
    train.run(cfg, gs('never'))
  profiled = config.copy_and_resolve_references()
  profiled.train.profile_start_step = 0
  with pytest.raises(ValueError, match=r'profiler trace is written .* to local disk'):
    train.run(profiled, gs('never'))


# --------------------------------------------------------------------------
# The lock in a bucket.


def test_lock_in_a_bucket_refuses_a_second_writer_and_takes_over_a_dead_one(gcs, capfd):
  folder = gs('locked')
  with lock_lib.FolderLock(folder, 'train.lock', 'trainer', enabled=True):
    with pytest.raises(
        lock_lib.LockedError, match=rf'in use by another trainer \(host .*, pid {os.getpid()}'
    ):
      lock_lib.FolderLock(folder, 'train.lock', 'trainer', enabled=True).acquire()
  assert not storage.as_path(folder + '/train.lock').exists()  # a clean exit deletes it

  lock_path = storage.as_path(folder + '/train.lock')
  # A holder on another host whose heartbeat stopped long ago (a preempted VM).
  stale = {
      'host': 'other-vm',
      'pid': 1,
      'started': 0,
      'heartbeat': time.time() - 3600,
      'token': 'x',
  }
  storage.write_text(lock_path, json.dumps(stale))
  with lock_lib.FolderLock(folder, 'train.lock', 'trainer', enabled=True):
    assert json.loads(lock_path.read_text())['pid'] == os.getpid()
  assert re.search(r'whose last heartbeat is 36\d\d s old', capfd.readouterr().out)
  # A live holder on another host is respected.
  live = {**stale, 'heartbeat': time.time()}
  storage.write_text(lock_path, json.dumps(live))
  with pytest.raises(lock_lib.LockedError, match=r'host other-vm, pid 1'):
    lock_lib.FolderLock(folder, 'train.lock', 'trainer', enabled=True).acquire()
  # A process of this host that is gone.
  dead = {**live, 'host': socket.gethostname(), 'pid': 2**22 + 12345}
  storage.write_text(lock_path, json.dumps(dead))
  with lock_lib.FolderLock(folder, 'train.lock', 'trainer', enabled=True):
    pass
  assert 'that is no longer running' in capfd.readouterr().out


class _TakerThatPauses(lock_lib.FolderLock):
  """A taker of a stale lock that, between reading it and writing its own, lets `meanwhile` run:
  the interleaving of two commands taking over one stale lock at once."""

  meanwhile = None

  def _note_takeover(self, previous, why='that is no longer running'):
    super()._note_takeover(previous, why)
    if self.meanwhile is not None:
      self.meanwhile()


def test_two_takers_of_a_stale_lock_cannot_both_hold_it(gcs):
  """The second writer's replacement is conditional on the generation it read, so only one of
  two commands taking over one stale lock at once proceeds (the read-back alone let both)."""
  folder = gs('race')
  lock_path = storage.as_path(folder + '/train.lock')
  stale = {'host': 'other-vm', 'pid': 1, 'started': 0, 'heartbeat': 0.0, 'token': 'x'}
  storage.write_text(lock_path, json.dumps(stale))
  first = lock_lib.FolderLock(folder, 'train.lock', 'trainer', enabled=True)
  slow = _TakerThatPauses(folder, 'train.lock', 'trainer', enabled=True)
  slow.meanwhile = first.acquire  # `first` takes the lock after `slow` read the stale one
  with pytest.raises(lock_lib.LockedError, match=rf'in use by another trainer \(host .*, pid'):
    slow.acquire()
  assert json.loads(lock_path.read_text())['token'] == first._token  # pylint: disable=protected-access
  first.release()
  assert not lock_path.exists()


def test_a_release_never_deletes_a_lock_taken_over_meanwhile(gcs):
  folder = gs('release')
  lock_path = storage.as_path(folder + '/x.lock')
  lock = lock_lib.FolderLock(folder, 'x.lock', 'export', enabled=True)
  lock.acquire()
  # Another command replaces it with the same token (the check by token cannot tell): only the
  # generation can.
  holder = json.loads(lock_path.read_text())
  storage.write_text(lock_path, json.dumps({**holder, 'pid': 1}))
  lock.release()
  assert json.loads(lock_path.read_text())['pid'] == 1


def test_heartbeat_refreshes_the_lock(gcs):
  folder = gs('heartbeat')
  lock = lock_lib.FolderLock(folder, 'x.lock', 'export', enabled=True, heartbeat_s=0.2)
  with lock:
    first = json.loads(storage.as_path(folder + '/x.lock').read_text())['heartbeat']
    time.sleep(1.0)
    later = json.loads(storage.as_path(folder + '/x.lock').read_text())['heartbeat']
  assert later > first


# --------------------------------------------------------------------------
# Train, SIGTERM, resume, export, evaluate: all in the bucket.


def finalized_steps(workdir: str) -> list[int]:
  folder = checkpoint_lib.checkpoint_dir(workdir)
  if not folder.exists():
    return []
  return sorted(
      int(p.name)
      for p in folder.iterdir()
      if p.name.isdigit() and (p / 'commit_success.txt').exists()
  )


def test_train_sigterm_resume_export_evaluate_in_a_bucket(gcs, config, tmp_path):
  workdir = gs('run')
  config = config.copy_and_resolve_references()
  config.train.num_steps = 10  # 1 s per step below: room for the SIGTERM to land mid-run
  # The reference: the same run, uninterrupted, on local disk.
  straight = train.run(config, tmp_path / 'straight')

  # 1. Train in the bucket; SIGTERM once a checkpoint is there (steps slowed so it lands mid-run).
  (tmp_path / 'config.json').write_text(config.to_json())
  script = textwrap.dedent(f"""
      import json, sys, time, ml_collections
      from capture_jax import train
      from capture_jax.training import sharding
      slow = sharding.global_batch_from_local
      sharding.global_batch_from_local = lambda *a: (time.sleep(1.0), slow(*a))[1]
      cfg = ml_collections.ConfigDict(json.load(open({str(tmp_path / 'config.json')!r})))
      r = train.run(cfg, {workdir!r})
      sys.exit(0 if r.preempted else 3)
  """)
  proc = start_python(script)
  deadline = time.time() + 300
  while time.time() < deadline and not finalized_steps(workdir) and proc.poll() is None:
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out
  assert 'Run the same command again to resume' in out, out
  stopped = max(finalized_steps(workdir))
  assert 2 <= stopped < config.train.num_steps, out

  # 2. Resume from the bucket: the parameters of the uninterrupted run, bitwise.
  resumed = train.run(config, workdir)
  assert int(resumed.state.step) == config.train.num_steps
  for a, b in zip(jax.tree.leaves(straight.state.params), jax.tree.leaves(resumed.state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  root = storage.as_path(workdir)
  rows = [json.loads(l) for l in (root / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows] == list(range(1, config.train.num_steps + 1))
  events = [n for n in storage.file_listing(root / 'tensorboard') if 'tfevents' in n]
  assert len(events) == 2  # one file per run, each uploaded whole
  last = checkpoint_lib.checkpoint_dir(workdir) / str(config.train.num_steps)
  manifest = json.loads((last / checkpoint_lib.CHECKSUMS_FILE).read_text())['files']
  assert manifest and all('crc32c' in v for v in manifest.values()), manifest
  assert checkpoint_lib.checksum_problems(last) == []
  # The same step copied to local disk is verified against the bucket's CRC32C.
  local = tmp_path / 'copied'
  for name, path in storage.iter_files(last):
    (local / name).parent.mkdir(parents=True, exist_ok=True)
    (local / name).write_bytes(path.read_bytes())
  assert checkpoint_lib.checksum_problems(storage.as_path(local)) == []
  victim = local / 'state' / '_sharding'
  victim.write_bytes(victim.read_bytes()[::-1])
  assert checkpoint_lib.checksum_problems(storage.as_path(local)) == [
      f'state/_sharding: checksum differs from {checkpoint_lib.CHECKSUMS_FILE}'
  ]
  assert not (root / lock_lib.TRAIN_LOCK_FILE).exists()

  # 3. Train the instance proposer into the bucket (and the same one locally).
  cfg = config.copy_and_resolve_references()
  cfg.instances.update(
      hidden_size=16,
      num_layers=1,
      num_heads=2,
      batch_size=4,
      num_steps=4,
      warmup_steps=1,
      checkpoint_every=2,
  )
  cfg.eval.update(baselines=False, instances='learned')
  assert instances.train(cfg, workdir).step == 4
  assert instances.train(cfg, tmp_path / 'straight').step == 4
  assert instances.latest_proposer_step(workdir) == 4
  assert not (root / 'instances' / lock_lib.TRAIN_LOCK_FILE).exists()

  # 4. Export a split into the bucket; a second call reuses it.
  result = exporting.export(cfg, workdir, 'gallery')
  assert str(result.out_dir).startswith(workdir)
  assert len(result.written) == result.metadata['num_shards']
  assert exporting.export(cfg, workdir, 'gallery').reused

  # 5. Evaluate with the learned proposals; the report is read back from the bucket and equals
  # a local evaluation of the local uninterrupted run.
  remote = evaluation.evaluate(cfg, workdir, 'dev')
  out_dir = root / 'eval_dev'
  assert remote.out_dir == out_dir
  report = (out_dir / 'report.md').read_text()
  assert 'Official Product1M metrics' in report and 'learned proposals' in report
  saved = json.loads((out_dir / 'metrics.json').read_text())
  assert saved == json.loads(json.dumps(remote.metrics))
  assert (out_dir / 'metrics.png').read_bytes()[:4] == b'\x89PNG'
  assert (out_dir / 'retrieval_id_list.txt').read_text().count('\n') > 0
  local = evaluation.evaluate(cfg, tmp_path / 'straight', 'dev')
  assert local.metrics == remote.metrics

  # 6. A checkpoint object replaced in the bucket (same size, other bytes: GCS's CRC32C differs)
  # is moved aside and the run resumes from the previous step, to the same parameters.
  state_files = {
      n: e for n, e in storage.file_listing(last).items() if n.startswith('state/') and e['bytes']
  }
  victim = max(state_files, key=lambda n: state_files[n]['bytes'])
  data = bytearray((last / victim).read_bytes())
  data[len(data) // 2] ^= 0xFF
  storage.write_bytes(last / victim, bytes(data))
  again = train.run(config, workdir)
  assert int(again.state.step) == config.train.num_steps
  for a, b in zip(jax.tree.leaves(straight.state.params), jax.tree.leaves(again.state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  moved = checkpoint_lib.corrupt_checkpoints(workdir)
  assert [p.name.split('-')[1] for p in moved] == [str(config.train.num_steps)]
  assert victim in storage.file_listing(moved[0])  # kept for inspection
