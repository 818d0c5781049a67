"""A retrieval report a person can read: ``report.md``, ``metrics.json``, a plot.

``report.md`` holds one markdown table (a row per method; mAP, Prec and mAR
at each R as percentages with two decimals), the best method per column, the
plot, and optional listings: for a few queries, the title and labels, then
the top-10 results with their labels and whether each is a hit.
``metrics.json`` keeps the unrounded fractions. The plot is drawn with
matplotlib's object API on an Agg canvas, so no global backend is switched.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Mapping, Sequence

from capture_jax import storage
from capture_jax.retrieval.metrics import DEFAULT_RANKS

METRIC_NAMES = ('mAP', 'Prec', 'mAR')
REPORT_FILE = 'report.md'
METRICS_FILE = 'metrics.json'
PLOT_FILE = 'metrics.png'


@dataclasses.dataclass(frozen=True)
class ListedResult:
  """One retrieved gallery item of a listing."""

  gallery_id: str
  label: str | None
  hit: bool
  title: str = ''


@dataclasses.dataclass(frozen=True)
class QueryListing:
  """A query and its top results."""

  query_id: str
  title: str
  labels: list[str]
  results: list[ListedResult]


def build_listing(
    query_id: str,
    query_labels: Sequence[str],
    ranked_ids: Sequence[str],
    gallery_labels: Mapping[str, str],
    titles: Mapping[str, str] | None = None,
    top: int = 10,
) -> QueryListing:
  """The listing of one query: a result is a hit when its label is one of the query's."""
  titles = titles or {}
  wanted = set(query_labels)
  results = []
  for gid in list(ranked_ids)[:top]:
    label = gallery_labels.get(gid)
    results.append(
        ListedResult(gid, label, label is not None and label in wanted, titles.get(gid, ''))
    )
  return QueryListing(query_id, titles.get(query_id, ''), list(query_labels), results)


def column_names(ranks: Sequence[int] = DEFAULT_RANKS) -> list[str]:
  """Metric keys in table order: mAP@R..., Prec@R..., mAR@R..."""
  return [f'{m}@{r}' for m in METRIC_NAMES for r in ranks]


def _cell(text: str) -> str:
  return str(text).replace('|', '\\|').replace('\n', ' ')


def metrics_table(
    metrics: Mapping[str, Mapping[str, float]], ranks: Sequence[int] = DEFAULT_RANKS
) -> str:
  """A markdown table: one row per method, values x100 with two decimals."""
  cols = column_names(ranks)
  lines = ['| Method | ' + ' | '.join(cols) + ' |', '|---|' + '---:|' * len(cols)]
  for method, values in metrics.items():
    missing = [c for c in cols if c not in values]
    if missing:
      raise KeyError(f'method {method!r} lacks metrics {missing}')
    lines.append(
        f'| {_cell(method)} | ' + ' | '.join(f'{100 * values[c]:.2f}' for c in cols) + ' |'
    )
  return '\n'.join(lines)


def parse_metrics_table(markdown: str) -> dict[str, dict[str, float]]:
  """Reads the first metrics table of a report back: method -> {metric: percent}."""
  rows: dict[str, dict[str, float]] = {}
  header: list[str] | None = None
  for line in markdown.splitlines():
    if not line.startswith('|'):
      if header is not None and rows:
        break
      continue
    cells = [c.strip() for c in line.strip().strip('|').split(' | ')]
    if header is None:
      if cells[0] == 'Method':
        header = cells[1:]
      continue
    if set(line.replace('|', '').strip()) <= set('-: '):
      continue
    rows[cells[0].replace('\\|', '|')] = {h: float(v) for h, v in zip(header, cells[1:])}
  if header is None:
    raise ValueError('no metrics table found')
  return rows


def best_methods(
    metrics: Mapping[str, Mapping[str, float]], ranks: Sequence[int] = DEFAULT_RANKS
) -> dict[str, str]:
  """Metric -> the method scoring highest on it (first listed on a tie)."""
  return {c: max(metrics, key=lambda m: metrics[m][c]) for c in column_names(ranks)}


