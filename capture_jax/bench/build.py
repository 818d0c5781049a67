"""Scale rehearsal of the product1m build: examples/s, peak RSS and disk at paper feature sizes.

Writes a train annotation file of `--num_train` items (synthetic titles) and
builds it with `features=generated:RxF` (regions made from each id on the
fly, so no input feature files are needed) once per engine in `--runs`:
`inline` (one process), `processesN` (N worker processes), `beamN` (Apache
Beam DirectRunner, N worker processes). Each build runs in its own process;
its peak RSS is the largest of the build process and its workers. Then the
input pipeline's samples/s on the last dataset (`capture_jax.bench.input`).

    python -m capture_jax.bench.build --work_dir /tmp/rehearsal --num_train 100000 \
        --runs inline,processes2,beam2

The dataset of each run is deleted after it is measured (except the last).
`--parts` prints the CPU time of each step of one example (and of parsing a TSV
row); `--input` the input pipeline's samples/s on the last dataset (one core);
`--records` the records' part of a batch alone (read, decode, text ids; one
core); `--codecs` each ArrayRecord codec's bytes and read time for its records.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time

from absl import flags
import numpy as np

from capture_jax import cli
from capture_jax.data import formats
from capture_jax.data import synthetic

_RUN = """
import json, resource, sys, time
from capture_jax.data import product1m_tfds
kw = json.loads(sys.argv[3])
t = time.perf_counter()
r = product1m_tfds.build(sys.argv[1], sys.argv[2], progress=False, **kw)
wall = time.perf_counter() - t
rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
          resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(json.dumps({'wall_s': wall, 'peak_rss_mb': rss / 1024, 'report': r}))
"""


def write_annotations(data_dir: str, num_train: int, seed: int = 0) -> str:
  """`num_train` train lines with synthetic titles (ids item0000000, ...)."""
  os.makedirs(data_dir, exist_ok=True)
  path = os.path.join(data_dir, formats.annotation_filename('train'))
  if os.path.exists(path) and sum(1 for _ in open(path, 'rb')) == num_train:
    return path
  world = synthetic.make_world(synthetic.PRESETS['small'], seed)
  rng = np.random.default_rng(seed)
  n_products = len(world.products)
  anns = (
      formats.Annotation(
          f'item{i:07d}',
          synthetic.make_title(world, rng, [int(rng.integers(n_products))]),
          'u',
          'v',
      )
      for i in range(num_train)
  )
  formats.write_annotations(path, anns)
  return path


def vocab_of(work_dir: str) -> str:
  """The WordPiece vocab of the rehearsal's titles (trained once; the build tokenises with it)."""
  from capture_jax.data import tokenizer  # pylint: disable=import-outside-toplevel

  path = os.path.join(work_dir, 'vocab.txt')
  titles = list(tokenizer.iter_titles(os.path.join(work_dir, 'data')))
  if not tokenizer.is_up_to_date(path, titles, 4000):
    tokenizer.train_vocab(titles, 4000, path, overwrite=True)
  return path


def run_build(data_dir: str, out: str, run: str, features: str, examples_per_shard: int) -> dict:
  kw: dict = {
      'vocab_file': vocab_of(os.path.dirname(data_dir)),
      'features': features,
      'max_regions': 36,
      'examples_per_shard': examples_per_shard,
  }
  if run.startswith('processes'):
    kw['num_workers'] = int(run[len('processes') :])
  elif run.startswith('beam'):
    n = int(run[len('beam') :])
    kw['beam_options'] = [
        '--runner=DirectRunner',
        f'--direct_num_workers={n}',
        '--direct_running_mode=multi_processing',
    ]
  elif run != 'inline':
    raise ValueError(f'unknown run {run!r}; expected inline, processesN or beamN')
  shutil.rmtree(out, ignore_errors=True)
  proc = subprocess.run(
      [sys.executable, '-c', _RUN, data_dir, out, json.dumps(kw)],
      capture_output=True,
      text=True,
      check=False,
  )
  if proc.returncode:
    raise RuntimeError(f'{run} failed:\n{proc.stderr[-3000:]}')
  res = json.loads(proc.stdout.strip().splitlines()[-1])
  d = res['report']['dataset_dir']
  res['disk_bytes'] = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
  res['examples'] = res['report']['splits']['train']['examples']
  res['dataset_dir'] = d
  return res


