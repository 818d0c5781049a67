"""The report: markdown table, metrics.json, plot and query listings."""

from __future__ import annotations

import json

import pytest

from capture_jax.retrieval import report

METRICS = {
    'capture': {
        f'{m}@{r}': v
        for m, base in (('mAP', 0.8), ('Prec', 0.7), ('mAR', 0.5))
        for r, v in ((10, base), (50, base - 0.05), (100, base - 0.0912345))
    },
    'tfidf | text': {f'{m}@{r}': 0.123456 for m in ('mAP', 'Prec', 'mAR') for r in (10, 50, 100)},
}


def test_write_report(tmp_path):
  gallery_labels = {'g1': 'A', 'g2': 'B', 'g3': 'A'}
  titles = {'q1': 'AHC 套装', 'g1': 'AHC 眼霜', 'g2': '兰蔻', 'g3': 'AHC 水'}
  listing = report.build_listing(
      'q1', ['A', 'A', 'C'], ['g1', 'g2', 'zz', 'g3'], gallery_labels, titles
  )
  assert [r.hit for r in listing.results] == [True, False, False, True]
  paths = report.write_report(
      tmp_path / 'out', METRICS, {'capture': [listing]}, notes=['command: test']
  )
  text = paths['report'].read_text(encoding='utf-8')
  table = report.parse_metrics_table(text)
  assert list(table) == ['capture', 'tfidf | text']
  assert table['capture']['mAP@10'] == 80.0 and table['capture']['mAR@100'] == 40.88
  assert table['tfidf | text']['Prec@50'] == 12.35
  assert len(table['capture']) == 9
  assert 'Best per metric: mAP@10: capture' in text
  # The listing: title and labels, then results with labels and hits.
  assert '- Title: AHC 套装' in text and '- Labels: A (x2); C' in text
  assert '| 1 | g1 | A | yes | AHC 眼霜 |' in text
  assert '| 3 | zz | (not in gallery) | no |  |' in text
  assert json.loads(paths['metrics'].read_text()) == METRICS
  assert paths['plot'].read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert len(paths['plot'].read_bytes()) > 10_000


def test_table_errors():
  with pytest.raises(KeyError, match='lacks metrics'):
    report.metrics_table({'m': {'mAP@10': 0.5}})
  with pytest.raises(ValueError, match='no methods'):
    report.write_report('unused', {})
  with pytest.raises(ValueError, match='no metrics table'):
    report.parse_metrics_table('# nothing here')
