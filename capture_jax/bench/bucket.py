"""The product1m build from and to a bucket against the local one, the parallel TSV index, and
array_record's own `gs://` reader, all against the GCS emulator (gcp-storage-emulator, a test
requirement) in a process of its own.

    python -m capture_jax.bench.bucket --work_dir W --num_images 2000 --files 8 --dim 512

Writes a train annotation file of `--num_images` items and their region features
(up to 36 regions of `--dim` float32, base64 TSV rows) in `--files` TSVs, and
uploads them to the emulator. Then, alternating local and bucket where both are
timed:

* index: the TSV index in one process (`formats.index_tsv` file after file)
  and in `--workers` processes (`product1m_stream.make_index`), local and
  from the bucket;
* build: the dataset built in one process local -> local and gs:// -> gs://
  (examples/s);
* reader: array_record's reader on one shard, local and `gs://` (riegeli's
  GCS reader, pointed at the emulator by `CLOUD_STORAGE_EMULATOR_ENDPOINT`):
  the latency of one record read at random, and records/s with T threads
  (one reader each).

The emulator answers GCS's suffix ranges (`Range: bytes=-N`, which riegeli
sends for a file's tail) only through the fidelity fix below; without it the
reader fails on the emulator (not on GCS).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time

from absl import flags
import numpy as np

from capture_jax import cli
from capture_jax.data import formats

BUCKET = 'bench-bucket'

# The emulator, with GCS's suffix ranges (`bytes=-N`: the last N bytes) that it lacks.
_EMULATOR = """
import re, sys
from gcp_storage_emulator import server as emulator_server
from gcp_storage_emulator.handlers import objects
original = objects.download
def download(request, response, storage_, *args, **kwargs):
  m = re.fullmatch(r'\\s*bytes=-(\\d+)', request.get_header('range', None) or '')
  if m:
    obj = storage_.get_file_obj(request.params['bucket_name'], request.params['object_id'])
    headers = request._request_handler.headers
    del headers['range']
    headers['Range'] = 'bytes=%d-' % max(0, int(obj['size']) - int(m.group(1)))
  return original(request, response, storage_, *args, **kwargs)
objects.download = download
for _, handlers in emulator_server.HANDLERS:
  for method, h in list(handlers.items()):
    if h is original:
      handlers[method] = download
server = emulator_server.create_server('localhost', int(sys.argv[1]), in_memory=True,
                                       default_bucket=sys.argv[2])