def cpu_breakdown(work_dir: str) -> str:
  """CPU microseconds per example of each build step at 36 x 2,048, and of a TSV parse."""
  from array_record.python import array_record_module as arm  # pylint: disable=import-outside-toplevel
  from capture_jax.data import product1m_stream as ps  # pylint: disable=import-outside-toplevel
  from capture_jax.data import product1m_schema  # pylint: disable=import-outside-toplevel

  spec = ps.Spec(
      work_dir, 'generated:36x2048', 'float16', 36, 2048, False, False, vocab_of(work_dir)
  )
  w = ps.ShardWriter(spec, work_dir)
  anns = [formats.Annotation(f'item{i:07d}', 'a title', 'u', 'v') for i in range(600)]

  def per(fn, xs):
    t = time.process_time()
    out = [fn(x) for x in xs]
    return (time.process_time() - t) / len(xs) * 1e6, out

  g, rfs = per(lambda a: w.store.get(a.item_id), anns)
  make = lambda a: product1m_schema.make_example(
      w.store, a, w.titles, dtype=np.float16, feature_dim=2048, max_regions=36, with_cls_prob=False
  )
  _, exs = per(make, anns)
  for x in exs:
    x.pop('_truncated')
  s, raws = per(w.serialize, exs)
  path = os.path.join(work_dir, 'parts.array_record')
  wr = arm.ArrayRecordWriter(path, ps.ARRAY_RECORD_OPTIONS)
  c, _ = per(wr.write, raws)
  wr.close()
  os.remove(path)
  rows = [formats.format_tsv_row(rf) for rf, _ in rfs[:200]]
  p, _ = per(formats.parse_tsv_row, rows)
  return (
      f'CPU us/example: generate {g:.0f}, encode+serialize {s:.0f}, ArrayRecord write {c:.0f}; '
      f'TSV row parse {p:.0f} (mean {np.mean([len(r) for r in rows]) / 1e3:.0f} kB/row)'
  )


CODECS = ('zstd:3', 'zstd:1', 'snappy', 'uncompressed')


def codec_rates(work_dir: str, dataset: str, batch: int = 256, repeats: int = 3) -> list[dict]:
  """Bytes per record and one-core read rate of the dataset's train records under each ArrayRecord
  codec (`group_size:1`, as the build writes): random batched reads, as training makes."""
  from array_record.python import array_record_module as arm  # pylint: disable=import-outside-toplevel
  from array_record.python import array_record_data_source as ards  # pylint: disable=import-outside-toplevel

  shards = sorted(f for f in os.listdir(dataset) if f.startswith('product1m-train.array_record'))
  raws = ards.ArrayRecordDataSource([os.path.join(dataset, shards[0])])
  raws = raws.__getitems__(list(range(min(len(raws), 2048))))
  order = np.random.default_rng(0).permutation(len(raws))
  out = []
  for codec in CODECS:
    path = os.path.join(work_dir, f'codec_{codec.replace(":", "")}.array_record')
    writer = arm.ArrayRecordWriter(path, f'group_size:1,{codec}')
    for r in raws:
      writer.write(r)
    writer.close()
    reader = ards.ArrayRecordDataSource([path])
    best = float('inf')
    for _ in range(repeats):
      t = time.process_time()
      for i in range(0, len(order), batch):
        reader.__getitems__(order[i : i + batch].tolist())
      best = min(best, time.process_time() - t)
    out.append(
        {
            'codec': codec,
            'file_bytes_per_record': round(os.path.getsize(path) / len(raws)),
            'record_bytes': round(np.mean([len(r) for r in raws])),
            'read_us_per_record': round(best / len(raws) * 1e6, 1),
        }
    )
    os.remove(path)
  return out


def records_rate(work_dir: str, tfds_dir: str, batch: int = 256, batches: int = 10) -> dict:
  """One core's CPU microseconds per sample of what the records cost a batch: the batched
  ArrayRecord read, the decode and the text ids (`TextEncoder.pack` of the stored token ids),
  random batches of the train split, the best of 5 windows; the features' packing and masking
  (`collate`'s rest) are not in it."""
  from capture_jax.bench import input as bench  # pylint: disable=import-outside-toplevel
  from capture_jax.data import source as source_lib  # pylint: disable=import-outside-toplevel
  from capture_jax.data import tokenizer  # pylint: disable=import-outside-toplevel

  bench.pin_to_cores(1)
  vocab = vocab_of(work_dir)
  src = source_lib.Product1MSource(tfds_dir, 'train', vocab_file=vocab)
  encoder = tokenizer.TextEncoder(vocab, 24)
  order = np.random.default_rng(0).permutation(len(src))[: batch * batches]
  windows = []
  for _ in range(5):
    t = time.process_time()
    for i in range(0, len(order), batch):
      encoder.pack([r['token_ids'] for r in src.read_records(order[i : i + batch].tolist())])
    windows.append((time.process_time() - t) / len(order) * 1e6)
  return {
      'records_us_per_sample': round(min(windows), 1),
      'samples_per_cpu_s': round(1e6 / min(windows)),
  }


