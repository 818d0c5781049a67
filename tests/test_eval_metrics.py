"""The official Product1M metrics: hand-made cases, and agreement with the
restated official evaluator (capture_jax.retrieval.official_eval)."""

from __future__ import annotations

import io
import random
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from capture_jax.retrieval import metrics
from tests import official_eval
from capture_jax.retrieval.metrics import evaluate_ranked_lists, score_queries

SHARED = Path(__file__).resolve().parents[1].parent / 'shared'
DEV_FILE = SHARED / 'product1m' / 'product1m_dev_ossurl_v2.txt'

# Gallery: A x3, B x2, C x1, and five distractors X.
GALLERY = {
    'a1': 'A',
    'a2': 'A',
    'a3': 'A',
    'b1': 'B',
    'b2': 'B',
    'c1': 'C',
    **{f'x{i}': 'X' for i in range(1, 6)},
}


def _one(ranked: list[str], labels: list[str], ranks=(3, 10)) -> dict[str, float]:
  return evaluate_ranked_lists({'q': ranked}, {'q': labels}, GALLERY, ranks)


# ----------------------------------------------------------------------------
# Hand-made cases; each expected value is worked out in the comments.
# ----------------------------------------------------------------------------


def test_repeated_labels():
  # L = [A, A, B]: n_pos = 3 + 3 + 2 = 8 (A counted twice); distinct labels 2.
  got = _one(['a1', 'x1', 'b1', 'a2', 'x2'], ['A', 'A', 'B'])
  # R=3: k = min(3, 8, 5) = 3; rank[:3] = hit, miss, hit.
  assert got['Prec@3'] == 2 / 3
  assert got['mAP@3'] == (1 / 1 + 2 / 3) / 2
  # AR@3: 3 // len(L) = 1 per occurrence: expected A = 2, B = 1; retrieved
  # A = 1, B = 1; A first seen before B -> (1/2 + 1/1) / 2.
  assert got['mAR@3'] == (1 / 2 + 1 / 1) / 2
  # R=10: k = min(10, 8, 5) = 5; hits at ranks 1, 3, 4.
  assert got['Prec@10'] == 3 / 5
  assert got['mAP@10'] == (1 / 1 + 2 / 3 + 3 / 4) / 3
  # AR@10: 10 // 3 = 3 per occurrence: A = min(6, 3) = 3, B = min(3, 2) = 2;
  # retrieved A = 2, B = 1.
  assert got['mAR@10'] == (2 / 3 + 1 / 2) / 2


def test_repeats_change_n_pos_and_expected_counts():
  # With L = [A, B] instead, R=3 gives 3 // 2 = 1: expected A = 1, B = 1, so
  # AR@3 = (1 + 1) / 2 = 1 where the repeated [A, A, B] gave 0.75.
  assert _one(['a1', 'x1', 'b1'], ['A', 'B'])['mAR@3'] == 1.0
  # n_pos with repeats: L = [C, C] gives n_pos = 2 (though C has one item),
  # so k = 2 and a list [c1, x1] has Prec 1/2, not 1.
  got = _one(['c1', 'x1'], ['C', 'C'])
  assert got['Prec@3'] == 1 / 2
  assert got['mAP@3'] == 1.0


def test_label_missing_from_gallery_scores_zero_and_counts():
  ranked = {'q1': ['a1', 'x1', 'b1', 'a2', 'x2'], 'q2': ['a1', 'a2', 'a3']}
  labels = {'q1': ['A', 'A', 'B'], 'q2': ['A', 'Z']}  # no gallery item has Z
  per_query = score_queries(ranked, labels, GALLERY, (3, 10))
  for key in ('AP@3', 'Prec@3', 'AR@3', 'AP@10', 'Prec@10', 'AR@10'):
    assert per_query[key][1] == 0.0, key
  assert per_query['failed@3'].tolist() == [False, True]
  got = evaluate_ranked_lists(ranked, labels, GALLERY, (3, 10))
  alone = _one(ranked['q1'], labels['q1'])
  for key, value in alone.items():  # the zero query still counts in the mean
    assert got[key] == value / 2


