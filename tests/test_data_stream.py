"""The streaming product1m build: past TFDS's in-memory limit without TensorFlow, bounded memory,
identical at every worker count and on Beam, safe to kill and rerun, one build per folder."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from capture_jax.data import formats
from capture_jax.data import product1m_stream
from capture_jax.data import product1m_tfds
from capture_jax.data import source as source_lib
from capture_jax.data import synthetic
from capture_jax.data import tokenizer as tokenizer_lib
from capture_jax.training import lock as lock_lib
from tests import helpers
from tests.helpers import run_module

REPO = Path(__file__).resolve().parents[1]
TINY = synthetic.PRESETS['tiny']
BUILD = 'capture_jax.data.product1m_tfds'  # the dataset build command


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  """A tiny world with one npz per image."""
  root = str(tmp_path_factory.mktemp('world'))
  synthetic.generate(root, 'tiny', feature_format='npz', progress=False)
  return root


@pytest.fixture(scope='module')
def reference(world, tmp_path_factory):
  """The tiny world built by one process, several shards per split."""
  out = str(tmp_path_factory.mktemp('ref'))
  report = _build(world, out)
  return out, report


def _build(data, out, **kwargs):
  kwargs.setdefault('examples_per_shard', 7)
  return helpers.build_dataset(
      data,
      out,
      max_regions=TINY.max_regions,
      feature_dim=TINY.feature_dim,
      progress=False,
      **kwargs,
  )


def _records(out: str) -> dict[str, list[dict]]:
  """Every split's decoded records, in order, through the project's source."""
  splits = tfds.data_source('product1m/float16', data_dir=out)
  return {
      s: list(source_lib.Product1MSource(out, s).read_records(range(len(splits[s]))))
      for s in splits
  }


def _assert_same_dataset(a: str, b: str) -> None:
  ra, rb = _records(a), _records(b)
  assert ra.keys() == rb.keys()
  for split in ra:
    assert [r['item_id'] for r in ra[split]] == [r['item_id'] for r in rb[split]]
    for x, y in zip(ra[split], rb[split]):
      assert source_lib._records_equal(x, y), (split, x['item_id'])
  ia = tfds.builder_from_directory(product1m_tfds.dataset_dir(a)).info
  ib = tfds.builder_from_directory(product1m_tfds.dataset_dir(b)).info
  for split in ra:
    assert ia.splits[split].shard_lengths == ib.splits[split].shard_lengths


def _write_train(root: str, n: int) -> str:
  """A train annotation file of `n` items (features: `generated:`)."""
  os.makedirs(root, exist_ok=True)
  path = os.path.join(root, formats.annotation_filename('train'))
  formats.write_annotations(
      path, (formats.Annotation(f'item{i:07d}', f'title {i} 面霜', 'u', 'v') for i in range(n))
  )
  return root


# ----------------------------------------------------------------------------
# 1. Streaming: past TFDS's in-memory limit, without TensorFlow, memory bounded.


def test_crosses_tfds_memory_limit_without_tensorflow(world, tmp_path, monkeypatch):
  """With the shuffler's limit lowered to 1 kB, TFDS's own build needs TensorFlow; ours does not."""
  if importlib.util.find_spec('tensorflow') is not None:
    pytest.skip('TensorFlow is installed here; this checks the build without it')
  from tensorflow_datasets.core import shuffle  # pylint: disable=import-outside-toplevel

  monkeypatch.setattr(shuffle, 'MAX_MEM_BUFFER_SIZE', 1000)
  old = product1m_tfds.Product1M(
      source_dir=world,
      vocab_file=helpers.build_vocab(),
      max_regions=8,
      data_dir=str(tmp_path / 'old'),
      config='float16',
  )
  tfds.display_progress_bar(False)
  with pytest.raises(ModuleNotFoundError, match='tensorflow'):  # the path that crashes at 1 GB
    old.download_and_prepare()
  report = _build(world, str(tmp_path / 'new'), examples_per_shard=2048)
  n_train = sum(
      1 for _ in formats.read_annotations(os.path.join(world, 'product1m_train_ossurl_v2.txt'))
  )
  assert report['splits']['train']['examples'] == n_train
  src = source_lib.Product1MSource(str(tmp_path / 'new'), 'train')
  assert len(src) == n_train and src._use_fast


def _peak_rss_of_build(data: str, out: str) -> tuple[int, dict]:
  # VmHWM, not getrusage's ru_maxrss: a child's ru_maxrss starts at its parent's RSS at the
  # fork (Linux records the forked copy's high-water mark at exec), and pytest's RSS is above
  # the build's, so ru_maxrss would report pytest's at both sizes.
  code = (
      'import json, re, sys\n'
      'from capture_jax.data import product1m_tfds\n'
      'r = product1m_tfds.build(sys.argv[1], sys.argv[2], vocab_file=sys.argv[3], features="generated:36x512",\n'
      '    max_regions=36, progress=False, examples_per_shard=500)\n'
      'kb = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))\n'
      'print(json.dumps([kb, r]))\n'
  )
  proc = subprocess.run(
      [sys.executable, '-c', code, data, out, helpers.build_vocab()],
      capture_output=True,
      text=True,
      env={**os.environ, 'PYTHONPATH': str(REPO)},
      timeout=600,
      check=True,
  )
  rss_kb, report = json.loads(proc.stdout.strip().splitlines()[-1])
  return rss_kb * 1024, report


@pytest.mark.slow
def test_peak_rss_does_not_grow_with_the_split(tmp_path):
  """4,000 examples (~80 MB of shards) cost no more memory than 400 (~8 MB)."""
  small, small_report = _peak_rss_of_build(
      _write_train(str(tmp_path / 's'), 400), str(tmp_path / 'so')
  )
  big, big_report = _peak_rss_of_build(
      _write_train(str(tmp_path / 'b'), 4000), str(tmp_path / 'bo')
  )
  assert big_report['splits']['train']['examples'] == 4000
  assert small_report['splits']['train']['examples'] == 400
  written = sum(
      f.stat().st_size
      for f in Path(big_report['dataset_dir']).glob('product1m-train.array_record*')
  )
  assert written > 60 << 20  # the big split is far larger than the allowed growth
  print(f'peak RSS: {small >> 20} MiB at 400 examples, {big >> 20} MiB at 4,000')
  assert big - small < 40 << 20, (small, big, written)


# ----------------------------------------------------------------------------
# 3. Workers: N=1 and N=3 give the same dataset.


def test_three_workers_give_the_same_dataset(world, reference, tmp_path):
  ref, ref_report = reference
  assert ref_report['shards']['train'] > 3  # several shards per split, so workers share a split
  report = _build(world, str(tmp_path / 'n3'), num_workers=3)
  assert report['splits'] == ref_report['splits'] and report['engine'] == 'processes'
  _assert_same_dataset(ref, str(tmp_path / 'n3'))


def test_bad_input_at_three_workers_names_the_earliest_sample(world, tmp_path):
  data = str(tmp_path / 'data')
  shutil.copytree(world, data)
  gallery = [
      a.item_id
      for _, a in formats.read_annotations(os.path.join(data, 'product1m_gallery_ossurl_v2.txt'))
  ]
  for k in (3, 30):  # two bad samples in two shards (7 a shard), the earliest must be named
    os.remove(os.path.join(data, 'features', f'{gallery[k]}.npz'))
  messages = []
  for n in (1, 3):
    with pytest.raises(formats.BadInputError) as err:
      _build(data, str(tmp_path / f'out{n}'), num_workers=n)
    messages.append(str(err.value))
    config_dir = os.path.dirname(product1m_tfds.dataset_dir(str(tmp_path / f'out{n}')))
    assert not os.path.isdir(config_dir) or not os.listdir(config_dir)  # nothing left
  assert messages[0] == messages[1] and f'image {gallery[3]} has no region features' in messages[0]
  assert messages[0].startswith(os.path.join(data, 'product1m_gallery_ossurl_v2.txt') + ':4:')
  r1 = _build(data, str(tmp_path / 'skip1'), skip_bad=True)
  r3 = _build(data, str(tmp_path / 'skip3'), skip_bad=True, num_workers=3)
  assert r1['splits'] == r3['splits'] and r3['splits']['gallery']['by_kind'] == {
      'missing_features': 2
  }
  _assert_same_dataset(str(tmp_path / 'skip1'), str(tmp_path / 'skip3'))


# ----------------------------------------------------------------------------
# 2. Killed and rerun; a shard that does not read back; two builds in one folder.


@pytest.mark.slow
def test_killed_build_never_looks_complete_and_a_rerun_resumes(world, reference, tmp_path, capsys):
  data = _write_train(str(tmp_path / 'data'), 3000)
  out = str(tmp_path / 'out')
  code = (
      'import sys\n'
      'from capture_jax.data import product1m_tfds\n'
      'product1m_tfds.build(sys.argv[1], sys.argv[2], vocab_file=sys.argv[3], features="generated:36x256", max_regions=36,\n'
      '    progress=False, examples_per_shard=100, num_workers=2)\n'
  )
  proc = subprocess.Popen(
      [sys.executable, '-c', code, data, out, helpers.build_vocab()],
      env={**os.environ, 'PYTHONPATH': str(REPO)},
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
  )
  final = product1m_tfds.dataset_dir(out)
  work = Path(final + product1m_stream.INCOMPLETE_SUFFIX, product1m_stream.WORK_DIR)
  deadline = time.time() + 300
  while len(list(work.glob('*.done.json'))) < 4:
    assert proc.poll() is None and time.time() < deadline, 'the build ended before it was killed'
    time.sleep(0.1)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  time.sleep(1.0)  # its workers die with it (PR_SET_PDEATHSIG)
  assert not os.path.exists(final)  # nothing looks complete
  done = sorted(work.glob('*.done.json'))
  time.sleep(1.0)
  assert sorted(work.glob('*.done.json')) == done  # no orphaned worker goes on writing
  assert 4 <= len(done) < 30
  # Damage one finished shard: the rerun must notice it does not read back.
  shard = work.parent / done[0].name[: -len('.done.json')]
  shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
  capsys.readouterr()
  kwargs = dict(features='generated:36x256', max_regions=36, progress=False, examples_per_shard=100)
  report = helpers.build_dataset(data, out, **kwargs)
  printed = capsys.readouterr().out
  assert 'resuming the interrupted build' in printed and f'rewriting {shard.name}' in printed
  assert len(done) - 1 <= report['resumed_shards'] < 30
  assert not os.path.exists(work.parent)
  fresh = str(tmp_path / 'fresh')
  helpers.build_dataset(data, fresh, **kwargs)
  _assert_same_dataset(out, fresh)


def test_a_second_build_into_the_same_folder_is_refused(world, tmp_path):
  out = str(tmp_path / 'out')
  with lock_lib.FolderLock(
      os.path.join(out, product1m_tfds.NAME), product1m_stream.lock_name('float16'), 'x', True
  ):
    with pytest.raises(lock_lib.LockedError, match=f'pid {os.getpid()}'):
      _build(world, out)
    # The command, another process: one `error:` line, exit status 1.
    proc = run_module(
        BUILD,
        '--data_dir',
        world,
        '--out',
        out,
        '--max_regions',
        8,
        '--vocab',
        helpers.build_vocab(),
    )
    assert proc.returncode == 1, proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith('error: ') and 'in use by another product1m build' in err
  _build(world, out)  # free again once the first one is gone
  assert os.path.isdir(product1m_tfds.dataset_dir(out))


def test_a_finished_dataset_is_reused_and_overwrite_rebuilds(world, reference, tmp_path):
  out = str(tmp_path / 'out')
  _build(world, out)
  again = _build(world, out)
  assert again['splits'] == {} and again['empty_splits'] == {}
  rebuilt = _build(world, out, overwrite=True, examples_per_shard=1000)
  assert rebuilt['shards']['train'] == 1
  assert _records(out)['dev'][0]['item_id'] == _records(reference[0])['dev'][0]['item_id']


def test_other_settings_start_over_instead_of_resuming(world, tmp_path, capsys):
  out = str(tmp_path / 'out')
  work = product1m_tfds.dataset_dir(out) + product1m_stream.INCOMPLETE_SUFFIX
  os.makedirs(os.path.join(work, product1m_stream.WORK_DIR))
  Path(work, product1m_stream.WORK_DIR, 'plan.json').write_text('{"plan": "other"}')
  Path(work, 'product1m-train.array_record-00000-of-00001').write_bytes(b'stale')
  _build(world, out)
  assert 'starting over' in capsys.readouterr().out
  assert not os.path.exists(work)
  assert len(_records(out)['train']) == TINY.num_train


# ----------------------------------------------------------------------------
# 4. Apache Beam (DirectRunner): the same dataset, the same refusals.


def test_the_vocab_by_content_is_part_of_the_plan(tmp_path):
  """Another vocab changes every shard's token ids: an interrupted build of it is not resumed."""
  ann = {
      'train': _write_train(str(tmp_path / 'data'), 3) + '/' + formats.annotation_filename('train')
  }
  other = str(tmp_path / 'other.txt')
  tokenizer_lib.train_vocab(['other words 其他'], 30, other, min_frequency=1)
  same = str(tmp_path / 'same.txt')
  shutil.copy(helpers.build_vocab(), same)

  def plan(vocab):
    spec = product1m_stream.Spec('out', 'generated:4x8', 'float16', 4, 8, False, False, vocab)
    return product1m_stream.fingerprint(spec, ann, 7)

  assert plan(helpers.build_vocab()) == plan(same) != plan(other)


