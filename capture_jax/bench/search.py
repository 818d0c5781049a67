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

import dataclasses
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from absl import flags

from capture_jax import cli
from capture_jax import losses
from capture_jax.retrieval.search import (
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


@dataclasses.dataclass(frozen=True)
class Settings:
  """What ``run`` measures; the defaults are the command's (the Product1M dev size)."""

  queries: int = 2673
  gallery: int = 40033
  dim: int = 1024
  k: int = 100
  repeats: int = 3
  warmup: int = 1  # untimed runs first
  data: str = 'random'  # 'random' or 'clustered'
  query_chunk: int = 1024
  gallery_chunk: int = 65536
  gallery_dtype: str = 'float32'  # 'float32' or 'float16'
  faiss: tuple[str, ...] = ('ivf', 'hnsw')  # approximate indexes, each of FAISS_KINDS
  faiss_flat: bool = True  # the FAISS IndexFlatIP exact reference
  nlist: int | None = None
  nprobe: tuple[int, ...] = (16, 64)
  hnsw_m: int = 32
  ef_construction: int = 100
  ef_search: tuple[int, ...] = (128, 512)
  seed: int = 0


DATA_KINDS = ('random', 'clustered')
GALLERY_DTYPES = ('float32', 'float16')
FAISS_KINDS = ('ivf', 'hnsw')


def run(settings: Settings = Settings()) -> dict:
  """Runs the searches of ``settings``; returns the settings, the machine and one row per method."""
  import faiss

  q, g = make_embeddings(
      settings.queries,
      settings.gallery,
      settings.dim,
      kind=settings.data,
      dtype=settings.gallery_dtype,
      seed=settings.seed,
  )
  results: dict = {
      'queries': settings.queries,
      'gallery': settings.gallery,
      'dim': settings.dim,
      'k': settings.k,
      'data': settings.data,
      'gallery_dtype': settings.gallery_dtype,
      'repeats': settings.repeats,
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
          q, g, settings.k, query_chunk=settings.query_chunk, gallery_chunk=settings.gallery_chunk
      ),
      settings.repeats,
      settings.warmup,
  )
  results['rows'].append(
      {
          'method': f'exact_topk (JAX, {settings.gallery_dtype} gallery)',
          'build_s': 0.0,
          'search_s': exact_s,
          'recall': 1.0,
      }
  )
  if settings.faiss_flat:
    flat = faiss.IndexFlatIP(settings.dim)
    flat.add(np.asarray(g, np.float32))
    flat_s, (_, flat_idx) = median_time(
        lambda: flat.search(q, settings.k), settings.repeats, settings.warmup
    )
    results['rows'].append(
        {
            'method': 'FAISS IndexFlatIP (exact)',
            'build_s': 0.0,
            'search_s': flat_s,
            'recall': recall_at_k(flat_idx, exact_idx),
        }
    )
    del flat
  for kind in settings.faiss:
    t0 = time.perf_counter()
    index = build_faiss_index(
        g,
        kind=kind,
        nlist=settings.nlist,
        hnsw_m=settings.hnsw_m,
        ef_construction=settings.ef_construction,
        seed=settings.seed,
    )
    build_s = time.perf_counter() - t0
    if kind == 'ivf':
      searches = [('nprobe', p) for p in settings.nprobe]
    else:
      searches = [('efSearch', e) for e in settings.ef_search]
    for name, value in searches:
      opts = {'nprobe': value} if name == 'nprobe' else {'ef_search': value}
      search_s, (_, idx) = median_time(
          lambda: faiss_search(index, q, settings.k, **opts), settings.repeats, settings.warmup
      )
      label = (
          f'FAISS IVF-flat (nlist={faiss.extract_index_ivf(index).nlist}, nprobe={value})'
          if kind == 'ivf'
          else f'FAISS HNSW (M={settings.hnsw_m}, efSearch={value})'
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


def _int_list(values: Sequence[str]) -> tuple[int, ...]:
  return tuple(int(v) for v in values)


def _is_int_list(values: Sequence[str]) -> bool:
  try:
    return bool(_int_list(values))
  except ValueError:
    return False


def define_flags() -> dict[str, flags.FlagHolder]:
  """The command's flags (defined when the command runs, not on import): the fields of
  `Settings`, and `json`."""
  d = Settings()
  args = {
      'queries': flags.DEFINE_integer('queries', d.queries, 'Query vectors.'),
      'gallery': flags.DEFINE_integer('gallery', d.gallery, 'Gallery vectors.'),
      'dim': flags.DEFINE_integer('dim', d.dim, 'Embedding width.'),
      'k': flags.DEFINE_integer('k', d.k, 'Top-k searched (recall@k reported).'),
      'repeats': flags.DEFINE_integer('repeats', d.repeats, 'Timed runs (median reported).'),
      'warmup': flags.DEFINE_integer('warmup', d.warmup, 'Untimed runs first.'),
      'data': flags.DEFINE_enum('data', d.data, DATA_KINDS, 'Vector distribution.'),
      'query_chunk': flags.DEFINE_integer('query_chunk', d.query_chunk, 'exact_topk query chunk.'),
      'gallery_chunk': flags.DEFINE_integer(
          'gallery_chunk', d.gallery_chunk, 'exact_topk gallery chunk.'
      ),
      'gallery_dtype': flags.DEFINE_enum(
          'gallery_dtype', d.gallery_dtype, GALLERY_DTYPES, 'Host dtype of the gallery.'
      ),
      'faiss': flags.DEFINE_list(
          'faiss',
          list(d.faiss),
          f'Comma-separated approximate indexes of {",".join(FAISS_KINDS)} (none: --faiss=).',
      ),
      'faiss_flat': flags.DEFINE_bool(
          'faiss_flat',
          d.faiss_flat,
          'Also time the FAISS IndexFlatIP exact reference (skip it: --nofaiss_flat).',
      ),
      'nlist': flags.DEFINE_integer('nlist', d.nlist, 'IVF lists (default: chosen by size).'),
      'nprobe': flags.DEFINE_list(
          'nprobe', [str(v) for v in d.nprobe], 'Comma-separated IVF nprobe values.'
      ),
      'hnsw_m': flags.DEFINE_integer('hnsw_m', d.hnsw_m, 'HNSW M.'),
      'ef_construction': flags.DEFINE_integer(
          'ef_construction', d.ef_construction, 'HNSW efConstruction.'
      ),
      'ef_search': flags.DEFINE_list(
          'ef_search', [str(v) for v in d.ef_search], 'Comma-separated HNSW efSearch values.'
      ),
      'seed': flags.DEFINE_integer('seed', d.seed, 'Random seed of the vectors and indexes.'),
      'json': flags.DEFINE_string('json', None, 'Also write the results here.'),
  }
  flags.register_validator(
      'faiss',
      lambda v: set(v) <= set(FAISS_KINDS),
      message=f'--faiss takes a comma-separated subset of {",".join(FAISS_KINDS)}',
  )
  for name in ('nprobe', 'ef_search'):
    flags.register_validator(
        name, _is_int_list, message=f'--{name} takes one or more comma-separated integers'
    )

  return args


def main(args: dict[str, flags.FlagHolder]) -> int:
  values = {name: flag.value for name, flag in args.items() if name != 'json'}
  values['faiss'] = tuple(values['faiss'])
  values['nprobe'] = _int_list(values['nprobe'])
  values['ef_search'] = _int_list(values['ef_search'])
  results = run(Settings(**values))
  print(json.dumps(results['machine']))
  print(f'peak RSS {results["peak_rss_gib"]:.2f} GiB')
  print(markdown_rows(results))
  if args['json'].value:
    with open(args['json'].value, 'w') as f:
      json.dump(results, f, indent=2)
  return 0


def console_main() -> None:
  """`python -m capture_jax.bench.search`."""
  cli.run_command(define_flags, main, required=())


if __name__ == '__main__':
  console_main()