def format_listing(listing: QueryListing, method: str | None = None) -> str:
  """Markdown for one query: title, labels, then its results with labels and hits."""
  label_counts: dict[str, int] = {}
  for lab in listing.labels:
    label_counts[lab] = label_counts.get(lab, 0) + 1
  labels = '; '.join(f'{lab} (x{n})' if n > 1 else lab for lab, n in label_counts.items())
  head = f'### Query {listing.query_id}' + (f' ({method})' if method else '')
  n_hits = sum(r.hit for r in listing.results)
  lines = [
      head,
      '',
      f'- Title: {_cell(listing.title) or "(none)"}',
      f'- Labels: {_cell(labels)}',
      f'- Hits in the top {len(listing.results)}: {n_hits}',
      '',
      '| Rank | Gallery id | Label | Hit | Title |',
      '|---:|---|---|:---:|---|',
  ]
  for rank, r in enumerate(listing.results, start=1):
    lines.append(
        f'| {rank} | {_cell(r.gallery_id)} | {_cell(r.label or "(not in gallery)")}'
        f' | {"yes" if r.hit else "no"} | {_cell(r.title)} |'
    )
  return '\n'.join(lines)


def plot_metrics(
    metrics: Mapping[str, Mapping[str, float]],
    path: storage.PathLike,
    ranks: Sequence[int] = DEFAULT_RANKS,
) -> storage.Path:
  """One panel per metric, each method a line over R (values in percent)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(4.0 * len(METRIC_NAMES), 3.6), layout='constrained')
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(METRIC_NAMES))
  for ax, name in zip(axes, METRIC_NAMES):
    for method, values in metrics.items():
      ax.plot(list(ranks), [100 * values[f'{name}@{r}'] for r in ranks], marker='o', label=method)
    ax.set_title(f'{name}@R')
    ax.set_xlabel('R')
    ax.set_xticks(list(ranks))
    ax.set_ylabel('%')
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize='small')
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=100)
  storage.write_bytes(path, buffer.getvalue())
  return storage.as_path(path)


def write_report(
    out_dir: storage.PathLike,
    metrics: Mapping[str, Mapping[str, float]],
    listings: Mapping[str, Sequence[QueryListing]] | None = None,
    *,
    title: str = 'Product1M instance-level retrieval',
    notes: Sequence[str] = (),
    ranks: Sequence[int] = DEFAULT_RANKS,
) -> dict[str, storage.Path]:
  """Writes ``report.md``, ``metrics.json`` and ``metrics.png`` into ``out_dir``.

  Args:
    metrics: method -> {"mAP@10": fraction, ...} (``evaluate_ranked_lists``).
    listings: method -> query listings to show (``build_listing``).
    notes: extra lines under the title (data, command, checkpoint).

  Returns:
    {"report": path, "metrics": path, "plot": path}.
  """
  if not metrics:
    raise ValueError('no methods to report')
  out_dir = storage.as_path(out_dir)
  storage.makedirs(out_dir)
  paths = {
      'report': out_dir / REPORT_FILE,
      'metrics': out_dir / METRICS_FILE,
      'plot': out_dir / PLOT_FILE,
  }
  table = metrics_table(metrics, ranks)
  plot_metrics(metrics, paths['plot'], ranks)
  best = best_methods(metrics, ranks)
  parts = [f'# {title}', '']
  parts += [f'{n}' for n in notes] + ([''] if notes else [])
  parts += [
      'Official Product1M metrics (evaluate_suit.py arithmetic), in percent.',
      '',
      table,
      '',
      'Best per metric: ' + ', '.join(f'{c}: {best[c]}' for c in column_names(ranks)),
      '',
      f'![metrics against R]({PLOT_FILE})',
      '',
  ]
  for method, items in (listings or {}).items():
    if items:
      parts += [f'## Example queries: {method}', '']
      for listing in items:
        parts += [format_listing(listing, method), '']
  storage.write_text(paths['report'], '\n'.join(parts))
  storage.write_text(
      paths['metrics'],
      json.dumps({m: dict(v) for m, v in metrics.items()}, indent=2, ensure_ascii=False) + '\n',
  )
  return paths