def test_fewer_positives_than_r():
  # C has one gallery item: k = 1 at every R; AR expects min(R, 1) = 1.
  got = _one(['x1', 'c1', 'x2', 'x3'], ['C'])
  assert got['mAP@10'] == 0.0 and got['Prec@10'] == 0.0
  assert got['mAR@10'] == 1.0 and got['mAR@3'] == 1.0
  got = _one(['c1', 'x1', 'x2'], ['C'])
  assert got['mAP@10'] == 1.0 and got['Prec@10'] == 1.0


def test_ranked_list_shorter_than_r():
  # A has 3 items, the list 2: k = min(10, 3, 2) = 2; one hit, at rank 2.
  got = _one(['x1', 'a1'], ['A'])
  assert got['Prec@10'] == 1 / 2
  assert got['mAP@10'] == (1 / 2) / 1
  assert got['mAR@10'] == 1 / 3  # expected min(10, 3) = 3, retrieved 1


def test_query_with_no_hit_and_empty_list():
  got = _one(['x1', 'x2', 'x3', 'x4'], ['B'])
  assert all(v == 0.0 for v in got.values())
  got = _one([], ['B'])
  assert all(v == 0.0 for v in got.values())


def test_unknown_ranked_id_zeroes_ar_only():
  # Upstream, a ranked id missing from the gallery raises inside compute_ar,
  # after AP and Prec were added: AR@R is 0 when it lies in the first R.
  per_query = score_queries({'q': ['a1', 'zz', 'a2']}, {'q': ['A']}, GALLERY, (1, 10))
  assert per_query['AP@10'][0] == (1 / 1 + 2 / 3) / 2
  assert per_query['AR@10'][0] == 0.0 and per_query['failed@10'][0]
  assert per_query['AR@1'][0] == 1 / 1 and not per_query['failed@1'][0]


def test_ar_terms_summed_in_order_of_first_appearance():
  # Three labels whose ratios do not add associatively in float64: the sum
  # must follow the order in which the labels first appear in the list.
  gallery = {f'{lab}{i}': lab for lab, n in (('P', 1), ('Q', 3), ('S', 7)) for i in range(n)}
  ranked = ['S0', 'Q0', 'P0', 'Q1', 'S1']
  labels = ['P', 'Q', 'S']
  got = evaluate_ranked_lists({'q': ranked}, {'q': labels}, gallery, (100,))
  # 100 // 3 = 33 expected, capped at gallery sizes 1, 3, 7.
  p, q, s = 1 / 1, 2 / 3, 2 / 7
  assert got['mAR@100'] == ((s + q) + p) / 3
  assert ((s + q) + p) / 3 != ((p + q) + s) / 3  # the order is observable


# ----------------------------------------------------------------------------
# Agreement with the official evaluator.
# ----------------------------------------------------------------------------


def _annotation_line(item_id: str, labels: list[str], title: str = 't') -> str:
  return f'{item_id}#####{title}#####u#####u#####{"#;#".join(labels)}\n'


def _write_gt(
    folder: Path,
    gallery: dict[str, str],
    queries: dict[str, list[str]],
    dev_source: Path | None = None,
) -> None:
  folder.mkdir(parents=True, exist_ok=True)
  (folder / metrics.GALLERY_FILE).write_text(
      ''.join(_annotation_line(g, [lab]) for g, lab in gallery.items()), encoding='utf-8'
  )
  if dev_source is not None:
    (folder / metrics.DEV_FILE).symlink_to(dev_source)
    (folder / metrics.TEST_FILE).write_text('', encoding='utf-8')
  else:
    (folder / metrics.DEV_FILE).write_text(
        ''.join(_annotation_line(q, labs) for q, labs in queries.items()), encoding='utf-8'
    )
    (folder / metrics.TEST_FILE).write_text('', encoding='utf-8')


