"""The product1m build from and to a bucket (`gs://`), against the GCS emulator of
tests/test_storage_gcs.py: Beam's DirectRunner gives the dataset a local build gives, a build
killed mid-way resumes to a correct dataset, a second build into the folder is refused, bad input
is refused or skipped as on disk."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from capture_jax import storage
from capture_jax.data import formats
from capture_jax.data import product1m_stream
from capture_jax.data import product1m_tfds
from capture_jax.data import synthetic
from capture_jax.training import lock as lock_lib
from tests import helpers
from tests.test_data_stream import _assert_same_dataset
from tests.test_data_stream import _build
from tests.test_data_stream import _write_train
from tests.test_storage_gcs import gcs  # noqa: F401  (the emulator fixture)
from tests.test_storage_gcs import gs

REPO = Path(__file__).resolve().parents[1]
BEAM = ['--runner=DirectRunner', '--direct_num_workers=2', '--direct_running_mode=multi_processing']

pytestmark = pytest.mark.slow


def _fs():
  import fsspec  # pylint: disable=import-outside-toplevel

  return fsspec.filesystem('gs')


def _upload(local: str, remote: str) -> str:
  _fs().put(local.rstrip('/') + '/', remote, recursive=True)
  return remote


def _download(remote: str, local: str) -> str:
  """The dataset folders under the TFDS dir `remote`, copied to `local` (the project's reader
  opens local files)."""
  _fs().get(remote.rstrip('/') + '/', local, recursive=True)
  return local


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  """A tiny world with its features in TSVs, one per split (the index is made per file)."""
  root = str(tmp_path_factory.mktemp('world'))
  synthetic.generate(root, 'tiny', feature_format='tsv', progress=False)
  assert len(formats.feature_files(os.path.join(root, 'features'))[0]) > 1
  return root


def test_beam_from_a_bucket_to_a_bucket_gives_the_local_dataset(gcs, world, tmp_path):
  ref = str(tmp_path / 'ref')
  ref_report = _build(world, ref)
  data = _upload(world, gs('world'))
  vocab = gs('vocab.txt')
  _fs().put(helpers.build_vocab(), vocab)
  out = gs('tfds-beam')
  report = _build(data, out, vocab_file=vocab, beam_options=BEAM)
  assert report['splits'] == ref_report['splits'] and report['engine'] == 'beam'
  final = product1m_tfds.dataset_dir(out)
  assert report['dataset_dir'] == final
  assert not storage.exists(final + product1m_stream.INCOMPLETE_SUFFIX)
  assert not storage.exists(os.path.join(final, product1m_stream.WORK_DIR))
  _assert_same_dataset(ref, _download(out, str(tmp_path / 'copy')))
  # Run again: the finished dataset in the bucket is found and reused.
  again = _build(data, out, vocab_file=vocab, beam_options=BEAM)
  assert again['splits'] == {}
  # The same from the workers of one host (the TSV index in 2 processes).
  out2 = gs('tfds-workers')
  _build(data, out2, vocab_file=vocab, num_workers=2)
  _assert_same_dataset(ref, _download(out2, str(tmp_path / 'copy2')))


def test_bad_input_in_a_bucket_is_refused_or_skipped_as_on_disk(gcs, world, tmp_path):
  """A dev image without features: found by a Beam worker, refused naming the annotation line."""
  data = str(tmp_path / 'data')
  dev = formats.annotation_filename('dev')
  os.makedirs(os.path.join(data, 'features'))
  Path(data, dev).write_bytes(Path(world, dev).read_bytes())
  missing = [a.item_id for _, a in formats.read_annotations(os.path.join(data, dev))][2]
  for tsv in formats.feature_files(os.path.join(world, 'features'))[0]:
    rows = Path(tsv).read_bytes().splitlines(keepends=True)
    kept = [r for r in rows if not r.startswith(missing.encode() + b'\t')]
    Path(data, 'features', os.path.basename(tsv)).write_bytes(b''.join(kept))
  remote = _upload(data, gs('bad-world'))
  out = gs('tfds-bad')
  with pytest.raises(formats.BadInputError, match=rf'{remote}/{dev}:3: image {missing} '):
    _build(remote, out, beam_options=['--runner=DirectRunner'])
  assert storage.file_listing(os.path.dirname(product1m_tfds.dataset_dir(out))) == {}
  skipped = _build(remote, out, skip_bad=True, beam_options=['--runner=DirectRunner'])
  local = _build(data, str(tmp_path / 'skip'), skip_bad=True)
  assert skipped['splits'] == local['splits']
  assert skipped['splits']['dev']['by_kind'] == {'missing_features': 1}
  # --overwrite rebuilds the dataset in the bucket.
  rebuilt = _build(remote, out, skip_bad=True, overwrite=True)
  assert rebuilt['splits'] == local['splits'] and rebuilt['resumed_shards'] == 0


def test_a_shard_upload_is_create_only_and_retry_safe(gcs, tmp_path):
  local = tmp_path / 'shard'
  local.write_bytes(b'the checked shard')
  target = gs('uploads/shard')
  fs = _fs()
  crc = storage.upload_once(local, target)
  assert fs.info(target)['crc32c'] == crc
  # The emulator enforces the precondition (else what follows proves nothing).
  with pytest.raises(FileExistsError):
    fs.put_file(str(local), target, mode='create')
  generation = fs.info(target)['generation']
  # A retry after a lost answer (the object holds these bytes): kept, not a conflict.
  assert storage.upload_once(local, target) == crc and fs.info(target)['generation'] == generation
  # A leftover of a killed build (other bytes, no marker): replaced.
  fs.pipe_file(target, b'half a shard')
  storage.upload_once(local, target)
  assert fs.cat_file(target) == b'the checked shard'


def test_killed_build_in_a_bucket_resumes_and_a_second_one_is_refused(gcs, tmp_path, capsys):
  data = _upload(_write_train(str(tmp_path / 'data'), 3000), gs('killed-data'))
  out = gs('tfds-killed')
  vocab = helpers.build_vocab()
  code = (
      'import sys\n'
      'from capture_jax.data import product1m_tfds\n'
      'product1m_tfds.build(sys.argv[1], sys.argv[2], vocab_file=sys.argv[3],\n'
      '    features="generated:36x256", max_regions=36, progress=False,\n'
      '    examples_per_shard=100, num_workers=2)\n'
  )
  proc = subprocess.Popen(
      [sys.executable, '-c', code, data, out, vocab],
      env={**os.environ, 'PYTHONPATH': str(REPO)},
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
  )
  final = product1m_tfds.dataset_dir(out)
  work = os.path.join(final + product1m_stream.INCOMPLETE_SUFFIX, product1m_stream.WORK_DIR)
  deadline = time.time() + 300
  while len([n for n in storage.file_listing(work) if n.endswith('.done.json')]) < 4:
    assert proc.poll() is None and time.time() < deadline, 'the build ended before it was killed'
    time.sleep(0.2)
  # While it runs, a second build into the same folder is refused, naming the first.
  with pytest.raises(
      lock_lib.LockedError, match=rf'in use by another product1m build .*pid {proc.pid}'
  ):
    helpers.build_dataset(data, out, features='generated:36x256', progress=False)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  time.sleep(1.0)  # its workers die with it (PR_SET_PDEATHSIG)
  assert not storage.exists(os.path.join(final, product1m_stream.INFO_FILE))
  done = [n for n in storage.file_listing(work) if n.endswith('.done.json')]
  assert 4 <= len(done) < 30
  # Damage one finished shard: the rerun must notice it is not the object its marker describes.
  shard = os.path.join(os.path.dirname(work), done[0][: -len('.done.json')])
  storage.write_bytes(shard, storage.read_bytes(shard)[:100])
  capsys.readouterr()
  kwargs = dict(features='generated:36x256', max_regions=36, progress=False, examples_per_shard=100)
  # The killed build's lock is held by a dead process of this host: taken over with a note.
  report = helpers.build_dataset(data, out, vocab_file=vocab, **kwargs)
  printed = capsys.readouterr().out
  assert 'resuming the interrupted build' in printed
  assert f'rewriting {os.path.basename(shard)}' in printed
  assert len(done) - 1 <= report['resumed_shards'] < 30
  assert not storage.exists(final + product1m_stream.INCOMPLETE_SUFFIX)
  fresh = str(tmp_path / 'fresh')
  helpers.build_dataset(str(tmp_path / 'data'), fresh, vocab_file=vocab, **kwargs)
  _assert_same_dataset(fresh, _download(out, str(tmp_path / 'copy')))


def test_a_dataset_in_a_bucket_is_refused_for_training_with_the_measured_reason():
  import ml_collections  # pylint: disable=import-outside-toplevel

  from capture_jax.data import source as source_lib  # pylint: disable=import-outside-toplevel

  config = ml_collections.ConfigDict({'data': {'tfds_dir': gs('tfds'), 'data_dir': ''}})
  with pytest.raises(ValueError, match=r'gcsfuse.*Why not read in place: .* request of its own'):
    source_lib.require_local_inputs(config)
