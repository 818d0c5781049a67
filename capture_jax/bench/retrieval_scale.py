r"""Retrieval at Product1M's size: export, proposals, search and metrics, timed stage by stage.

Writes Product1M-format annotation files of a synthetic world at the real
protocol's sizes (a gallery of `--num_gallery` single-product items over ~460
products, `--num_queries` multi-product queries of the `test` split whose 1 to 7
labels are all in the gallery, drawn with the label-count distribution of the
real dev file, and a small train split), builds them with paper-size features
made on the fly (`generated:36x2048`, the streaming build, `--build_workers`
processes), trains the demo model at paper feature size (36 x 2,048) for
`--train_steps` steps (the weights do not matter for timing: every stage's
compute is the same with any weights), then times each stage in its own
process, by the wall clock, with its peak RSS (`os.wait4` in a fresh launcher
process: the largest of the command and the children it waited for):

    nice -n 10 python -m capture_jax.bench.retrieval_scale --work_dir /tmp/w22/rs

| stage | command |
|---|---|
| build | `python -m capture_jax.data.product1m_tfds --features generated:36x2048 --num_workers 2` |
| vocab, train | `python -m capture_jax.data.tokenizer train`, `python -m capture_jax.train` |
| export_gallery, export_queries | `python -m capture_jax.export --split=gallery` / `--split=test` |
| proposals | `python -m capture_jax.instances propose --methods=boxes --split=test` |
| export_instances | `python -m capture_jax.export --split=test --instances` (boxes; proposes again) |
| evaluate | `python -m capture_jax.evaluate` on the three exports, `eval.baselines=False` |
| metrics | `python -m capture_jax.retrieval.metrics` on its `retrieval_id_list.txt` |
| paper_export | `python -m capture_jax.export --random_init` of `configs/capture_paper.py` (148 M) |
| aot | `python -m capture_jax.aot --steps=export --target=h200x8`: FLOPs per exported row |

`evaluate` reports its own `search_seconds` and `stage_seconds` (plan,
export, rank, score, results; evaluation.json): `score` is the official
metrics of its ranked lists. They are also timed here, file by file
(`metrics.evaluate_ranked_lists` on every ranked-list file it wrote, after
reading the ground truth and the lists), and a float32 matmul's GFLOP/s
(numpy and jax, 4,096^3) gives the machine's compute rate to quote the
stages against. Every stage's figures go to `{work_dir}/results.jsonl` (one
JSON line per stage) and a table is printed at the end. `--stages` runs a
subset, in the order given (they read what the earlier ones wrote; `matmul`,
`annotations` and `paper_build`, the paper model's few hundred gallery items,
are stages too). The commands' logs are in `{work_dir}/logs/`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from typing import Iterator, Sequence

from absl import flags
import numpy as np

from capture_jax import cli
from capture_jax.data import formats
from capture_jax.data import synthetic

QUERY_SPLIT = 'test'  # Product1M's 6,547 queries are its test split
# Labels per query in the real dev file (../shared/product1m/product1m_dev_ossurl_v2.txt,
# 2,673 lines): count -> queries. Mean 2.79; no query has 6.
REAL_LABEL_COUNTS = {1: 53, 2: 1213, 3: 926, 4: 304, 5: 151, 7: 26}
FEATURES = 'generated:36x2048'
# The demo model (configs/demo.py) at the paper's region features.
PAPER_FEATURES = (
    '--config.model.v_feature_size=2048',
    '--config.model.v_target_size=2048',
    '--config.data.feature_dim=2048',
    '--config.data.max_regions=36',
)


# --------------------------------------------------------------------------
# The annotation files.


@dataclasses.dataclass(frozen=True)
class Sizes:
  num_gallery: int
  num_queries: int
  num_train: int


def item_id(split: str, index: int) -> str:
  """12-digit numeric ids like Product1M's, unique across splits."""
  return f'{formats.SPLITS.index(split) + 1}{index:011d}'


def gallery_product(index: int, num_products: int) -> int:
  """The product of gallery item `index`: round-robin, so every product has
  floor or ceil(num_gallery / num_products) gallery items."""
  return index % num_products


