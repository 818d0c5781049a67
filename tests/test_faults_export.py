"""Fault injection into export and evaluation: data changed under an export, truncated shards and
leftover temporary files, non-finite embeddings, exports of two runs, two exports into one folder.

One tiny run (2 steps) serves the module; each test works on copies of what it changes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from capture_jax import train
from capture_jax.data import eval_input
from capture_jax.data import product1m_tfds
from capture_jax.data import source as source_lib
from capture_jax.retrieval import embedding as embedding_lib
from capture_jax.retrieval import evaluation
from capture_jax.retrieval import export_format
from capture_jax.retrieval import exporting
from capture_jax.retrieval import identity as identity_lib
from capture_jax.retrieval import writer
from capture_jax.training import checkpoint as checkpoint_lib
from capture_jax.training import lock as lock_lib
from capture_jax.training import sharding
from tests.test_faults_train import flip_a_byte
from tests.test_faults_train import largest_file
from tests.test_train import trainer_config


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """(config, workdir): the tiny model trained for 2 steps; shards of 16 rows (gallery: 4)."""
  cfg = trainer_config(tmp_path_factory.mktemp('data'))
  cfg.train.num_steps = 2
  cfg.eval.update(shard_size=16, progress_bar=False, baselines=False, query_mode='whole')
  workdir = tmp_path_factory.mktemp('run')
  train.run(cfg, workdir)
  return cfg, workdir


def with_data_copy(cfg, root: Path):
  """The config on a copy of the built dataset (modification times kept, as a move keeps them)."""
  cfg = cfg.copy_and_resolve_references()
  shutil.copytree(cfg.data.tfds_dir, root / 'tfds')
  shutil.copytree(cfg.data.data_dir, root / 'data')
  cfg.data.tfds_dir, cfg.data.data_dir = str(root / 'tfds'), str(root / 'data')
  return cfg


def rebuild_with_other_titles(cfg) -> None:
  """The same gallery items (ids, count, features), other titles; rebuilt in place."""
  path = Path(cfg.data.data_dir) / 'product1m_gallery_ossurl_v2.txt'
  lines = path.read_text(encoding='utf-8').splitlines()
  fields = [line.split('#####') for line in lines]
  for f in fields:
    f[1] = f[1][::-1]  # the title, reversed
  path.write_text('\n'.join('#####'.join(f) for f in fields) + '\n', encoding='utf-8')
  product1m_tfds.build(
      cfg.data.data_dir,
      cfg.data.tfds_dir,
      vocab_file=cfg.data.vocab_file,
      storage_dtype=cfg.data.storage_dtype,
      max_regions=cfg.data.max_regions,
      feature_dim=cfg.data.feature_dim,
      overwrite=True,
      progress=False,
  )


def test_export_of_changed_data_is_redone_or_refused(trained, tmp_path, capfd):
  cfg, workdir = trained
  cfg = with_data_copy(cfg, tmp_path)
  run = tmp_path / 'run'
  shutil.copytree(workdir, run)
  first = exporting.export(cfg, run, 'gallery')
  out = first.out_dir
  explicit = exporting.export(cfg, run, 'gallery', out=tmp_path / 'mine')
  before = export_format.read_embeddings(out)
  assert exporting.export(cfg, run, 'gallery').reused

  rebuild_with_other_titles(cfg)
  capfd.readouterr()
  # The default folder is ours: exported again, saying what changed.
  again = exporting.export(cfg, run, 'gallery')
  said = capfd.readouterr().out
  assert not again.reused and again.written == [0, 1, 2, 3]
  # The rewritten files differ (and dataset_info.json's byte counts too where a reversed title
  # has another number of WordPiece ids).
  assert 'holds an export of something else (' in said and 'inputs.split_files: ' in said
  assert 'exporting again' in said
  after = export_format.read_embeddings(out)
  assert after.item_id == before.item_id
  assert not np.allclose(after.vectors, before.vectors)
  # A folder given with --out is refused, naming what differs, and left as it was.
  with pytest.raises(ValueError, match=r'holds another export \(.*inputs.split_files: '):
    exporting.export(cfg, run, 'gallery', out=explicit.out_dir)
  np.testing.assert_array_equal(
      export_format.read_embeddings(explicit.out_dir).vectors, before.vectors
  )


def test_truncated_shard_is_redone_and_temporary_files_removed(trained, tmp_path):
  cfg, workdir = trained
  out = tmp_path / 'gallery'
  exporting.export(cfg, workdir, 'gallery', out=out)
  before = export_format.read_embeddings(out)
  shard = out / export_format.shard_name(1, 4)
  shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
  leftover = out / f'.{export_format.shard_name(2, 4)}.tmp-999999'
  leftover.write_bytes(b'partial')
  with pytest.raises(ValueError, match=rf'{shard.name} cannot be read .*run the export again'):
    export_format.read_embeddings(out)
  again = exporting.export(cfg, workdir, 'gallery', out=out)
  assert again.written == [1] and not leftover.exists()
  np.testing.assert_array_equal(export_format.read_embeddings(out).vectors, before.vectors)


def random_identity(cfg, rows):
  """The identity of an export of `rows` with the random initialisation."""
  return identity_lib.ExportIdentity.of_rows(cfg, rows, cfg.eval.embedding, None)


@pytest.fixture(scope='module')
def embedder(trained):
  cfg, _ = trained
  return embedding_lib.make_embedder(cfg, sharding.make_mesh(cfg.mesh))


def test_nonfinite_embeddings_are_refused_by_export_and_evaluation(trained, embedder, tmp_path):
  cfg, _ = trained
  source = source_lib.make_source(cfg, 'dev')
  rows = eval_input.sample_rows(source)
  params = embedding_lib.random_model_params(cfg, embedder)
  nan_params = jax.tree.map(lambda x: x * np.nan, params)
  out = tmp_path / 'dev'
  with pytest.raises(
      writer.NonFiniteEmbeddingsError,
      match=r"split 'dev' \(samples\): 16 of 16 rows of shard 0 have non-finite",
  ):
    writer.write_export(
        cfg, out, embedder, nan_params, source, rows, identity=random_identity(cfg, rows)
    )
  assert not list(out.glob('shard-*'))
  assert not export_format.read_metadata(out)['complete']

  # An export with NaN rows on disk (written by an earlier version) is refused when read.
  writer.write_export(cfg, out, embedder, params, source, rows, identity=random_identity(cfg, rows))
  shard = out / export_format.shard_name(0, export_format.read_metadata(out)['num_shards'])
  with np.load(shard) as z:
    arrays = dict(z)
  arrays['embeddings'][[2, 5]] = np.nan
  export_format.write_shard(shard, arrays)
  with pytest.raises(ValueError, match=r"split 'dev', samples\) has 2 of \d+ rows with non-finite"):
    export_format.read_embeddings(out)


def test_exports_of_two_runs_are_not_searched_together(trained, embedder, tmp_path):
  cfg, workdir = trained
  gallery = exporting.export(cfg, workdir, 'gallery', out=tmp_path / 'gallery').out_dir
  queries = exporting.export(cfg, workdir, 'dev', out=tmp_path / 'dev').out_dir
  # The same step of another run: another save of the checkpoint.
  other = tmp_path / 'other-run-dev'
  shutil.copytree(queries, other)
  meta = json.loads((other / export_format.METADATA_FILE).read_text())
  meta['checkpoint_id'] = '0123456789abcdef'
  (other / export_format.METADATA_FILE).write_text(json.dumps(meta))
  with pytest.raises(
      ValueError,
      match=rf'queries \({other}\) and gallery \({gallery}\) were not exported from the same '
      r"checkpoint, config and data \(checkpoint_id: '0123456789abcdef' vs '[0-9a-f]{16}'",
  ):
    evaluation.evaluate(cfg, tmp_path, 'dev', gallery_embeddings=gallery, query_embeddings=other)
  # The same run's exports are accepted.
  result = evaluation.evaluate(
      cfg, tmp_path, 'dev', gallery_embeddings=gallery, query_embeddings=queries
  )
  assert result.metrics


def test_second_export_into_a_folder_is_refused(trained, tmp_path):
  cfg, workdir = trained
  out = tmp_path / 'gallery'
  with lock_lib.FolderLock(out, writer.LOCK_FILE, 'export'):
    with pytest.raises(
        lock_lib.LockedError, match=rf'in use by another export \(host .*, pid {os.getpid()}'
    ):
      exporting.export(cfg, workdir, 'gallery', out=out)
  assert not list(out.glob('shard-*'))


def test_a_checkpoint_that_fails_its_checksums_is_not_exported(trained, tmp_path):
  """Embeddings of damaged weights would be plausible numbers: the step is refused (training
  would move it aside), naming the steps that can be exported instead."""
  cfg, workdir = trained
  run = tmp_path / 'run'
  shutil.copytree(workdir, run)
  ckpts = run / 'checkpoints'
  steps = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
  assert len(steps) >= 2
  flip_a_byte(largest_file(ckpts / str(steps[-1]) / 'state'))
  with pytest.raises(
      checkpoint_lib.CorruptCheckpointError,
      match=rf'checkpoint {steps[-1]} in .* does not match its checksums.json: state/.*'
      r'checksum differs.*' + re.escape(f'--checkpoint=<one of {steps[:-1]}>'),
  ):
    exporting.export(cfg, run, 'gallery', out=tmp_path / 'gallery')
  assert not (tmp_path / 'gallery').exists()
  exporting.export(cfg, run, 'gallery', step=steps[0], out=tmp_path / 'gallery')
  assert export_format.read_embeddings(tmp_path / 'gallery').vectors.shape[0] > 0


def test_instances_grouped_otherwise_are_another_export():
  """Same proposer name and row count, other groupings (a threshold changed): the export's
  identity differs, so the old vectors are not reused for the new rows."""

  def rows(regions):
    return eval_input.EvalRows(
        'instances', 'dev', ['q1', 'q1'], np.zeros(2, np.int64), regions, ['', ''], [0, 1], 'boxes'
    )

  a = identity_lib.instances_fingerprint(rows([(0, 1), (2,)]))
  b = identity_lib.instances_fingerprint(rows([(0,), (1, 2)]))
  assert a and b and a != b
  assert a == identity_lib.instances_fingerprint(rows([(0, 1), (2,)]))
  samples = eval_input.EvalRows('samples', 'dev', ['q1'], np.zeros(1, np.int64))
  assert identity_lib.instances_fingerprint(samples) is None
  assert export_format.identity_diffs({'instances_sha256': a}, {'instances_sha256': b}) == [
      f'instances_sha256: {a!r} vs {b!r}'
  ]
