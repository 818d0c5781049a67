"""Embedding export and the evaluation command, end to end on the tiny dataset with a 2-step checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from capture_jax import train
from capture_jax.data import eval_input
from capture_jax.data import source as source_lib
from capture_jax.retrieval import embedding as embedding_lib
from capture_jax.retrieval import evaluation
from capture_jax.retrieval import export_format
from capture_jax.retrieval import exporting
from capture_jax.retrieval import identity as identity_lib
from capture_jax.retrieval import keys
from capture_jax.retrieval import instance_merge, metrics, search
from tests import official_eval
from capture_jax.models import CaptureModel
from capture_jax import batch as batch_lib
from capture_jax.training import state as state_lib
from capture_jax.training import checkpoint as checkpoint_lib
from capture_jax.training import sharding
from tests.helpers import build_dataset_of
from tests.helpers import trainer_config
from tests.helpers import with_cpu_devices
from tests.helpers import without_compile_cache
from tests.helpers import write_config_module

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """(config, workdir): the tiny model, one layer per stack (halves every compile), trained for 2 steps."""
  cfg = trainer_config(tmp_path_factory.mktemp('data'))
  cfg.model.update(num_hidden_layers=1, v_num_hidden_layers=1, co_num_layers=1, cross_num_layers=1)
  cfg.train.num_steps = 2
  # 54 gallery items -> 4 shards of 16, 16, 16, 6. Instance queries from the sidecar, whose
  # rows these tests check (proposers have their own tests in test_instances.py).
  cfg.eval.update(shard_size=16, progress_bar=False, instances='oracle')
  workdir = tmp_path_factory.mktemp('run')
  train.run(cfg, workdir)
  return cfg, workdir


def method(mode, random_init=False):
  """A CAPTURE row of the fixture's report (instances from the oracle sidecar)."""
  proposer = None if mode == 'whole' else keys.Proposer('oracle')
  return keys.Method('model', mode, proposer, 'random' if random_init else 'checkpoint')


def copy_config(cfg, **eval_overrides):
  cfg = cfg.copy_and_resolve_references()
  cfg.eval.update(eval_overrides)
  return cfg