def query_products(world: synthetic.World, rng: np.random.Generator) -> list[int]:
  """The products of one query: one brand (as every real query), 1 to 7 distinct products of
  it, the count drawn from `REAL_LABEL_COUNTS`."""
  counts = np.array(list(REAL_LABEL_COUNTS))
  p = np.array(list(REAL_LABEL_COUNTS.values()), np.float64)
  n = int(rng.choice(counts, p=p / p.sum()))
  pool = world.brand_products[int(rng.integers(len(world.brand_products)))]
  return [int(i) for i in rng.choice(pool, size=min(n, len(pool)), replace=False)]


def iter_split(
    world: synthetic.World, split: str, count: int, seed: int = 0
) -> Iterator[formats.Annotation]:
  """`count` annotations of `split`: gallery (one label), the query split (several) or train
  (none); synthetic titles (`synthetic.make_title`) naming the products."""
  rng = np.random.default_rng([seed, formats.SPLITS.index(split)])
  num_products = len(world.products)
  for i in range(count):
    if split == 'gallery':
      products = [gallery_product(i, num_products)]
    elif split == 'train':
      products = [int(rng.integers(num_products))]
    else:
      products = query_products(world, rng)
    labels = () if split == 'train' else tuple(world.products[p].label for p in products)
    iid = item_id(split, i)
    yield formats.Annotation(
        iid,
        synthetic.make_title(world, rng, products),
        f'https://img.example.invalid/product1m/{iid}.jpg',
        f'http://mirror.example.invalid/product1m/datasets/images/{iid}.jpg',
        labels,
    )


def write_annotations(data_dir: str, sizes: Sizes, seed: int = 0) -> dict[str, int]:
  """The gallery, query and train annotation files of a `large`-preset world (~460 products
  of 46 brands, like Product1M's 458) in `data_dir`; returns split -> lines."""
  world = synthetic.make_world(synthetic.PRESETS['large'], seed)
  if sizes.num_gallery < len(world.products):
    raise ValueError(
        f"num_gallery={sizes.num_gallery} is below the world's {len(world.products)} products: "
        'some query labels would have no gallery item'
    )
  os.makedirs(data_dir, exist_ok=True)
  out = {}
  for split, count in (
      ('gallery', sizes.num_gallery),
      (QUERY_SPLIT, sizes.num_queries),
      ('train', sizes.num_train),
  ):
    path = os.path.join(data_dir, formats.annotation_filename(split))
    out[split] = formats.write_annotations(path, iter_split(world, split, count, seed))
  return out


# --------------------------------------------------------------------------
# Timing a command.


# Runs argv and prints its wall seconds and rusage. Launched fresh so that the rusage is the
# command's alone: a child's ru_maxrss starts at its parent's RSS at the fork (Linux records
# the forked copy's high-water mark at exec), so a command forked from this process (or from
# pytest) would report at least this process's RSS.
_LAUNCHER = """
import json, os, subprocess, sys, time
t = time.perf_counter()
p = subprocess.Popen(sys.argv[2:])
_, status, ru = os.wait4(p.pid, 0)
with open(sys.argv[1], 'w') as f:
  json.dump({'wall_s': time.perf_counter() - t, 'exit': os.waitstatus_to_exitcode(status),
             'peak_rss_mb': ru.ru_maxrss / 1024, 'cpu_s': ru.ru_utime + ru.ru_stime}, f)
"""


def timed(name: str, argv: Sequence[str], log_dir: str, env: dict | None = None) -> dict:
  """Runs `argv` to completion; its wall seconds, peak RSS (MB: the largest of the command
  and the children it waited for), CPU seconds, the load around it, and its output.

  Raises:
    RuntimeError: the command failed (the end of its log in the message).
  """
  os.makedirs(log_dir, exist_ok=True)
  log = os.path.join(log_dir, f'{name}.log')
  usage_path = os.path.join(log_dir, f'{name}.usage.json')
  load = os.getloadavg()[0]
  with open(log, 'w', encoding='utf-8') as f:
    f.write(' '.join(argv) + '\n')
    f.flush()
    subprocess.run(
        [sys.executable, '-c', _LAUNCHER, usage_path, *argv],
        stdout=f,
        stderr=subprocess.STDOUT,
        env=env,
        check=True,
    )
  text = open(log, encoding='utf-8', errors='replace').read()
  with open(usage_path, encoding='utf-8') as f:
    usage = json.load(f)
  if usage['exit']:
    raise RuntimeError(f'{name} failed (exit {usage["exit"]}), {log}:\n{text[-3000:]}')
  return {
      'wall_s': usage['wall_s'],
      'peak_rss_mb': usage['peak_rss_mb'],
      'cpu_s': usage['cpu_s'],
      'load_before': load,
      'load_after': os.getloadavg()[0],
      'log': log,
      'output': text,
  }