def _check_against_official(gt_dir: Path, ranked: dict[str, list[str]], tmp: Path) -> None:
  ranked_path = tmp / metrics.RANKED_FILE
  metrics.write_ranked_lists(ranked_path, ranked)
  official, printed = official_eval.evaluate(
      str(gt_dir), ranked_path.read_text(encoding='utf-8').splitlines(keepends=True)
  )
  gt = metrics.read_ground_truth(gt_dir)
  ours = evaluate_ranked_lists(
      metrics.read_ranked_lists(ranked_path), gt.query_labels, gt.gallery_labels
  )
  for r in metrics.DEFAULT_RANKS:
    for name in ('mAP', 'Prec', 'mAR'):
      # Bit-for-bit: the printed repr has every digit.
      assert repr(ours[f'{name}@{r}']) == repr(official[f'top{r}'][name]), (name, r)
  out = io.StringIO()
  with redirect_stdout(out):
    assert metrics.run(str(gt_dir), str(ranked_path)) == 0  # what the command prints
  assert out.getvalue().splitlines()[: len(printed)] == printed


def _random_ranked(
    rng: random.Random, query_labels: dict[str, list[str]], gallery: dict[str, str]
) -> dict[str, list[str]]:
  by_label: dict[str, list[str]] = {}
  for g, lab in gallery.items():
    by_label.setdefault(lab, []).append(g)
  ids = list(gallery)
  ranked = {}
  for q, labels in query_labels.items():
    positives = [g for lab in set(labels) for g in by_label.get(lab, [])]
    length = rng.choice([0, 1, 5, 37, 100, 100, 100])
    pool = positives * 3 + ids[: max(1, len(ids) // 4)]
    picked = rng.sample(ids, min(length, len(ids)))
    # Mix positives in at random ranks. A ranked-list file may not repeat an
    # id (read_ranked_lists refuses it); test_equals_official_property covers
    # repeats in the arithmetic.
    lst = [rng.choice(pool) if rng.random() < 0.4 else g for g in picked]
    ranked[q] = list(dict.fromkeys(lst))[:100]
  return ranked


@pytest.mark.skipif(not DEV_FILE.is_file(), reason='shared Product1M dev file not present')
def test_equals_official_on_real_dev_labels(tmp_path):
  rng = random.Random(0)
  gt_queries = {a.item_id: a.labels for a in metrics.read_annotations(DEV_FILE)}
  labels = sorted({lab for labs in gt_queries.values() for lab in labs})
  assert len(gt_queries) == 2673 and len(labels) == 295
  gallery = {}
  for j, lab in enumerate(labels):
    if j % 23 == 5:  # leave some labels out of the gallery
      continue
    for i in range(rng.choice([1, 2, 3, 8, 20, 45])):
      gallery[f'g{j}_{i}'] = lab
  for i in range(300):  # distractors of labels no query has
    gallery[f'd{i}'] = f'other{i % 40}'
  gt_dir = tmp_path / 'gt'
  _write_gt(gt_dir, gallery, {}, dev_source=DEV_FILE)
  ranked = _random_ranked(rng, gt_queries, gallery)
  _check_against_official(gt_dir, ranked, tmp_path)


def test_equals_official_on_synthetic_ground_truth(tmp_path):
  rng = random.Random(1)
  label_names = [f'L{i}' for i in range(30)]
  gallery = {f'g{i}': rng.choice(label_names[:25]) for i in range(400)}  # L25.. absent
  queries = {
      f'q{i}': [rng.choice(label_names) for _ in range(rng.randint(1, 7))] for i in range(300)
  }
  gt_dir = tmp_path / 'gt'
  _write_gt(gt_dir, gallery, queries)
  _check_against_official(gt_dir, _random_ranked(rng, queries, gallery), tmp_path)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_equals_official_property(data):
  n_labels = data.draw(st.integers(1, 6))
  names = [f'L{i}' for i in range(n_labels + 1)]  # the last one may be absent
  gallery = {
      f'g{i}': data.draw(st.sampled_from(names)) for i in range(data.draw(st.integers(1, 30)))
  }
  ids = list(gallery) + ['unknown']
  query_labels, lines = {}, []
  for i in range(data.draw(st.integers(1, 6))):
    labs = data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=12))
    ranked = data.draw(st.lists(st.sampled_from(ids), max_size=25))
    query_labels[f'q{i}'] = labs
    lines.append(','.join([f'q{i}', *ranked]) + '\n')
  ranks = (1, 3, 10)
  gl = official_eval.parse_id_labels([_annotation_line(g, [lab]) for g, lab in gallery.items()], {})
  ql = official_eval.parse_id_labels(
      [_annotation_line(q, labs) for q, labs in query_labels.items()], {}
  )
  label_ids: dict[str, list[str]] = {}
  for g, info in gl.items():
    label_ids.setdefault(info['label'][0], []).append(g)
  # Small R reaches len(L) > R, where upstream divides by a zero expectation.
  official, printed = official_eval.score(gl, ql, label_ids, lines, topk_list=ranks)
  ranked = {line.strip().split(',')[0]: line.strip().split(',')[1:] for line in lines}
  per_query = score_queries(ranked, query_labels, gallery, ranks)
  ours = metrics.mean_metrics(per_query, ranks)
  for r in ranks:
    for name in ('mAP', 'Prec', 'mAR'):
      assert ours[f'{name}@{r}'] == official[f'top{r}'][name], (name, r)
  assert metrics.official_lines(ranked, per_query, ours, ranks) == printed