def l2n(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# --------------------------------------------------------------------------
# Export.


def test_export_writes_shards_and_metadata_and_resumes(trained, tmp_path):
  cfg, workdir = trained
  out = tmp_path / 'gallery'
  first = exporting.export(cfg, workdir, 'gallery', out=out)
  meta = json.loads((out / 'metadata.json').read_text())
  ids = source_lib.make_source(cfg, 'gallery').item_ids()
  assert len(ids) == 54  # 6 full batches of 8 and one of 6 rows + 2 padding rows
  assert meta['complete'] and meta['count'] == 54 and meta['split'] == 'gallery'
  assert meta['kind'] == 'fused' and meta['dimension'] == 2 * cfg.model.bi_hidden_size
  assert meta['checkpoint_step'] == 2 and meta['weights'] == 'checkpoint'
  assert meta['model'] == cfg.model.to_dict() and meta['num_shards'] == 4
  shards = sorted(out.glob('shard-*.npz'))
  assert [p.name for p in shards] == [export_format.shard_name(s, 4) for s in range(4)]
  assert first.written == [0, 1, 2, 3]
  before = export_format.read_embeddings(out)
  # The padding rows are dropped: exactly the split's items, in split order, unit vectors.
  assert before.item_id == ids and before.row.tolist() == list(range(54))
  np.testing.assert_allclose(np.linalg.norm(before.vectors, axis=1), 1.0, rtol=1e-5)
  assert len(np.unique(before.vectors.round(5), axis=0)) == 54

  # Delete one shard: the rerun rewrites only it, and the export is the same.
  mtimes = {p.name: p.stat().st_mtime_ns for p in shards}
  (out / export_format.shard_name(2, 4)).unlink()
  again = exporting.export(cfg, workdir, 'gallery', out=out)
  assert again.written == [2] and not again.reused
  for p in shards:
    if p.name != export_format.shard_name(2, 4):
      assert p.stat().st_mtime_ns == mtimes[p.name], p.name
  after = export_format.read_embeddings(out)
  np.testing.assert_array_equal(after.vectors, before.vectors)
  assert after.item_id == before.item_id

  # Complete: nothing to do; another kind in the same folder is refused.
  assert exporting.export(cfg, workdir, 'gallery', out=out).reused
  with pytest.raises(ValueError, match=r'holds another export \(kind: .fused. vs .text.'):
    exporting.export(copy_config(cfg, embedding='text'), workdir, 'gallery', out=out)


def test_exported_embeddings_equal_a_direct_model_apply(trained, tmp_path):
  cfg, workdir = trained
  out = tmp_path / 'dev'
  exporting.export(cfg, workdir, 'dev', out=out)
  exported = export_format.read_embeddings(out)

  # Parameters through the trainer's own restore path (the whole state), not the export's partial restore.
  mesh = sharding.make_mesh(cfg.mesh)
  _, _, abstract, shardings = state_lib.train_state_layout(cfg, mesh)
  manager = checkpoint_lib.make_manager(workdir, cfg.checkpoint)
  state, step = checkpoint_lib.restore_latest(
      manager, sharding.abstract_with_shardings(abstract, shardings), None
  )
  manager.close()
  assert step == 2
  apply = jax.jit(lambda p, b: CaptureModel(cfg.model).apply({'params': p}, b, train=False))
  rows, ids = [], []
  for batch in eval_input.make_eval_iterator(cfg, 'dev', process_index=0, process_count=1):
    valid = batch.is_valid.astype(bool)
    outputs = jax.device_get(apply(state.params['model'], batch_lib.model_inputs(batch.inputs)))
    rows.append({k: v[valid] for k, v in outputs.items() if k.startswith(('pooled', 'enc_pooled'))})
    ids += list(batch.item_id[valid])
  outputs = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
  assert exported.item_id == ids
  fused = l2n(np.concatenate([l2n(outputs['pooled_text']), l2n(outputs['pooled_visual'])], axis=1))
  np.testing.assert_allclose(exported.vectors, fused, rtol=1e-5, atol=1e-6)

  # Every kind's formula on those outputs.
  expected = {
      'fused': fused,
      'text': l2n(outputs['pooled_text']),
      'visual': l2n(outputs['pooled_visual']),
      'encoder': l2n(
          np.concatenate([l2n(outputs['enc_pooled_text']), l2n(outputs['enc_pooled_visual'])], 1)
      ),
  }
  for kind, want in expected.items():
    got = np.asarray(embedding_lib.embed_outputs(outputs, kind))
    assert got.shape[1] == embedding_lib.embedding_dim(cfg.model, kind)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=kind)
  # The encoder rows with the text poolers at a quarter of the cosine: the cosine of two rows
  # is 0.25 x the text poolers' cosine + 0.75 x the visual poolers'.
  weighted = np.asarray(embedding_lib.embed_outputs(outputs, 'encoder', 0.25))
  t, v = l2n(outputs['enc_pooled_text']), l2n(outputs['enc_pooled_visual'])
  np.testing.assert_allclose(
      weighted @ weighted.T, 0.25 * t @ t.T + 0.75 * v @ v.T, rtol=1e-5, atol=1e-5
  )
  np.testing.assert_allclose(np.linalg.norm(weighted, axis=1), 1.0, rtol=1e-5)
  # An export records that weight: one of another weight is not reused, nor searched with it.
  enc = copy_config(cfg, embedding='encoder')
  quarter = copy_config(cfg, embedding='encoder', encoder_text_weight=0.25)
  dev = eval_input.sample_rows(source_lib.make_source(enc, 'dev'))
  a = identity_lib.ExportIdentity.of_rows(enc, dev, 'encoder', 2).fields
  b = identity_lib.ExportIdentity.of_rows(quarter, dev, 'encoder', 2).fields
  assert a['text_weight'] is None and b['text_weight'] == 0.25
  assert export_format.identity_diffs(a, b) == ['text_weight: None vs 0.25']
  assert export_format.pair_diffs(a, b) == ['text_weight: None vs 0.25']
  with pytest.raises(ValueError, match=r'encoder_text_weight must be in \[0, 1\], got 1.5'):
    embedding_lib.text_weight(copy_config(cfg, encoder_text_weight=1.5), 'fused')