def input_rate(work_dir: str, tfds_dir: str) -> dict:
  """`bench.input.measure` on one core over a dataset built here (vocab from its titles)."""
  from capture_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from capture_jax.bench import input as bench  # pylint: disable=import-outside-toplevel

  c = config_lib.base_config()
  d = c.data
  d.data_dir, d.tfds_dir = os.path.join(work_dir, 'data'), tfds_dir
  d.vocab_file = vocab_of(work_dir)
  d.feature_dim = c.model.v_feature_size = 2048
  d.max_regions, d.batch_size = 36, 256
  d.num_workers = d.read_threads = d.prefetch_batches = 0
  bench.pin_to_cores(1)
  return bench.measure(c, warmup=3, batches=10, repeats=5)


def define_flags() -> dict[str, flags.FlagHolder]:
  """The command's flags (defined when the command runs, not on import)."""
  return {
      'work_dir': flags.DEFINE_string(
          'work_dir', '/tmp/capture_build_rehearsal', 'Scratch folder.'
      ),
      'num_train': flags.DEFINE_integer('num_train', 100_000, 'Training pairs.'),
      'runs': flags.DEFINE_list('runs', ['inline', 'processes2', 'beam2'], 'Engines to time.'),
      'features': flags.DEFINE_string(
          'features', 'generated:36x2048', 'Feature store or generated:RxF.'
      ),
      'examples_per_shard': flags.DEFINE_integer('examples_per_shard', 2048, 'Examples per shard.'),
      'parts': flags.DEFINE_bool('parts', False, 'Also print the CPU time of each build step.'),
      'input': flags.DEFINE_bool('input', False, 'Also time the input pipeline on it.'),
      'records': flags.DEFINE_bool(
          'records', False, "Also time the records' part of a batch (read, decode, text ids)."
      ),
      'codecs': flags.DEFINE_bool(
          'codecs', False, 'Also time reading its records under each ArrayRecord codec.'
      ),
  }


def main(args: dict[str, flags.FlagHolder]) -> None:
  work_dir, num_train = args['work_dir'].value, args['num_train'].value
  data = os.path.join(work_dir, 'data')
  t = time.perf_counter()
  write_annotations(data, num_train)
  print(f'annotations: {num_train} lines in {time.perf_counter() - t:.1f} s', flush=True)
  print(f'machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs')
  last = last_dir = None
  for r in args['runs'].value:
    out = os.path.join(work_dir, 'tfds_' + r)
    res = run_build(data, out, r, args['features'].value, args['examples_per_shard'].value)
    workers = res['report']['num_workers'] if not r.startswith('beam') else int(r[4:])
    rate = res['examples'] / res['wall_s']
    print(
        json.dumps(
            {
                'run': r,
                'examples': res['examples'],
                'wall_s': round(res['wall_s'], 1),
                'examples_per_s': round(rate, 1),
                'examples_per_s_per_worker': round(rate / workers, 1),
                'peak_rss_mb': round(res['peak_rss_mb']),
                'disk_bytes_per_example': round(res['disk_bytes'] / res['examples']),
                'shards': res['report']['shards']['train'],
            }
        ),
        flush=True,
    )
    if last and last != out:
      shutil.rmtree(last, ignore_errors=True)
    last, last_dir = out, res['dataset_dir']
  if args['parts'].value:
    print(cpu_breakdown(work_dir), flush=True)
  if args['codecs'].value and last:
    for row in codec_rates(work_dir, last_dir):
      print('codec (one core):', json.dumps(row), flush=True)
  if args['records'].value and last:
    print('records (one core):', json.dumps(records_rate(work_dir, last)), flush=True)
  if args['input'].value and last:
    print('input pipeline (one core):', json.dumps(input_rate(work_dir, last)))


def console_main() -> None:
  """`python -m capture_jax.bench.build`."""
  args = define_flags()
  cli.run(lambda argv: main(args))


if __name__ == '__main__':
  console_main()