def test_official_eval_cli_writes_json_and_prints(tmp_path, capsys):
  gt_dir = tmp_path / 'gt'
  _write_gt(gt_dir, GALLERY, {'q1': ['A', 'A', 'B'], 'q2': ['A', 'Z']})
  run_dir = tmp_path / 'run'
  run_dir.mkdir()
  metrics.write_ranked_lists(
      run_dir / metrics.RANKED_FILE, {'q1': ['a1', 'x1', 'b1', 'a2', 'x2'], 'q2': ['a1']}
  )
  official_eval.main(
      [
          '--GT_dir',
          str(gt_dir),
          '--retrieval_result_dir',
          str(run_dir),
          '--output_metric_dir',
          str(tmp_path / 'out'),
      ]
  )
  lines = capsys.readouterr().out.splitlines()
  # q2 fails (label Z) at every R and is printed before each summary line.
  assert lines[0] == 'q2' and lines[1].startswith('topk: 10  mAP: ')
  assert lines[1].endswith(' ') and len(lines) == 6
  import json

  saved = json.loads((tmp_path / 'out' / 'metric_results.json').read_text())
  assert set(saved) == {'top10', 'top50', 'top100'}
  assert saved['top10']['mAP'] == (1 / 1 + 2 / 3 + 3 / 4) / 3 / 2


# ----------------------------------------------------------------------------
# Files and errors.
# ----------------------------------------------------------------------------


def test_ranked_file_round_trip(tmp_path):
  ranked = {'q1': ['a', 'b'], 'q2': [], 'q3': [str(i) for i in range(100)]}
  path = tmp_path / 'r.txt'
  metrics.write_ranked_lists(path, ranked)
  assert path.read_text().splitlines()[0] == 'q1,a,b'
  assert metrics.read_ranked_lists(path) == ranked
  with pytest.raises(ValueError, match='at most 100'):
    metrics.write_ranked_lists(path, {'q': [str(i) for i in range(101)]})
  with pytest.raises(ValueError, match='comma'):
    metrics.write_ranked_lists(path, {'q': ['a,b']})
  with pytest.raises(ValueError, match='ranked twice'):
    metrics.write_ranked_lists(path, {'q': ['a', 'b', 'a']})