def test_beam_direct_runner_gives_the_same_dataset(world, reference, tmp_path):
  import apache_beam  # noqa: F401  (make test installs it: requirements-test.txt)

  ref, ref_report = reference
  options = [
      '--runner=DirectRunner',
      '--direct_num_workers=2',
      '--direct_running_mode=multi_processing',
  ]
  report = _build(world, str(tmp_path / 'beam'), beam_options=options)
  assert report['splits'] == ref_report['splits'] and report['engine'] == 'beam'
  _assert_same_dataset(ref, str(tmp_path / 'beam'))
  # Bad input: the same one-line error naming the annotation line, nothing left behind.
  data = str(tmp_path / 'data')
  shutil.copytree(world, data)
  dev = [
      a.item_id
      for _, a in formats.read_annotations(os.path.join(data, 'product1m_dev_ossurl_v2.txt'))
  ]
  os.remove(os.path.join(data, 'features', f'{dev[2]}.npz'))
  out = str(tmp_path / 'bad')
  with pytest.raises(
      formats.BadInputError, match=rf'product1m_dev_ossurl_v2.txt:3: image {dev[2]} '
  ):
    _build(data, out, beam_options=['--runner=DirectRunner'])
  config_dir = os.path.dirname(product1m_tfds.dataset_dir(out))
  assert not os.path.isdir(config_dir) or not os.listdir(config_dir)
  skipped = _build(
      data, str(tmp_path / 'skip'), skip_bad=True, beam_options=['--runner=DirectRunner']
  )
  assert skipped['splits']['dev']['by_kind'] == {'missing_features': 1}


def test_cli_workers_and_beam_options(world, reference, tmp_path):
  out = str(tmp_path / 'out')
  argv = ['--data_dir', world, '--out', out, '--max_regions', '8', '--examples_per_shard', '7']
  argv += ['--vocab', helpers.build_vocab()]
  proc = run_module(BUILD, *argv, '--num_workers', 2)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip().splitlines()[-1] == product1m_tfds.dataset_dir(out)
  _assert_same_dataset(reference[0], out)
  assert product1m_tfds._beam_options('runner=DirectRunner, --direct_num_workers=2') == [
      '--runner=DirectRunner',
      '--direct_num_workers=2',
  ]
  proc = run_module(BUILD, *argv, '--num_workers', 0, '--overwrite')
  assert proc.returncode == 1 and 'error: num_workers must be at least 1' in proc.stderr