def export_figures(output: str) -> dict:
  """The compile seconds and the export loop's samples/s that `capture_jax.export` prints."""
  out = {}
  m = re.search(r'compiled the embedding step \((\w+), (\d+)-d.*?\) in ([\d.]+) s', output)
  if m:
    out.update(kind=m.group(1), dimension=int(m.group(2)), compile_s=float(m.group(3)))
  m = re.search(r'\((\d+) (?:samples|instances) rows of .*?([\d.]+) samples/s', output)
  if m:
    out.update(rows=int(m.group(1)), loop_rows_per_s=float(m.group(2)))
  return out


# --------------------------------------------------------------------------
# In-process measurements.


def matmul_gflops(n: int = 4096, repeats: int = 5) -> dict:
  """Median float32 GFLOP/s of an n x n x n matmul with numpy and with jitted jax."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  a = np.random.default_rng(0).random((n, n), dtype=np.float32)
  b = np.random.default_rng(1).random((n, n), dtype=np.float32)

  def rate(fn) -> float:
    fn()  # warm-up (and compile)
    times = []
    for _ in range(repeats):
      t = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t)
    return 2 * n**3 / float(np.median(times)) / 1e9

  dot = jax.jit(jnp.dot)
  ja, jb = jnp.asarray(a), jnp.asarray(b)
  return {
      'numpy_gflops': rate(lambda: a @ b),
      'jax_gflops': rate(lambda: dot(ja, jb).block_until_ready()),
      'n': n,
  }


def score_ranked_lists(data_dir: str, eval_dir: str) -> dict:
  """Seconds to read the ground truth and every ranked-list file `evaluate` wrote, and to
  compute the official metrics of each (`metrics.evaluate_ranked_lists`)."""
  from capture_jax.retrieval import metrics  # pylint: disable=import-outside-toplevel

  t = time.perf_counter()
  gt = metrics.read_ground_truth(data_dir, QUERY_SPLIT)
  read_gt = time.perf_counter() - t
  out = {'read_ground_truth_s': read_gt, 'methods': {}}
  folder = os.path.join(eval_dir, 'ranked_lists')
  for name in sorted(os.listdir(folder)):
    t = time.perf_counter()
    ranked = metrics.read_ranked_lists(os.path.join(folder, name))
    read = time.perf_counter() - t
    t = time.perf_counter()
    m = metrics.evaluate_ranked_lists(ranked, gt.query_labels, gt.gallery_labels)
    out['methods'][name] = {
        'queries': len(ranked),
        'read_s': read,
        'score_s': time.perf_counter() - t,
        'mAP@10': m['mAP@10'],
    }
  return out


# --------------------------------------------------------------------------
# The stages.


class Paths:
  """Where each stage reads and writes, under `work_dir`."""

  def __init__(self, work_dir: str):
    at = lambda rel: os.path.join(work_dir, rel)
    self.work_dir = work_dir
    self.data, self.tfds, self.vocab = at('data'), at('tfds'), at('vocab.txt')
    self.run, self.emb, self.proposals = at('run'), at('embeddings'), at('proposals')
    self.eval, self.logs = at('eval'), at('logs')
    self.paper_data, self.paper_tfds = at('paper/data'), at('paper/tfds')
    self.paper_run = at('paper/run')


def data_flags(data: str, tfds: str, vocab: str) -> list[str]:
  return [
      f'--config.data.data_dir={data}',
      f'--config.data.tfds_dir={tfds}',
      f'--config.data.vocab_file={vocab}',
  ]


def demo_flags(p: Paths) -> list[str]:
  """The demo model at 36 x 2,048 on the rehearsal's data, with box proposals."""
  return [
      '--config=configs/demo.py',
      f'--workdir={p.run}',
      *PAPER_FEATURES,
      *data_flags(p.data, p.tfds, p.vocab),
      '--config.eval.instances=boxes',
      '--config.eval.progress_bar=False',
  ]