def test_query_id_absent_from_annotations():
  with pytest.raises(KeyError, match="absent from the annotations.*'nope'"):
    evaluate_ranked_lists({'q': ['a1'], 'nope': ['a1']}, {'q': ['A']}, GALLERY)
  # 'zero': as the official script, the unknown query scores 0 and counts.
  per_query = score_queries(
      {'q': ['a1'], 'nope': ['a1']}, {'q': ['A']}, GALLERY, (3,), unknown_queries='zero'
  )
  assert per_query['AP@3'].tolist() == [1.0, 0.0] and per_query['failed@3'].tolist() == [
      False,
      True,
  ]
  with pytest.raises(ValueError, match='unknown_queries'):
    score_queries({'q': ['a1']}, {'q': ['A']}, GALLERY, unknown_queries='skip')


def test_empty_gallery_and_empty_ranked():
  with pytest.raises(ValueError, match='gallery is empty'):
    evaluate_ranked_lists({'q': ['a1']}, {'q': ['A']}, {})
  with pytest.raises(ValueError, match='no ranked lists'):
    evaluate_ranked_lists({}, {'q': ['A']}, GALLERY)


def test_malformed_lines_name_file_and_line(tmp_path):
  bad = tmp_path / 'ann.txt'
  bad.write_text(_annotation_line('g1', ['A']) + 'g2#####title#####u\n', encoding='utf-8')
  with pytest.raises(ValueError, match=r'ann\.txt:2: expected 5 fields'):
    metrics.read_annotations(bad)
  ranked = tmp_path / 'retrieval_id_list.txt'
  ranked.write_text('q1,a,b\nq2,a,,b\n')
  with pytest.raises(ValueError, match=r'retrieval_id_list\.txt:2: .*empty gallery id'):
    metrics.read_ranked_lists(ranked)
  ranked.write_text('q1,a\n\nq2,b\n')
  with pytest.raises(ValueError, match=r'retrieval_id_list\.txt:2: .*no query id'):
    metrics.read_ranked_lists(ranked)
  ranked.write_text('q1,a\nq1,b\n')
  with pytest.raises(ValueError, match='appears twice'):
    metrics.read_ranked_lists(ranked)


def test_ground_truth_folder(tmp_path):
  gt_dir = tmp_path / 'gt'
  _write_gt(gt_dir, {'g1': 'A', 'g2': 'B'}, {'q1': ['A', 'B']})
  # A test-split query with the same id as a dev query: dev is read last and wins.
  (gt_dir / metrics.TEST_FILE).write_text(
      _annotation_line('q1', ['C']) + _annotation_line('t1', ['B'])
  )
  gt = metrics.read_ground_truth(gt_dir)
  assert gt.query_labels == {'q1': ['A', 'B'], 't1': ['B']}
  assert gt.gallery_labels == {'g1': 'A', 'g2': 'B'}
  assert gt.titles['g1'] == 't'
  (gt_dir / metrics.TEST_FILE).unlink()
  with pytest.raises(FileNotFoundError, match='missing: .*product1m_test_ossurl_v2.txt'):
    metrics.read_ground_truth(gt_dir)
  # Gallery + one query split: the other file is not needed.
  gt = metrics.read_ground_truth(gt_dir, 'dev')
  assert gt.query_labels == {'q1': ['A', 'B']} and gt.query_files == (
      str(gt_dir / metrics.DEV_FILE),
  )
  with pytest.raises(FileNotFoundError, match='missing: .*product1m_test_ossurl_v2.txt'):
    metrics.read_ground_truth(gt_dir, 'test')
  with pytest.raises(ValueError, match='split must be one of'):
    metrics.read_ground_truth(gt_dir, 'gallery')


def test_means_are_sequential_sums():
  # Per-query values whose pairwise and sequential sums differ in float64.
  rng = np.random.default_rng(0)
  values = rng.random(1000)
  seq = 0.0
  for v in values:
    seq += v
  assert float(metrics._seq_sum(values)) == seq
  assert float(np.sum(values)) != seq  # pairwise summation would not do (seed 0)