server.start()
print('ready', flush=True)
sys.stdin.read()
"""


def start_emulator() -> subprocess.Popen:
  """The emulator in its own process; its endpoint set in os.environ for gcsfs and riegeli."""
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  proc = subprocess.Popen(
      [sys.executable, '-c', _EMULATOR, str(port), BUCKET],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      # Its log: a traceback per connection the reader closes before the end of an open range.
      stderr=subprocess.DEVNULL,
      text=True,
  )
  assert proc.stdout.readline().strip() == 'ready'
  url = f'http://localhost:{port}'
  os.environ.update(
      STORAGE_EMULATOR_HOST=url,
      CLOUD_STORAGE_EMULATOR_ENDPOINT=url,
      GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT='false',
      NO_GCE_CHECK='true',
  )
  return proc


def write_world(root: str, num_images: int, files: int, dim: int) -> str:
  """Annotations of `num_images` items and their features in `files` TSVs (kept if there)."""
  ann = os.path.join(root, formats.annotation_filename('train'))
  if os.path.exists(ann):
    return root
  os.makedirs(os.path.join(root, 'features'), exist_ok=True)
  rng = np.random.default_rng(0)
  ids = [f'item{i:07d}' for i in range(num_images)]
  formats.write_annotations(ann, (formats.Annotation(i, f'title of {i}', 'u', 'v') for i in ids))
  for f in range(files):
    with open(os.path.join(root, 'features', f'part{f:03d}.tsv'), 'w') as out:
      for image_id in ids[f::files]:
        n = int(rng.integers(10, 37))
        xy = rng.uniform(0, 300, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(8, 160, (n, 2))], axis=1)
        feats = rng.random((n, dim), dtype=np.float32)
        rf = formats.RegionFeatures(image_id, 640, 480, boxes, feats)
        out.write(formats.format_tsv_row(rf) + '\n')
  return root


def time_index(features: str, workers: int) -> float:
  """Seconds to index the TSVs of `features` in one process (workers=1) or `workers`."""
  from capture_jax.data import product1m_stream  # pylint: disable=import-outside-toplevel

  out = os.path.join('/tmp', f'bench-index-{os.getpid()}.npz')
  execution = product1m_stream.Execution(workers, None, False)
  t = time.perf_counter()
  if workers == 1:
    tsvs, _ = formats.feature_files(features)
    formats.merge_tsv_indexes([formats.index_tsv(p) for p in tsvs])
  else:
    product1m_stream.make_index(features, out, execution)
  wall = time.perf_counter() - t
  if os.path.exists(out):
    os.remove(out)
  return wall


def time_build(data: str, out: str, vocab: str, dim: int) -> dict:
  from capture_jax import storage  # pylint: disable=import-outside-toplevel
  from capture_jax.data import product1m_tfds  # pylint: disable=import-outside-toplevel

  storage.remove_tree(out)
  t = time.perf_counter()
  r = product1m_tfds.build(
      data, out, vocab_file=vocab, max_regions=36, feature_dim=dim, progress=False
  )
  wall = time.perf_counter() - t
  return {'wall_s': wall, 'examples': r['splits']['train']['examples'], 'dir': r['dataset_dir']}


def time_reads(path: str, threads: int, reads: int) -> dict:
  """Random single-record reads of the ArrayRecord file `path` by `threads` threads, one reader
  each: mean latency of one read and records/s over all threads."""
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel

  n = array_record_module.ArrayRecordReader(path).num_records()
  latencies: list[float] = []

  def run(seed: int) -> None:
    reader = array_record_module.ArrayRecordReader(path)
    rng = random.Random(seed)
    for _ in range(reads // threads):
      i = rng.randrange(n)
      t = time.perf_counter()
      reader.read([i])
      latencies.append(time.perf_counter() - t)
    reader.close()

  t = time.perf_counter()
  pool = [threading.Thread(target=run, args=(s,)) for s in range(threads)]
  for th in pool:
    th.start()
  for th in pool:
    th.join()
  wall = time.perf_counter() - t
  return {
      'threads': threads,
      'ms_per_read': 1e3 * float(np.mean(latencies)),
      'records_per_s': len(latencies) / wall,
  }


def define_flags() -> dict[str, flags.FlagHolder]:
  return {
      'work_dir': flags.DEFINE_string('work_dir', None, 'Scratch folder.', required=True),
      'num_images': flags.DEFINE_integer('num_images', 2000, 'Training pairs.'),
      'files': flags.DEFINE_integer('files', 8, 'Feature TSVs.'),
      'dim': flags.DEFINE_integer('dim', 512, 'Feature width.'),
      'workers': flags.DEFINE_integer('workers', 2, 'Processes of the parallel index.'),
      'repeats': flags.DEFINE_integer('repeats', 2, 'Alternating runs of each timing.'),
      'threads': flags.DEFINE_list('threads', ['1', '4', '16'], 'Reader threads to time.'),
  }


def main(args: dict[str, flags.FlagHolder]) -> None:
  import fsspec  # pylint: disable=import-outside-toplevel

  from capture_jax.bench.build import vocab_of  # pylint: disable=import-outside-toplevel

  work = args['work_dir'].value
  dim = args['dim'].value
  data = write_world(os.path.join(work, 'data'), args['num_images'].value, args['files'].value, dim)
  vocab = vocab_of(work)
  emulator = start_emulator()
  try:
    fs = fsspec.filesystem('gs')
    remote = f'gs://{BUCKET}/data'
    fs.put(data + '/', remote, recursive=True)
    fs.put_file(vocab, f'gs://{BUCKET}/vocab.txt')
    features = {'local': os.path.join(data, 'features'), 'gs': remote + '/features'}
    for rep in range(args['repeats'].value):
      for where, path in features.items():
        for workers in (1, args['workers'].value):
          wall = time_index(path, workers)
          print(
              json.dumps(
                  {'index': where, 'workers': workers, 'rep': rep, 'wall_s': round(wall, 3)}
              ),
              flush=True,
          )
    built = {}
    for rep in range(args['repeats'].value):
      for where, (d, out, v) in {
          'local': (data, os.path.join(work, 'tfds'), vocab),
          'gs': (remote, f'gs://{BUCKET}/tfds', f'gs://{BUCKET}/vocab.txt'),
      }.items():
        res = time_build(d, out, v, dim)
        built[where] = res['dir']
        rate = res['examples'] / res['wall_s']
        print(
            json.dumps(
                {
                    'build': where,
                    'rep': rep,
                    'wall_s': round(res['wall_s'], 2),
                    'examples_per_s': round(rate, 1),
                }
            ),
            flush=True,
        )
    shard = sorted(n for n in os.listdir(built['local']) if '.array_record-' in n)[0]
    for threads in [int(t) for t in args['threads'].value]:
      for where in ('local', 'gs'):
        row = time_reads(f'{built[where]}/{shard}', threads, reads=max(200, 50 * threads))
        print(json.dumps({'reader': where, **{k: round(v, 2) for k, v in row.items()}}), flush=True)
  finally:
    emulator.stdin.close()
    emulator.terminate()
    emulator.wait()
    shutil.rmtree(os.path.join(work, 'tfds'), ignore_errors=True)


def console_main() -> None:
  """`python -m capture_jax.bench.bucket`."""
  args = define_flags()
  cli.run(lambda argv: main(args))


if __name__ == '__main__':
  console_main()