def py(module: str, *args: str) -> list[str]:
  return [sys.executable, '-m', module, *args]


def run_module(stage: str, p: Paths, module: str, *args: str, fresh: str | None = None) -> dict:
  """`python -m module args` as the stage `stage` (`timed`, its log in `p.logs`).

  `fresh`: the folder the stage writes, removed first, so that a rerun starts from nothing.
  """
  if fresh is not None:
    shutil.rmtree(fresh, ignore_errors=True)
  return timed(stage, py(module, *args), p.logs)


def _matmul(stage: str, p: Paths, sizes: Sizes, args: dict) -> dict:
  """The machine's float32 matmul rate (numpy and jax)."""
  del stage, sizes, args
  return {'wall_s': None, **matmul_gflops()}


def _annotations(stage: str, p: Paths, sizes: Sizes, args: dict) -> dict:
  """The gallery, query and train annotation files."""
  del stage, args
  t = time.perf_counter()
  counts = write_annotations(p.data, sizes)
  return {'wall_s': time.perf_counter() - t, 'rows': sum(counts.values()), 'counts': counts}


def _build(stage: str, p: Paths, sizes: Sizes, args: dict) -> dict:
  """The dataset (`build`), or the paper model's few gallery items alone (`paper_build`)."""
  del sizes
  data, tfds = (p.data, p.tfds) if stage == 'build' else (p.paper_data, p.paper_tfds)
  if stage == 'paper_build':  # the first `paper_rows` gallery items, alone
    os.makedirs(data, exist_ok=True)
    name = formats.annotation_filename('gallery')
    with open(os.path.join(p.data, name), encoding='utf-8') as src:
      lines = list(itertools.islice(src, args['paper_rows']))
    if len(lines) < args['paper_rows']:
      raise ValueError(
          f'--paper_rows={args["paper_rows"]} is more than the {len(lines)} gallery items of '
          f'{os.path.join(p.data, name)}'
      )
    with open(os.path.join(data, name), 'w', encoding='utf-8') as dst:
      dst.writelines(lines)
  r = run_module(
      stage,
      p,
      'capture_jax.data.product1m_tfds',
      f'--data_dir={data}',
      f'--out={tfds}',
      f'--vocab={p.vocab}',
      f'--features={FEATURES}',
      '--max_regions=36',
      '--feature_dim=2048',
      f'--num_workers={args["build_workers"]}',
      fresh=tfds,
  )
  counts = {
      m.group(1): int(m.group(2)) for m in re.finditer(r'^(\w+): (\d+) examples', r['output'], re.M)
  }
  disk = sum(
      os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(tfds) for f in files
  )
  return {**r, 'rows': sum(counts.values()), 'counts': counts, 'disk_bytes': disk}


def _vocab(stage: str, p: Paths, sizes: Sizes, args: dict) -> dict:
  """The WordPiece vocab of the train and gallery titles."""
  del sizes, args
  return run_module(
      stage,
      p,
      'capture_jax.data.tokenizer',
      'train',
      f'--data_dir={p.data}',
      '--vocab_size=2000',
      f'--out={p.vocab}',
      '--splits=train,gallery',
      '--overwrite',
  )


def _train(stage: str, p: Paths, sizes: Sizes, args: dict) -> dict:
  """The demo model at paper feature sizes, a few steps, for a checkpoint."""
  del sizes
  return run_module(
      stage,
      p,
      'capture_jax.train',
      *demo_flags(p),
      f'--config.train.num_steps={args["train_steps"]}',
      '--config.train.log_every=1',
      fresh=p.run,
  )


def _export(stage: str, p: Paths, sizes: Sizes, args: dict) -> dict:
  """One export: the gallery, the whole queries or their instance rows."""
  del sizes, args
  split = 'gallery' if stage == 'export_gallery' else QUERY_SPLIT
  extra = ['--instances'] if stage == 'export_instances' else []
  r = run_module(
      stage,
      p,
      'capture_jax.export',
      *demo_flags(p),
      f'--split={split}',
      f'--out={os.path.join(p.emb, stage[len("export_"):])}',
      '--overwrite',
      *extra,
  )
  return {**r, **export_figures(r['output'])}