def test_random_weights_are_the_trainers_initialisation(trained):
  cfg, _ = trained
  embedder = embedding_lib.make_embedder(cfg, sharding.make_mesh(cfg.mesh))
  ours = embedding_lib.random_model_params(
      cfg, embedder
  )  # what the random-weights baseline embeds with
  theirs = jax.jit(lambda k: state_lib.initial_params(cfg, k)['model'])(
      jax.random.PRNGKey(cfg.seed)
  )
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  for (path, a), (_, b) in zip(
      jax.tree_util.tree_leaves_with_path(ours), jax.tree_util.tree_leaves_with_path(theirs)
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def test_export_on_8_devices_with_sharded_parameters_matches_one_device(trained, tmp_path):
  cfg, workdir = trained
  config_json = tmp_path / 'config.json'
  config_json.write_text(cfg.to_json())
  result = subprocess.run(
      [
          sys.executable,
          str(REPO / 'tests' / 'multidevice' / 'export_sharded.py'),
          str(config_json),
          str(workdir),
          str(tmp_path / 'eight'),
      ],
      cwd=REPO,
      text=True,
      capture_output=True,
      timeout=600,
      env=with_cpu_devices(8),
  )
  assert result.returncode == 0 and 'OK' in result.stdout, result.stdout + result.stderr
  exporting.export(cfg, workdir, 'gallery', out=tmp_path / 'one')
  eight, one = (
      export_format.read_embeddings(tmp_path / 'eight'),
      export_format.read_embeddings(tmp_path / 'one'),
  )
  assert eight.item_id == one.item_id and eight.metadata['devices'] == 8
  np.testing.assert_allclose(eight.vectors, one.vectors, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_two_processes_export_the_rows_of_one(trained, tmp_path):
  """2 processes x 2 CPU devices (Gloo): each reads every other instance row; the export is one process's."""
  cfg, workdir = trained
  config_json = tmp_path / 'config.json'
  config_json.write_text(cfg.to_json())
  result = subprocess.run(
      [
          str(REPO / 'launch' / 'local_multiprocess.sh'),
          '2',
          str(config_json),
          str(workdir),
          'dev',
          'instances',
          str(tmp_path / 'two'),
      ],
      cwd=REPO,
      text=True,
      capture_output=True,
      timeout=600,
      env={
          **without_compile_cache(os.environ),
          'JAX_PLATFORMS': 'cpu',
          'PYTHON': sys.executable,
          'CAPTURE_DEVICES_PER_PROCESS': '2',
          'CAPTURE_MAIN': str(REPO / 'tests' / 'multidevice' / 'export_process.py'),
      },
  )
  assert result.returncode == 0 and '[p0] OK' in result.stdout, result.stdout + result.stderr
  exporting.export(cfg, workdir, 'dev', rows='instances', out=tmp_path / 'one')
  two, one = export_format.read_embeddings(tmp_path / 'two'), export_format.read_embeddings(
      tmp_path / 'one'
  )
  assert (
      len(one) == 44 and two.metadata['processes'] == 2
  )  # 6 global batches of 8, the last with 4 padding rows
  assert (two.item_id, two.instance_label) == (one.item_id, one.instance_label)
  np.testing.assert_array_equal(two.instance_index, one.instance_index)
  np.testing.assert_allclose(two.vectors, one.vectors, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------
# Evaluation.


@pytest.fixture(scope='module')
def evaluated(trained, tmp_path_factory):
  cfg, workdir = trained
  out = tmp_path_factory.mktemp('eval')
  return evaluation.evaluate(cfg, workdir, 'dev', out_dir=out)


def ranked_lists(queries, gallery, k=100):
  _, idx = search.exact_topk(queries.vectors, gallery.vectors, k)
  return [[gallery.item_id[i] for i in row] for row in idx]


def test_evaluate_writes_the_report_and_official_metrics(trained, evaluated):
  cfg, _ = trained
  out = evaluated.out_dir
  for name in (
      'report.md',
      'metrics.json',
      'metrics.png',
      'retrieval_id_list.txt',
      'evaluation.json',
  ):
    assert (out / name).is_file(), name
  assert (out / 'metrics.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  saved = json.loads((out / 'metrics.json').read_text())
  methods = [
      method('whole'),
      method('instances'),
      method('both'),
      method('both', random_init=True),
      keys.Method('tfidf'),
      keys.Method('mean_region'),
  ]
  assert list(saved) == [m.label for m in methods]
  # retrieval_id_list.txt is CAPTURE in eval.query_mode; its numbers are the official evaluator's, digit for digit.
  lines = (out / 'retrieval_id_list.txt').read_text().splitlines(keepends=True)
  assert len(lines) == 16 and all(
      len(l.strip().split(',')) == 1 + 54 for l in lines
  )  # 100 > gallery size
  official, _ = official_eval.evaluate(cfg.data.data_dir, lines)
  for r in metrics.DEFAULT_RANKS:
    for name, key in (('mAP', 'mAP'), ('Prec', 'Prec'), ('mAR', 'mAR')):
      assert saved[method('both').label][f'{name}@{r}'] == official[f'top{r}'][key]
  # So are every other method's, from its own ranked lists.
  for m in methods:
    path = out / 'ranked_lists' / f'{m.slug}.txt'
    official, _ = official_eval.evaluate(
        cfg.data.data_dir, path.read_text().splitlines(keepends=True)
    )
    assert saved[m.label]['mAP@10'] == official['top10']['mAP'], m.label
  report = (out / 'report.md').read_text()
  assert report.count('| CAPTURE') == 4 and '![metrics against R](metrics.png)' in report
  assert f'Best query mode on mAP@10: **{evaluated.best_query_mode}**' in report
  best = max(('whole', 'instances', 'both'), key=lambda m: saved[method(m).label]['mAP@10'])
  assert evaluated.best_query_mode == best
  assert (
      report.count('### Query ') == cfg.eval.num_listings
      and '| Rank | Gallery id | Label | Hit |' in report
  )


def test_instance_queries_are_searched_and_merged_round_robin(trained, evaluated):
  cfg, workdir = trained
  exports = {k: export_format.read_embeddings(v) for k, v in evaluated.summary['exports'].items()}
  gallery, queries = exports['gallery'], exports['queries']
  instances = exports['instances oracle']
  # One row per instance of the sidecar, with only that instance's regions: different from the whole query.
  sidecar = {}
  for line in (Path(cfg.data.data_dir) / 'instances_dev.jsonl').read_text().splitlines():
    rec = json.loads(line)
    sidecar[rec['item_id']] = [i['label'] for i in rec['instances']]
  assert [(q, l) for q in queries.item_id for l in sidecar[q]] == list(
      zip(instances.item_id, instances.instance_label)
  )
  first = {q: v for q, v in zip(queries.item_id, queries.vectors)}
  assert all(
      not np.allclose(v, first[q], atol=1e-3) for q, v in zip(instances.item_id, instances.vectors)
  )

  whole = dict(zip(queries.item_id, ranked_lists(queries, gallery)))
  per_instance = {}
  for q, lst in zip(instances.item_id, ranked_lists(instances, gallery)):
    per_instance.setdefault(q, []).append(lst)
  out = evaluated.out_dir / 'ranked_lists'
  for mode in ('whole', 'instances', 'both'):
    written = metrics.read_ranked_lists(out / f'{method(mode).slug}.txt')
    assert list(written) == queries.item_id
    for q in queries.item_id:
      assert written[q] == instance_merge.merge_query_lists(whole[q], per_instance[q], mode), (
          mode,
          q,
      )
  both = metrics.read_ranked_lists(out / f'{method("both").slug}.txt')
  assert any(both[q][:10] != whole[q][:10] for q in queries.item_id)  # the merge changes the lists
  assert metrics.read_ranked_lists(evaluated.out_dir / 'retrieval_id_list.txt') == both


def test_evaluate_command_line_reuses_the_exports(trained, evaluated, tmp_path):
  cfg, workdir = trained
  config_py = write_config_module(tmp_path / 'config.py', cfg)
  result = subprocess.run(
      [
          sys.executable,
          '-m',
          'capture_jax.evaluate',
          f'--config={config_py}',
          f'--workdir={workdir}',
          '--split=dev',
          f'--out={tmp_path / "eval"}',
      ],
      cwd=REPO,
      text=True,
      capture_output=True,
      timeout=600,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )
  assert result.returncode == 0, result.stdout + result.stderr
  assert (
      'reusing the exports' in result.stdout and 'compiled the embedding step' not in result.stdout
  )
  assert evaluated.table in result.stdout and 'best query mode on mAP@10' in result.stdout
  assert json.loads((tmp_path / 'eval' / 'metrics.json').read_text()) == json.loads(
      (evaluated.out_dir / 'metrics.json').read_text()
  )
  # A bad request is one clear line on stderr and exit status 1.
  bad = subprocess.run(
      [
          sys.executable,
          '-m',
          'capture_jax.export',
          f'--config={config_py}',
          f'--workdir={tmp_path / "none"}',
          '--split=gallery',
      ],
      cwd=REPO,
      text=True,
      capture_output=True,
      timeout=600,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )
  assert bad.returncode == 1 and 'error: no checkpoint in' in bad.stderr, bad.stderr


# --------------------------------------------------------------------------
# Bad input: clear errors, before anything compiles.


def test_no_checkpoint_in_the_workdir(trained, tmp_path):
  cfg, _ = trained
  with pytest.raises(FileNotFoundError, match='no checkpoint in'):
    exporting.export(cfg, tmp_path, 'gallery')
  with pytest.raises(FileNotFoundError, match='no checkpoint in'):
    evaluation.evaluate(cfg, tmp_path, 'dev')
  with pytest.raises(FileNotFoundError, match=r'no checkpoint of step 7 in .* holds steps \[.*2\]'):
    exporting.export(cfg, trained[1], 'gallery', step=7)


def test_checkpoint_of_a_different_config(trained):
  cfg, workdir = trained
  other = cfg.copy_and_resolve_references()
  other.model.intermediate_size = 64
  for run in (
      lambda: exporting.export(other, workdir, 'gallery'),
      lambda: evaluation.evaluate(other, workdir, 'dev'),
  ):
    with pytest.raises(
        checkpoint_lib.IncompatibleCheckpointError,
        match=r'model.intermediate_size: checkpoint 48, config 64',
    ):
      run()


def test_checkpoint_of_another_vocab(trained, tmp_path):
  """The same tokens in another order: every id would embed another token."""
  cfg, workdir = trained
  tokens = Path(cfg.data.vocab_file).read_text(encoding='utf-8').splitlines()
  tokens[10], tokens[11] = tokens[11], tokens[10]
  other = cfg.copy_and_resolve_references()
  other.data.vocab_file = str(tmp_path / 'other.txt')
  Path(other.data.vocab_file).write_text('\n'.join(tokens) + '\n', encoding='utf-8')
  # A dataset of that vocab (one of the run's vocab is refused by the dataset itself): what is
  # left to refuse is the checkpoint.
  other.data.tfds_dir = str(tmp_path / 'tfds')
  build_dataset_of(other, other.data.tfds_dir)
  for run in (
      lambda: exporting.export(other, workdir, 'gallery'),
      lambda: evaluation.evaluate(other, workdir, 'dev'),
  ):
    with pytest.raises(
        checkpoint_lib.IncompatibleCheckpointError,
        match=rf'the vocab differs: trained with {cfg.data.vocab_file} \(fingerprint [0-9a-f]{{16}}\), '
        rf'config data.vocab_file={other.data.vocab_file} \(fingerprint [0-9a-f]{{16}}\)',
    ):
      run()


def test_split_file_absent(trained, tmp_path):
  cfg, workdir = trained
  data = tmp_path / 'data'
  shutil.copytree(cfg.data.data_dir, data)
  (data / 'product1m_test_ossurl_v2.txt').unlink()
  build_dataset_of(cfg, str(tmp_path / 'tfds'), str(data))
  other = cfg.copy_and_resolve_references()
  other.data.tfds_dir = str(tmp_path / 'tfds')
  with pytest.raises(
      ValueError, match=r"split 'test' was not built .* its annotation file was absent"
  ):
    exporting.export(other, workdir, 'test')
  with pytest.raises(
      ValueError, match=r"split must be one of \('train', 'gallery', 'dev', 'test'\), got 'val'"
  ):
    exporting.export(cfg, workdir, 'val')


def test_query_id_absent_from_the_annotations(trained, tmp_path):
  cfg, workdir = trained
  data = tmp_path / 'data'
  shutil.copytree(cfg.data.data_dir, data, ignore=shutil.ignore_patterns('features'))
  dev = data / 'product1m_dev_ossurl_v2.txt'
  lines = dev.read_text().splitlines(keepends=True)
  dev.write_text(''.join(lines[1:]))
  other = cfg.copy_and_resolve_references()
  other.data.data_dir = str(data)
  dropped = lines[0].split('#####')[0]
  with pytest.raises(
      ValueError,
      match=rf"1 query id\(s\) of split 'dev' are absent from the annotations " rf".*'{dropped}'",
  ):
    evaluation.evaluate(other, workdir, 'dev')


def fake_export(out, vectors, ids, kind, step=2, rows='samples'):
  """An export folder written with the export's own format functions."""
  n, dim = vectors.shape
  out.mkdir(parents=True)
  if n:
    export_format.write_shard(
        out / export_format.shard_name(0, 1),
        {
            'embeddings': vectors.astype(np.float32),
            'item_id': np.array(ids, dtype=str),
            'row': np.arange(n),
        },
    )
  export_format.write_metadata(
      out,
      {
          'format_version': 1,
          'split': 'gallery',
          'rows': rows,
          'kind': kind,
          'dimension': dim,
          'weights': 'checkpoint',
          'checkpoint_step': step,
          'count': n,
          'shard_rows': 16,
          'num_shards': 1 if n else 0,
          'complete': True,
      },
  )
  return out


def test_embeddings_of_mismatched_dimension_and_an_empty_gallery(trained, evaluated, tmp_path):
  cfg, _ = trained
  queries = Path(evaluated.summary['exports']['queries'])
  gallery = export_format.read_embeddings(evaluated.summary['exports']['gallery'])
  narrow = fake_export(tmp_path / 'text', gallery.vectors[:, :16], gallery.item_id, 'text')
  cfg = copy_config(cfg, query_mode='whole', baselines=False)
  with pytest.raises(
      ValueError,
      match=r'embedding dimensions differ: queries .* have width 32 \(fused\), '
      r'the gallery .* has width 16 \(text\)',
  ):
    evaluation.evaluate(cfg, tmp_path, 'dev', gallery_embeddings=narrow, query_embeddings=queries)
  empty = fake_export(tmp_path / 'empty', np.zeros((0, 32)), [], 'fused')
  with pytest.raises(ValueError, match='the gallery is empty'):
    evaluation.evaluate(cfg, tmp_path, 'dev', gallery_embeddings=empty, query_embeddings=queries)
  # The same explicit exports with matching ones evaluate fine (no checkpoint needed).
  result = evaluation.evaluate(
      cfg,
      tmp_path,
      'dev',
      gallery_embeddings=gallery.path,
      query_embeddings=queries,
      out_dir=tmp_path / 'ok',
  )
  assert result.metrics['CAPTURE (whole)'] == evaluated.metrics['CAPTURE (whole)']


def test_given_exports_with_instance_queries(trained, evaluated, tmp_path):
  """--gallery/--query/--instance_embeddings: the rows are named after the instance export's
  proposer, its lists equal the evaluation that made the exports, and the random-weights row
  (no random instance export was given) is whole-sample."""
  cfg, _ = trained
  given = evaluated.summary['exports']
  result = evaluation.evaluate(
      copy_config(cfg),
      tmp_path,
      'dev',
      gallery_embeddings=given['gallery'],
      query_embeddings=given['queries'],
      instance_embeddings=given['instances oracle'],
      out_dir=tmp_path / 'given',
  )
  assert list(result.metrics) == [
      method('whole').label,
      method('instances').label,
      method('both').label,
      method('whole', random_init=True).label,
      keys.TFIDF_LABEL,
      keys.MEAN_REGION_LABEL,
  ]
  for mode in ('whole', 'instances', 'both'):
    assert result.metrics[method(mode).label] == evaluated.metrics[method(mode).label], mode
    assert (result.out_dir / 'ranked_lists' / f'{method(mode).slug}.txt').read_text() == (
        evaluated.out_dir / 'ranked_lists' / f'{method(mode).slug}.txt'
    ).read_text()
  assert result.summary['main_method'] == method('both').label
  assert result.summary['proposers'] == ['oracle']
