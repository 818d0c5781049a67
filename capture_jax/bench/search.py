"""Times retrieval search at the Product1M dev size.

``python -m capture_jax.bench.search`` searches 2,673 queries against
40,033 gallery items of width 1,024 (the fused CAPTURE embedding: 512 text +
512 visual), top-100 by cosine:

* exact, with ``exact_topk`` (JAX, on whatever devices exist);
* exact, with FAISS ``IndexFlatIP`` (a second exact reference);
* approximate, with FAISS IVF-flat and HNSW: build time, search time and
  recall@100 against the exact lists.

Timings are medians over ``--repeats`` runs after one warm-up run (which
includes compilation). ``--data random`` draws i.i.d. Gaussian vectors (the
hardest case for IVF/HNSW: no cluster structure); ``--data clustered`` draws
them around 458 centres (the Product1M category count), closer to real
embeddings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from capture_jax import losses
from capture_jax.evaluation.search import (
    build_faiss_index,
    exact_topk,
    faiss_search,
    recall_at_k,
)


def make_embeddings(
    n_query: int,
    n_gallery: int,
    dim: int,
    *,
    kind: str = 'random',
    n_centres: int = 458,
    spread: float = 0.5,
    dtype: str = 'float32',
    chunk: int = 65536,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
  """L2-normalised queries [Q, D] (float32) and gallery [N, D] (``dtype``).

  The gallery is drawn ``chunk`` rows at a time straight into its final
  dtype, so a 1,000,000 x 1,024 float16 gallery costs 2 GB, not 8.
  """
  rng = np.random.default_rng(seed)
  centres = rng.standard_normal((n_centres, dim), np.float32) if kind == 'clustered' else None
  if kind not in ('random', 'clustered'):
    raise ValueError(f'unknown data kind {kind!r}')

  def draw(n: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), np.float32)
    if centres is not None:
      x = centres[rng.integers(n_centres, size=n)] + spread * x
    return np.asarray(losses.l2_normalize(x), np.float32)

  q = draw(n_query)
  g = np.empty((n_gallery, dim), dtype)
  for start in range(0, n_gallery, chunk):
    g[start : start + chunk] = draw(min(chunk, n_gallery - start))
  return q, g


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, object]:
  """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
  out = None
  for _ in range(warmup):
    out = fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), out


def run(args: argparse.Namespace) -> dict:
  import faiss

  q, g = make_embeddings(
      args.queries, args.gallery, args.dim, kind=args.data, dtype=args.gallery_dtype, seed=args.seed
  )
  results: dict = {
      'queries': args.queries,
      'gallery': args.gallery,
      'dim': args.dim,
      'k': args.k,
      'data': args.data,
      'gallery_dtype': args.gallery_dtype,
      'repeats': args.repeats,
      'machine': {
          'cpu_count': os.cpu_count(),
          'platform': platform.platform(),
          'jax_devices': [str(d) for d in jax.devices()],
          'faiss_threads': faiss.omp_get_max_threads(),
          'loadavg_1min_before': os.getloadavg()[0],
      },
      'rows': [],
  }
  exact_s, (_, exact_idx) = median_time(
      lambda: exact_topk(
          q, g, args.k, query_chunk=args.query_chunk, gallery_chunk=args.gallery_chunk
      ),
      args.repeats,
      args.warmup,
  )
  results['rows'].append(
      {
          'method': f'exact_topk (JAX, {args.gallery_dtype} gallery)',
          'build_s': 0.0,
          'search_s': exact_s,
          'recall': 1.0,
      }
  )
  if args.faiss_flat:
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(np.asarray(g, np.float32))
    flat_s, (_, flat_idx) = median_time(lambda: flat.search(q, args.k), args.repeats, args.warmup)
    results['rows'].append(
        {
            'method': 'FAISS IndexFlatIP (exact)',
            'build_s': 0.0,
            'search_s': flat_s,
            'recall': recall_at_k(flat_idx, exact_idx),
        }
    )
    del flat
  for kind in args.faiss:
    t0 = time.perf_counter()
    index = build_faiss_index(
        g,
        kind=kind,
        nlist=args.nlist,
        hnsw_m=args.hnsw_m,
        ef_construction=args.ef_construction,
        seed=args.seed,
    )
    build_s = time.perf_counter() - t0
    if kind == 'ivf':
      settings = [('nprobe', p) for p in args.nprobe]
    else:
      settings = [('efSearch', e) for e in args.ef_search]
    for name, value in settings:
      opts = {'nprobe': value} if name == 'nprobe' else {'ef_search': value}
      search_s, (_, idx) = median_time(
          lambda: faiss_search(index, q, args.k, **opts), args.repeats, args.warmup
      )
      label = (
          f'FAISS IVF-flat (nlist={faiss.extract_index_ivf(index).nlist}, nprobe={value})'
          if kind == 'ivf'
          else f'FAISS HNSW (M={args.hnsw_m}, efSearch={value})'
      )
      results['rows'].append(
          {
              'method': label,
              'build_s': build_s,
              'search_s': search_s,
              'recall': recall_at_k(idx, exact_idx),
          }
      )
  results['machine']['loadavg_1min_after'] = os.getloadavg()[0]
  # Linux reports ru_maxrss in KiB.
  results['peak_rss_gib'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  return results


def markdown_rows(results: dict) -> str:
  """A markdown table of the rows of ``run``."""
  lines = [
      f'| Method ({results["data"]} data) | Build (s) | Search (s) | Recall@{results["k"]} |',
      '|---|---:|---:|---:|',
  ]
  for r in results['rows']:
    lines.append(
        f'| {r["method"]} | {r["build_s"]:.2f} | {r["search_s"]:.2f} | {r["recall"]:.4f} |'
    )
  return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--queries', type=int, default=2673)
  parser.add_argument('--gallery', type=int, default=40033)
  parser.add_argument('--dim', type=int, default=1024)
  parser.add_argument('--k', type=int, default=100)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--warmup', type=int, default=1, help='untimed runs first')
  parser.add_argument('--data', choices=('random', 'clustered'), default='random')
  parser.add_argument('--query_chunk', type=int, default=1024)
  parser.add_argument('--gallery_chunk', type=int, default=65536)
  parser.add_argument('--gallery_dtype', choices=('float32', 'float16'), default='float32')
  parser.add_argument(
      '--faiss',
      nargs='*',
      default=['ivf', 'hnsw'],
      choices=('ivf', 'hnsw'),
      help='approximate indexes (none: no flag value)',
  )
  parser.add_argument(
      '--no_faiss_flat',
      dest='faiss_flat',
      action='store_false',
      help='skip the FAISS IndexFlatIP exact reference',
  )
  parser.add_argument('--nlist', type=int, default=None)
  parser.add_argument('--nprobe', type=int, nargs='+', default=[16, 64])
  parser.add_argument('--hnsw_m', type=int, default=32)
  parser.add_argument('--ef_construction', type=int, default=100)
  parser.add_argument('--ef_search', type=int, nargs='+', default=[128, 512])
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--json', default=None, help='also write the results here')
  args = parser.parse_args(argv)
  results = run(args)
  print(json.dumps(results['machine']))
  print(f'peak RSS {results["peak_rss_gib"]:.2f} GiB')
  print(markdown_rows(results))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