def _proposals(stage: str, p: Paths, sizes: Sizes, args: dict) -> dict:
  """Box proposals of the query split."""
  del sizes, args
  r = run_module(
      stage,
      p,
      'capture_jax.instances',
      'propose',
      *demo_flags(p),
      f'--split={QUERY_SPLIT}',
      '--methods=boxes',
      f'--out={p.proposals}',
  )
  path = os.path.join(p.proposals, 'boxes', f'proposals_{QUERY_SPLIT}.jsonl')
  with open(path, encoding='utf-8') as f:
    per_query = [len(json.loads(line)['instances']) for line in f]
  return {
      **r,
      'rows': len(per_query),
      'proposals': int(np.sum(per_query)),
      'proposals_per_query': float(np.mean(per_query)),
  }


def _evaluate(stage: str, p: Paths, sizes: Sizes, args: dict) -> dict:
  """The evaluation of the three exports (no export, no baselines)."""
  del sizes, args
  r = run_module(
      stage,
      p,
      'capture_jax.evaluate',
      *demo_flags(p),
      f'--split={QUERY_SPLIT}',
      f'--out={p.eval}',
      '--config.eval.baselines=False',
      f'--gallery_embeddings={os.path.join(p.emb, "gallery")}',
      f'--query_embeddings={os.path.join(p.emb, "queries")}',
      f'--instance_embeddings={os.path.join(p.emb, "instances")}',
      fresh=p.eval,
  )
  with open(os.path.join(p.eval, 'evaluation.json'), encoding='utf-8') as f:
    summary = json.load(f)
  return {
      **r,
      'rows': summary['counts']['queries'] + summary['counts']['instances'],
      'counts': summary['counts'],
      'search_seconds': summary['search_seconds'],
      'stage_seconds': summary['stage_seconds'],
      'mAP@10': {k: v['mAP@10'] for k, v in summary['metrics'].items()},
  }


def _metrics(stage: str, p: Paths, sizes: Sizes, args: dict) -> dict:
  """The official metrics command on the evaluation's ranked ids, and in process."""
  del args
  r = run_module(
      stage,
      p,
      'capture_jax.retrieval.metrics',
      f'--gt_dir={p.data}',
      f'--ranked={os.path.join(p.eval, "retrieval_id_list.txt")}',
      f'--split={QUERY_SPLIT}',
  )
  return {**r, 'rows': sizes.num_queries, 'in_process': score_ranked_lists(p.data, p.eval)}


def _paper_export(stage: str, p: Paths, sizes: Sizes, args: dict) -> dict:
  """The paper model's export of `paper_rows` gallery items (random weights)."""
  del sizes, args
  r = run_module(
      stage,
      p,
      'capture_jax.export',
      '--config=configs/capture_paper.py',
      f'--workdir={p.paper_run}',
      *data_flags(p.paper_data, p.paper_tfds, p.vocab),
      '--split=gallery',
      '--random_init',
      '--config.eval.progress_bar=False',
      fresh=p.paper_run,
  )
  return {**r, **export_figures(r['output'])}


def _aot(stage: str, p: Paths, sizes: Sizes, args: dict) -> dict:
  """FLOPs per exported row, by ahead-of-time compilation for 8 x H200."""
  del stage, sizes, args
  # The compilers of `pip install -e .[aot]`, or those `make test` keeps apart.
  compilers = os.environ.get('CAPTURE_AOT_COMPILERS', os.path.join(sys.prefix, 'aot-compilers'))
  path = os.pathsep.join(x for x in (compilers, os.environ.get('PYTHONPATH', '')) if x)
  env = {**os.environ, 'PYTHONPATH': path}
  out = {'wall_s': 0.0}
  for name, config in (
      ('demo', ['--config=configs/demo.py', *PAPER_FEATURES]),
      ('paper', ['--config=configs/capture_paper.py']),
  ):
    json_path = os.path.join(p.work_dir, f'aot_{name}.json')
    r = timed(
        f'aot_{name}',
        py('capture_jax.aot', *config, '--target=h200x8', '--steps=export', f'--json={json_path}'),
        p.logs,
        env,
    )
    out['wall_s'] += r['wall_s']
    with open(json_path, encoding='utf-8') as f:
      out[name] = aot_export_row(json.load(f))
  return out


# Every stage and what runs it, in the default order of `--stages`.
STAGE_RUNNERS = {
    'matmul': _matmul,
    'annotations': _annotations,
    'vocab': _vocab,  # before the build: it tokenises the titles with it
    'build': _build,
    'train': _train,
    'export_gallery': _export,
    'export_queries': _export,
    'proposals': _proposals,
    'export_instances': _export,
    'evaluate': _evaluate,
    'metrics': _metrics,
    'paper_build': _build,
    'paper_export': _paper_export,
    'aot': _aot,
}
STAGES = tuple(STAGE_RUNNERS)


def run_stage(stage: str, p: Paths, sizes: Sizes, args: dict) -> dict:
  """Runs one stage; returns its figures (rows, wall_s, peak_rss_mb, ... as it applies)."""
  return STAGE_RUNNERS[stage](stage, p, sizes, args)


def aot_export_row(report: dict) -> dict:
  """From an `aot --steps=export` report: global FLOPs per exported row, and the rows/s of the
  target at 50% of its peak."""
  r = report['steps']['export']
  return {
      'batch': r['batch'],
      'flops_per_row': r['flops_per_device'] * report['num_devices'] / r['batch'],
      'rows_per_s_at_50pct': r['samples_per_s_at_50pct'],
      'gib_per_device': r['total_bytes'] / 2**30,
  }


def table_row(stage: str, r: dict) -> str:
  """`| stage | rows | wall | rows/s | peak RSS |` of one stage's figures."""
  rows, wall = r.get('rows'), r.get('wall_s')
  rate = f'{rows / wall:,.0f}' if rows and wall else ''
  rss = f'{r["peak_rss_mb"]:,.0f} MB' if 'peak_rss_mb' in r else ''
  return (
      f'| {stage} | {rows if rows is not None else ""} | '
      f'{f"{wall:.1f} s" if wall is not None else ""} | {rate} | {rss} |'
  )


def define_flags() -> dict[str, flags.FlagHolder]:
  """The command's flags."""
  return {
      'work_dir': flags.DEFINE_string(
          'work_dir', '/tmp/capture_retrieval_scale', 'Scratch folder.'
      ),
      'num_gallery': flags.DEFINE_integer(
          'num_gallery', 40_033, 'Gallery items (Product1M: 40,033).'
      ),
      'num_queries': flags.DEFINE_integer('num_queries', 6_547, 'Queries (Product1M test: 6,547).'),
      'num_train': flags.DEFINE_integer(
          'num_train', 512, 'Training pairs (for the checkpoint only).'
      ),
      'train_steps': flags.DEFINE_integer(
          'train_steps', 1, 'Steps of the demo model to checkpoint.'
      ),
      'build_workers': flags.DEFINE_integer('build_workers', 2, 'Build processes.'),
      'paper_rows': flags.DEFINE_integer(
          'paper_rows', 512, 'Gallery items the paper model exports.'
      ),
      'stages': flags.DEFINE_list('stages', list(STAGES), f'Stages to run, of {STAGES}.'),
  }


def main(args: dict[str, flags.FlagHolder]) -> int:
  stages = args['stages'].value
  unknown = [s for s in stages if s not in STAGES]
  if unknown:
    print(f'error: unknown stages {unknown}; expected some of {STAGES}', file=sys.stderr)
    return 1
  p = Paths(args['work_dir'].value)
  os.makedirs(p.work_dir, exist_ok=True)
  sizes = Sizes(args['num_gallery'].value, args['num_queries'].value, args['num_train'].value)
  stage_args = {k: args[k].value for k in ('train_steps', 'build_workers', 'paper_rows')}
  print(f'machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs')
  results = os.path.join(p.work_dir, 'results.jsonl')
  lines = []
  for stage in stages:
    r = run_stage(stage, p, sizes, stage_args)
    r.pop('output', None)
    r = {'stage': stage, 'date': time.strftime('%Y-%m-%d %H:%M'), **r}
    with open(results, 'a', encoding='utf-8') as f:
      f.write(json.dumps(r) + '\n')
    print(json.dumps(r), flush=True)
    lines.append(table_row(stage, r))
  print('| stage | rows | wall | rows/s | peak RSS |\n|---|---:|---:|---:|---:|')
  print('\n'.join(lines))
  return 0


def console_main() -> None:
  """`python -m capture_jax.bench.retrieval_scale`."""
  cli.run_command(define_flags, main, required=())


if __name__ == '__main__':
  console_main()
