"""The product1m dataset built by streaming: bounded memory, no TensorFlow, parallel, resumable.

TFDS's own `download_and_prepare` keeps a split's serialized examples in
memory up to 1 GB (`tensorflow_datasets/core/shuffle.py`) and past that
spills them through `tf.io.gfile`, i.e. it needs TensorFlow for any split
above ~7,000 paper-size examples (Product1M's train split has ~1M). This
module writes the same dataset without that shuffler:

1. **Plan** (one process, seconds for 1M lines). Each annotation file is read
   once with `formats.read_annotations` (so bad lines, duplicates and the
   `skip_bad` counts are exactly the reader's) and its usable samples are cut
   into shards of `examples_per_shard` consecutive samples. A shard task is a
   byte range of the annotation file plus the line numbers it keeps. The plan
   depends neither on the number of workers nor on the engine, so every
   worker count and Beam write the same shards with the same examples.
2. **Write** each shard task, in any order and on any worker: read its lines,
   look up the region features, tokenise the title, make and serialize the
   examples (TFDS's feature encoding and its bundled `tf.train.Example`
   proto), write them to the shard's ArrayRecord file as they come
   (`ARRAY_RECORD_OPTIONS`: one record per chunk, as TFDS's ArrayRecord
   adapter, with the codec measured best for float16 features), read the
   shard back (count + first and last record), then write a done marker.
   Memory: one example plus the writer's buffer.
3. **Publish**: check every shard against its marker, write TFDS's metadata
   (`dataset_info.json`, `features.json`, split shard lengths, with the
   schema's `DatasetInfo`; `metadata.json`: the vocab's identity), and rename
   the folder into place.

Workers: `num_workers=1` writes in this process; N > 1 uses N spawned
processes pulling shard tasks in order; `beam_options` runs the shard tasks as
an Apache Beam pipeline (DirectRunner, Dataflow, Spark, Flink). The feature
TSVs are indexed one task per file the same way (`make_index`: in N processes,
or as a first Beam pipeline) and merged by the launcher.

In a bucket: every input (annotations, TSV or npz features, the vocab) and
the output folder may be `gs://` (through `storage`: gcsfs). A shard is
written to a local temporary file, read back, and uploaded whole and
create-only (`storage.upload_once`); its marker records the file's CRC32C,
which stands for the read-back when the build resumes (the object's CRC32C
must equal it). Publishing copies the objects server-side from the
incomplete folder, `dataset_info.json` last (`_move_into_place`).

Interrupted, run twice, pointed at other files:

* Everything is written into `{version}.incomplete/` next to the final
  folder, which only appears (by one rename; in a bucket, when its
  `dataset_info.json`, copied last, does) when the dataset is complete and
  checked; `tfds` ignores the incomplete folder (not a version name).
* A build that fails on bad input removes its incomplete folder (nothing left
  that a later run could take as finished). A build that is killed (kill -9,
  preemption) leaves it; the next run with the same inputs and settings keeps
  the shards whose marker matches and whose file reads back, rewrites the
  others, and reports `resumed_shards`. Other inputs or settings: it starts
  over. A marker whose shard does not read back (truncated, corrupted) is
  noticed and that shard rewritten.
* One build per dataset folder at a time: `{out}/product1m/.{config}.build.lock`
  (`training.lock.FolderLock`); a second one is refused naming the first.

Bad input in a worker stops the build with the error of the earliest shard
in annotation order, at every worker count (later workers are stopped), so
the message is the one a one-process build gives.

`features='generated:36x2048'` makes deterministic features from each item id
on the fly (up to 36 regions of 2,048 floats) instead of reading a feature
store: for scale rehearsals without hundreds of GB of input files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
import traceback
import zlib
from typing import Any, Sequence

from etils import epath
import numpy as np

from capture_jax import storage
from capture_jax.data import formats
from capture_jax.data import product1m_schema as schema
from capture_jax.data import tokenizer as tokenizer_lib

PLAN_VERSION = 2  # 2: token_ids, the vocab and the codec in the plan
DEFAULT_EXAMPLES_PER_SHARD = 2048
INCOMPLETE_SUFFIX = '.incomplete'
WORK_DIR = '_build'  # markers, plan and feature index, inside the incomplete folder
GENERATED_PREFIX = 'generated:'
# One record per chunk (random access), as TFDS's ArrayRecordFileAdapter, but uncompressed where
# the adapter leaves array_record's zstd:3: float16 region features hardly compress, and reading
# them is several times cheaper without it (docs/BENCHMARKS.md "Input pipeline", the codec rows;
# `python -m capture_jax.bench.build --codecs`).
ARRAY_RECORD_OPTIONS = 'group_size:1,uncompressed'


def lock_name(config: str) -> str:
  """The build lock of a config, in `{tfds_dir}/product1m/` (outside the dataset folder)."""
  return f'.{config}.build.lock'


# ----------------------------------------------------------------------------
# Features made on the fly.


class GeneratedFeatures:
  """A feature store that makes each image's regions from its id (`generated:RxF`).

  Deterministic (seeded by crc32 of the id), between 10 and R regions of F
  non-negative float32 values (like ReLU detector features), boxes inside a
  640x480 image. Every id has features.
  """

  def __init__(self, spec: str):
    try:
      regions, dim = spec[len(GENERATED_PREFIX) :].split('x')
      self.max_regions, self.feature_dim = int(regions), int(dim)
    except ValueError:
      raise ValueError(
          f'expected {GENERATED_PREFIX}REGIONSxDIM (e.g. generated:36x2048), got {spec!r}'
      )
    if self.max_regions < 1 or self.feature_dim < 1:
      raise ValueError(f'{spec!r}: regions and dim must be at least 1')
    self.path = spec

  def __contains__(self, image_id: str) -> bool:
    return True

  def get(self, image_id: str) -> tuple[formats.RegionFeatures, str]:
    seed = zlib.crc32(image_id.encode())
    rng = np.random.default_rng(seed)
    n = min(self.max_regions, 10 + seed % max(1, self.max_regions - 9))
    xy = rng.uniform(0, 320, (n, 2)).astype(np.float32)
    wh = rng.uniform(8, 160, (n, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + wh], axis=1)
    feats = rng.random((n, self.feature_dim), dtype=np.float32) * 4.0
    return formats.RegionFeatures(image_id, 640, 480, boxes, feats), self.path

  def close(self) -> None:
    pass


def open_store(features: str, index: str | None = None):
  """The feature store of `features` (a path, or `generated:RxF`)."""
  if features.startswith(GENERATED_PREFIX):
    return GeneratedFeatures(features)
  return formats.FeatureStore(features, index=index)


# ----------------------------------------------------------------------------
# The plan.


@dataclasses.dataclass(frozen=True)
class Spec:
  """What every shard writer needs to know (JSON-able, sent to workers and Beam)."""

  tfds_dir: str
  features: str
  storage_dtype: str
  max_regions: int
  feature_dim: int
  skip_bad: bool
  with_cls_prob: bool
  vocab_file: str


@dataclasses.dataclass(frozen=True)
class ShardTask:
  """One shard: samples `lines` of `ann_path`, within bytes [byte_start, byte_end).

  `order` is the shard's rank over all splits in annotation order (the
  earliest failing shard's error is the one reported).
  """

  order: int
  split: str
  index: int
  num_shards: int
  ann_path: str
  byte_start: int
  byte_end: int
  first_line: int
  lines: tuple[int, ...]

  @property
  def filename(self) -> str:
    """TFDS's default shard name, `{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}`."""
    return f'{schema.NAME}-{self.split}.array_record-' f'{self.index:05d}-of-{self.num_shards:05d}'


def _line_offsets(path: str) -> np.ndarray:
  """[num_lines + 1] int64: byte offset of the start of each line (and of the end)."""
  offsets = [0]
  with storage.open_input(path) as f:
    for raw in f:
      offsets.append(offsets[-1] + len(raw))
  return np.asarray(offsets, np.int64)


def plan_split(
    split: str, path: str, examples_per_shard: int, skip_bad: bool
) -> tuple[list[dict], formats.BadInputCounter]:
  """Shard tasks (as dicts, `order` unset) of one annotation file, and its line-level counts.

  Raises the reader's `BadInputError` (without `skip_bad`) on the first bad line.
  """
  counter = formats.BadInputCounter(skip_bad)
  kept = [
      lineno
      for lineno, _ in formats.read_annotations(
          path, require_labels=split in formats.LABELLED_SPLITS, counter=counter
      )
  ]
  if not kept:
    return [], counter
  offsets = _line_offsets(path)
  groups = [kept[i : i + examples_per_shard] for i in range(0, len(kept), examples_per_shard)]
  tasks = []
  for i, lines in enumerate(groups):
    tasks.append(
        dict(
            split=split,
            index=i,
            num_shards=len(groups),
            ann_path=path,
            byte_start=int(offsets[lines[0] - 1]),
            byte_end=int(offsets[lines[-1]]),
            first_line=lines[0],
            lines=tuple(lines),
        )
    )
  return tasks, counter


def _tree_stats(path: str) -> list:
  """(relative path, size, version) of a file or of every file under a folder (local or gs://:
  `storage.input_versions`)."""
  if path.startswith(GENERATED_PREFIX):
    return [path]
  return storage.input_versions(path)


def fingerprint(spec: Spec, ann_paths: dict[str, str], examples_per_shard: int) -> str:
  """Identifies the inputs and settings of a build: a resumed build must match it."""
  blob = {
      'plan_version': PLAN_VERSION,
      # The vocab by content (its path may move), the codec: both change the shards' bytes.
      'spec': dataclasses.asdict(spec) | {'tfds_dir': None, 'vocab_file': None},
      'vocab': tokenizer_lib.vocab_fingerprint(spec.vocab_file),
      'array_record_options': ARRAY_RECORD_OPTIONS,
      'examples_per_shard': examples_per_shard,
      'annotations': {s: [p, _tree_stats(p)] for s, p in ann_paths.items()},
      'features': _tree_stats(spec.features),
  }
  return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------
# Writing one shard (in this process, a worker process, or a Beam worker).


def _read_task_lines(task: ShardTask):
  """(lineno, Annotation) of the task's kept lines (already validated by the plan)."""
  keep = set(task.lines)
  require = task.split in formats.LABELLED_SPLITS
  with storage.open_input(task.ann_path) as f:
    f.seek(task.byte_start)
    pos, lineno = task.byte_start, task.first_line
    while pos < task.byte_end:
      raw = f.readline()
      if not raw:
        raise ValueError(f'{task.ann_path} is shorter than when the build was planned')
      if lineno in keep:
        line = formats.decode_line(raw, path=task.ann_path, lineno=lineno)
        yield lineno, formats.parse_annotation_line(
            line, path=task.ann_path, lineno=lineno, require_labels=require
        )
      pos += len(raw)
      lineno += 1


def verify_shard(path: str, num_examples: int) -> None:
  """Raises ValueError unless the ArrayRecord file at `path` reads back `num_examples` records.

  ArrayRecord opens a truncated file as one with fewer records, so the count
  is checked, and the first and last records are read (a corrupted chunk
  fails its checksum there).
  """
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel

  try:
    reader = array_record_module.ArrayRecordReader(path)
    try:
      n = reader.num_records()
      if n != num_examples:
        raise ValueError(f'shard {path} holds {n} records, expected {num_examples}')
      if n:
        reader.read([0, n - 1])
    finally:
      reader.close()
  except ValueError:
    raise
  except Exception as err:  # the reader raises RuntimeError / OSError on bad chunks
    raise ValueError(f'shard {path} does not read back: {err}') from err


def check_shard(shard: str, marker: dict) -> None:
  """Raises ValueError (OSError: absent) unless `shard` is the file its `marker` describes: on
  disk it reads back (`verify_shard`); in a bucket the object has the size and CRC32C of the
  local file that was checked before the upload."""
  if storage.is_remote(shard):
    info = storage.object_info(shard)
    if info is None:
      raise FileNotFoundError(f'shard {shard} is not in the bucket')
    if (info['bytes'], info.get('crc32c')) != (marker['file_bytes'], marker.get('crc32c')):
      raise ValueError(f'shard {shard} is not the object its marker describes (size or CRC32C)')
    return
  if os.path.getsize(shard) != marker['file_bytes']:
    raise ValueError(f'shard {shard} has changed size since it was written')
  verify_shard(shard, marker['examples'])


class ShardWriter:
  """Writes shard tasks of one build; holds the feature store and serializer of a worker."""

  def __init__(self, spec: Spec, work: str, index: str | None = None):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    self.spec = spec
    self.work = work
    self.store = open_store(spec.features, index)
    self.titles = tokenizer_lib.TitleTokenizer(spec.vocab_file, schema.DO_LOWER_CASE)
    self.features = schema.features_dict(spec.storage_dtype, spec.with_cls_prob)
    self.serializer = tfds.core.example_serializer.ExampleSerializer(
        self.features.get_serialized_info()
    )
    self.dtype = schema.STORAGE_DTYPES[spec.storage_dtype]

  def serialize(self, example: dict) -> bytes:
    return self.serializer.serialize_example(self.features.encode_example(example))

  def write(self, task: ShardTask, plan_id: str) -> dict:
    """Writes `task`'s shard and its done marker; returns the marker."""
    from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel

    final = os.path.join(self.work, task.filename)
    remote = storage.is_remote(final)
    if remote:  # array_record writes local files: written here, checked, then uploaded whole
      fd, local = tempfile.mkstemp(suffix='.array_record')
      os.close(fd)
    else:
      local = final
    try:
      return self._write(task, plan_id, local, final)
    finally:
      if remote and os.path.exists(local):
        os.remove(local)

  def _write(self, task: ShardTask, plan_id: str, local: str, final: str) -> dict:
    """`write` into the local file `local`, then (in a bucket) uploaded to `final`."""
    from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel

    counter = formats.BadInputCounter(self.spec.skip_bad)
    n = num_bytes = 0
    writer = array_record_module.ArrayRecordWriter(local, ARRAY_RECORD_OPTIONS)
    try:
      for lineno, ann in _read_task_lines(task):
        try:
          example = schema.make_example(
              self.store,
              ann,
              self.titles,
              dtype=self.dtype,
              feature_dim=self.spec.feature_dim,
              max_regions=self.spec.max_regions,
              with_cls_prob=self.spec.with_cls_prob,
          )
        except formats.BadInputError as err:
          counter.handle(formats.BadInputError(err.kind, f'{task.ann_path}:{lineno}: {err}'))
          continue
        if example.pop('_truncated'):
          counter.truncated += 1
        raw = self.serialize(example)
        writer.write(raw)
        n += 1
        num_bytes += len(raw)
    finally:
      writer.close()
    verify_shard(local, n)
    # In a bucket, the object's CRC32C (GCS's own checksum, in its listing) stands for the
    # read-back: equal to the checked local file's, the object is that file.
    crc = storage.upload_once(local, final) if local != final else None
    marker = {
        'plan': plan_id,
        'shard': task.filename,
        'examples': n,
        'num_bytes': num_bytes,
        'file_bytes': os.path.getsize(local),
        'crc32c': crc,
        'counts': dict(counter.counts),
        'first': dict(counter.examples),
        'truncated': counter.truncated,
    }
    _write_json(_marker_path(self.work, task), marker)
    return marker


def _marker_names(work: str) -> set[str]:
  """The names of the files in `work`'s `_build` folder (one listing, also in a bucket)."""
  return {n.rsplit('/', 1)[-1] for n in storage.file_listing(os.path.join(work, WORK_DIR))}


def _marker_path(work: str, task: ShardTask) -> str:
  return os.path.join(work, WORK_DIR, task.filename + '.done.json')


def _write_json(path: str, obj: Any) -> None:
  """Whole or absent: renamed into place on disk, one object upload in a bucket."""
  if storage.is_remote(path):
    storage.write_text(path, json.dumps(obj, indent=1))
    return
  p = epath.Path(path)
  tmp = p.parent / (p.name + '.tmp')
  tmp.write_text(json.dumps(obj, indent=1))
  tmp.replace(p)


def _read_marker(work: str, task: ShardTask, plan_id: str) -> dict | None:
  """The task's marker if its shard is finished and reads back, else None (logged)."""
  p = epath.Path(_marker_path(work, task))
  if not p.exists():
    return None
  try:
    marker = json.loads(p.read_text())
  except ValueError:
    return None
  if marker.get('plan') != plan_id or marker.get('shard') != task.filename:
    return None
  shard = os.path.join(work, task.filename)
  try:
    check_shard(shard, marker)
  except (OSError, ValueError) as err:
    logging.warning('product1m: rewriting a finished shard that does not read back: %s', err)
    print(f'note: rewriting {task.filename}: {err}', flush=True)
    return None
  return marker


# ----------------------------------------------------------------------------
# Running the shard tasks: here, in N processes, or on Beam.


def _error_record(task: ShardTask, err: BaseException) -> dict:
  return {
      'order': task.order,
      'kind': getattr(err, 'kind', None),
      'type': type(err).__name__,
      'message': str(err),
      'traceback': traceback.format_exc(),
  }


def _raise_error_record(rec: dict) -> None:
  if rec['kind']:
    raise formats.BadInputError(rec['kind'], rec['message'])
  if rec['type'] in ('FileNotFoundError', 'PermissionError', 'OSError', 'IsADirectoryError'):
    raise OSError(rec['message'])
  raise RuntimeError(f'a build worker failed:\n{rec["traceback"]}')


def _die_with_parent(parent: int) -> None:
  """Linux: this worker gets SIGKILL when the build process dies (kill -9 included).

  Otherwise an orphaned worker would go on writing into the incomplete folder
  while the next build, which holds the lock, resumes there.
  """
  import ctypes  # pylint: disable=import-outside-toplevel
  import signal  # pylint: disable=import-outside-toplevel

  try:
    ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except OSError:
    return
  if os.getppid() != parent:  # the parent died before prctl took effect
    os._exit(1)


def _worker_main(
    spec_json, tasks_json, work, plan_id, index, w, next_task, stop_at, current, parent
):
  """One worker process: takes the next task in order until none is left or the build stops."""
  _die_with_parent(parent)
  spec = Spec(**spec_json)
  tasks = [ShardTask(**t) for t in tasks_json]
  writer = ShardWriter(spec, work, index)
  while True:
    with next_task.get_lock():
      i = next_task.value
      next_task.value += 1
    if i >= len(tasks) or tasks[i].order > stop_at.value:
      break
    current[w] = tasks[i].order
    try:
      writer.write(tasks[i], plan_id)
    except BaseException as err:  # pylint: disable=broad-except
      _write_json(
          os.path.join(work, WORK_DIR, f'error-{tasks[i].order:06d}.json'),
          _error_record(tasks[i], err),
      )
      with stop_at.get_lock():
        stop_at.value = min(stop_at.value, tasks[i].order)
      break
  current[w] = 1 << 30


def _run_processes(spec, tasks, work, plan_id, index, num_workers, on_done) -> None:
  ctx = multiprocessing.get_context('spawn')  # no fork of a process that may hold threads
  next_task = ctx.Value('i', 0)
  stop_at = ctx.Value('i', 1 << 30)
  current = ctx.Array('i', [-1] * num_workers)
  tasks_json = [dataclasses.asdict(t) for t in tasks]
  procs = [
      ctx.Process(
          target=_worker_main,
          args=(
              dataclasses.asdict(spec),
              tasks_json,
              work,
              plan_id,
              index,
              w,
              next_task,
              stop_at,
              current,
              os.getpid(),
          ),
          daemon=True,
      )
      for w in range(num_workers)
  ]
  for p in procs:
    p.start()
  done: set[int] = set()
  try:
    while True:
      alive = [p.is_alive() for p in procs]
      finished = _marker_names(work)
      for t in tasks:
        if t.order not in done and os.path.basename(_marker_path(work, t)) in finished:
          done.add(t.order)
          on_done(1)
      stop = stop_at.value
      for w, p in enumerate(procs):
        if alive[w] and current[w] > stop and current[w] != 1 << 30:
          p.terminate()  # its shard comes after the failed one: no need to finish it
      if not any(alive):
        break
      time.sleep(1.0 if storage.is_remote(work) else 0.2)
  finally:
    for p in procs:
      if p.is_alive():
        p.terminate()
      p.join()
  errors = sorted(epath.Path(work, WORK_DIR).glob('error-*.json'))
  if errors:
    _raise_error_record(json.loads(errors[0].read_text()))
  for w, p in enumerate(procs):
    if p.exitcode not in (0, None) and p.exitcode != -15:
      raise RuntimeError(f'build worker {w} died with exit code {p.exitcode}')


def _beam_write(task_json: dict, spec_json: dict, work: str, plan_id: str, index: str | None):
  """Beam's Map: writes one shard (the writer is cached per Beam worker process)."""
  key = (json.dumps(spec_json, sort_keys=True), work, index)
  writer = _BEAM_WRITERS.get(key)
  if writer is None:
    writer = _BEAM_WRITERS[key] = ShardWriter(Spec(**spec_json), work, index)
  task = ShardTask(**task_json)
  errors = epath.Path(work, WORK_DIR).glob('error-*.json')
  if any(int(e.name[len('error-') : -len('.json')]) < task.order for e in errors):
    return task.order, None  # an earlier shard failed: the build stops with its error
  try:
    return task.order, writer.write(task, plan_id)['examples']
  except formats.BadInputError as err:
    # Recorded, not raised: a runner would retry the bundle (Dataflow: 4 times) and report
    # the error of whichever shard failed last; the driver raises the earliest shard's.
    _write_json(
        os.path.join(work, WORK_DIR, f'error-{task.order:06d}.json'), _error_record(task, err)
    )
    return task.order, None


_BEAM_WRITERS: dict = {}


def _run_beam(spec, tasks, work, plan_id, index, beam_options: Sequence[str]) -> None:
  import apache_beam as beam  # pylint: disable=import-outside-toplevel
  from apache_beam.options import pipeline_options  # pylint: disable=import-outside-toplevel

  options = pipeline_options.PipelineOptions(list(beam_options))
  with beam.Pipeline(options=options) as p:
    _ = (
        p
        | 'ShardTasks' >> beam.Create([dataclasses.asdict(t) for t in tasks])
        | 'Spread' >> beam.Reshuffle()
        | 'WriteShards'
        >> beam.Map(
            _beam_write,
            spec_json=dataclasses.asdict(spec),
            work=work,
            plan_id=plan_id,
            index=index,
        )
    )
  errors = sorted(epath.Path(work, WORK_DIR).glob('error-*.json'))
  if errors:
    _raise_error_record(json.loads(errors[0].read_text()))


# ----------------------------------------------------------------------------
# The feature index: one task per TSV (here, in N processes, or on Beam), merged here.


def make_index(features: str, index: str, execution: 'Execution') -> None:
  """Indexes the TSVs of the feature store `features` into `index` (`formats.TsvIndex`).

  Each file is one task (`formats.index_tsv`: one sequential read): in this
  process, in `num_workers` processes, or as Beam tasks writing their part
  next to `index`; this process merges the parts (a sort of the ids).
  """
  tsvs, _ = formats.feature_files(features)
  if execution.engine == 'beam' and len(tsvs) > 1:
    parts = _index_on_beam(tsvs, index + '.parts', execution.beam_options)
  elif execution.engine == 'processes' and len(tsvs) > 1:
    ctx = multiprocessing.get_context('spawn')
    with ctx.Pool(min(execution.num_workers, len(tsvs))) as pool:
      parts = pool.map(formats.index_tsv, tsvs, chunksize=1)
  else:
    parts = [formats.index_tsv(p) for p in tsvs]
  storage.write_bytes(index, formats.merge_tsv_indexes(parts).to_bytes())


def _beam_index_part(item: tuple[int, str], parts: str) -> None:
  """Beam's Map: indexes one TSV into `{parts}/{i:05d}.npz`."""
  i, path = item
  storage.write_bytes(os.path.join(parts, f'{i:05d}.npz'), formats.index_tsv(path).to_bytes())


def _index_on_beam(
    tsvs: list[str], parts: str, beam_options: Sequence[str]
) -> list[formats.TsvIndex]:
  """The TSVs indexed as a Beam pipeline (one task per file); their parts, in file order."""
  import apache_beam as beam  # pylint: disable=import-outside-toplevel
  from apache_beam.options import pipeline_options  # pylint: disable=import-outside-toplevel

  storage.remove_tree(parts)
  options = pipeline_options.PipelineOptions(list(beam_options))
  with beam.Pipeline(options=options) as p:
    _ = (
        p
        | 'FeatureFiles' >> beam.Create(list(enumerate(tsvs)))
        | 'Spread' >> beam.Reshuffle()
        | 'IndexFiles' >> beam.Map(_beam_index_part, parts=parts)
    )
  out = []
  for i in range(len(tsvs)):
    name = os.path.join(parts, f'{i:05d}.npz')
    out.append(formats.TsvIndex.from_bytes(storage.read_bytes(name), name))
  storage.remove_tree(parts)
  return out


# ----------------------------------------------------------------------------
# The build.


def _merge_counts(split_counter: formats.BadInputCounter, markers: Sequence[dict]) -> dict:
  """The split's report: the plan's line-level counts plus every shard's."""
  c = formats.BadInputCounter(True)
  c.counts.update(split_counter.counts)
  c.examples.update(split_counter.examples)
  for m in markers:
    c.counts.update(m['counts'])
    for kind, msg in m['first'].items():
      c.examples.setdefault(kind, msg)
    c.truncated += m['truncated']
  return c


def _publish(
    spec: Spec,
    work: str,
    final: str,
    split_tasks: dict[str, list[ShardTask]],
    markers: dict[int, dict],
) -> None:
  """Checks the shards, writes TFDS's metadata into `work`, moves it to `final`."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  info = schema.dataset_info(
      schema.dataset_identity(spec.tfds_dir, spec.storage_dtype, spec.with_cls_prob),
      spec.storage_dtype,
      spec.with_cls_prob,
      metadata=schema.identity(spec.vocab_file),
  )
  info.set_file_format('array_record')
  split_infos = []
  for split, tasks in split_tasks.items():
    for t in tasks:
      check_shard(os.path.join(work, t.filename), markers[t.order])
    template = tfds.core.naming.ShardedFileTemplate(
        data_dir=epath.Path(final),
        dataset_name=schema.NAME,
        split=split,
        filetype_suffix='array_record',
    )
    split_infos.append(
        tfds.core.SplitInfo(
            name=split,
            shard_lengths=[markers[t.order]['examples'] for t in tasks],
            num_bytes=sum(markers[t.order]['num_bytes'] for t in tasks),
            filename_template=template,
        )
    )
  info.set_splits(tfds.core.SplitDict(split_infos))
  info.write_to_directory(epath.Path(work))
  _move_into_place(work, final)


# The file that makes a folder a dataset (TFDS reads nothing without it): published last.
INFO_FILE = 'dataset_info.json'


def _move_into_place(work: str, final: str) -> None:
  """Publishes the checked folder `work` as `final`.

  On disk: one rename, first: a kill between it and the removal of `_build`
  leaves a complete dataset with a stale `_build` inside, never a folder
  without its plan and markers that looks finished. In a bucket (no rename):
  every object but `_build`'s is copied server-side, `dataset_info.json`
  last, so `final` is a dataset only once all its shards are there
  (`_is_finished`); then `work` is removed (a kill before that leaves it to
  the next build, which removes it).
  """
  if not storage.is_remote(work):
    os.replace(work, final)
    shutil.rmtree(os.path.join(final, WORK_DIR), ignore_errors=True)
    return
  storage.remove_tree(final)  # what a publish killed half-way left
  names = [n for n in storage.file_listing(work) if not n.startswith(WORK_DIR + '/')]
  first = [n for n in names if n != INFO_FILE]
  storage.copy_objects([f'{work}/{n}' for n in first], [f'{final}/{n}' for n in first])
  storage.copy_objects([f'{work}/{INFO_FILE}'], [f'{final}/{INFO_FILE}'])
  storage.remove_tree(work)


def _is_finished(final: str) -> bool:
  """Whether the dataset folder `final` is published (a bucket: its `dataset_info.json` is)."""
  if storage.is_remote(final):
    return storage.is_file(os.path.join(final, INFO_FILE))
  return os.path.isdir(final)


@dataclasses.dataclass(frozen=True)
class Execution:
  """How the shards are written; none of it changes the dataset (see `fingerprint`)."""

  num_workers: int
  beam_options: tuple[str, ...] | None
  progress: bool

  @property
  def engine(self) -> str:
    if self.beam_options is not None:
      return 'beam'
    return 'processes' if self.num_workers > 1 else 'inline'


def build(
    data_dir: str,
    tfds_dir: str,
    *,
    vocab_file: str,
    features: str | None = None,
    storage_dtype: str = 'float16',
    max_regions: int = 36,
    feature_dim: int | None = None,
    skip_bad: bool = False,
    overwrite: bool = False,
    with_cls_prob: bool = False,
    progress: bool = True,
    num_workers: int = 1,
    examples_per_shard: int = DEFAULT_EXAMPLES_PER_SHARD,
    beam_options: Sequence[str] | None = None,
) -> dict:
  """Builds the ArrayRecord splits (see the module docstring); returns the report.

  The build of `product1m_tfds.build`, its command and `build_from_config`.
  `vocab_file` is the WordPiece vocab the titles are tokenised with, once
  (`token_ids`); its fingerprint is part of the plan and of the published
  dataset's identity (`product1m_schema.identity`). An existing dataset is
  reused only when it is of this vocab (else ValueError with the command that
  rebuilds), unless `overwrite`.

  Returns:
    {'dataset_dir', 'feature_dim', 'max_regions', 'storage_dtype', 'splits':
    {split: {'examples', 'skipped', 'by_kind', 'truncated'}}, 'empty_splits':
    {split: why}, 'shards': {split: count}, 'resumed_shards': int,
    'num_workers', 'engine'}; splits and empty_splits empty if the dataset
    existed and `overwrite` is False.
  """
  from capture_jax.training import lock as lock_lib  # pylint: disable=import-outside-toplevel

  _check_arguments(num_workers, examples_per_shard, vocab_file)
  config = schema.config_name(storage_dtype, with_cls_prob)
  final = schema.dataset_dir(tfds_dir, storage_dtype, with_cls_prob)
  features = features or os.path.join(data_dir, 'features')
  # feature_dim 0: not known yet (read from the features once they are open).
  probe = Spec(
      tfds_dir,
      features,
      storage_dtype,
      max_regions,
      feature_dim or 0,
      skip_bad,
      with_cls_prob,
      vocab_file,
  )
  execution = Execution(
      num_workers, None if beam_options is None else tuple(beam_options), progress
  )
  report = _new_report(final, probe)
  with lock_lib.FolderLock(
      os.path.join(tfds_dir, schema.NAME), lock_name(config), 'product1m build', True
  ):
    work = final + INCOMPLETE_SUFFIX
    if _is_finished(final):
      if storage.is_remote(work):
        storage.remove_tree(work)  # left by a publish killed after its last copy
      if not overwrite:
        _check_existing(final, probe)
        return report
      storage.remove_tree(final)
    try:
      return _build_locked(data_dir, probe, examples_per_shard, execution, work, report)
    except ValueError:
      # Bad input (formats.BadInputError) or nothing usable in it: the inputs must change, so
      # nothing of this build can be resumed.
      storage.remove_tree(work)
      config_dir = os.path.dirname(final)
      if os.path.isdir(config_dir) and not os.listdir(config_dir):
        os.rmdir(config_dir)
      raise
    except BaseException:
      # A failed or killed worker, a full disk, Ctrl-C: the shards written so far stay in the
      # `.incomplete` folder (which no reader takes for a dataset) and the same command resumes.
      print(f'note: the build stopped; rerun the same command to resume from {work}', flush=True)
      raise


def _check_arguments(num_workers: int, examples_per_shard: int, vocab_file: str) -> None:
  """Raises ValueError (or OSError: no vocab file) before anything is locked or written."""
  if num_workers < 1:
    raise ValueError(f'num_workers must be at least 1, got {num_workers}')
  if examples_per_shard < 1:
    raise ValueError(f'examples_per_shard must be at least 1, got {examples_per_shard}')
  if not storage.is_file(vocab_file):
    raise FileNotFoundError(
        f'vocab {vocab_file}: no such file (the build tokenises the titles with it); train one '
        'with `python -m capture_jax.data.tokenizer train --data_dir DATA --out vocab.txt`'
    )
  tokenizer_lib.read_vocab(vocab_file)  # malformed: ValueError naming the line


def _new_report(final: str, probe: Spec) -> dict[str, Any]:
  """The build's report before anything is built (`feature_dim` None: read from the features)."""
  return {
      'dataset_dir': final,
      'feature_dim': probe.feature_dim or None,
      'max_regions': probe.max_regions,
      'storage_dtype': probe.storage_dtype,
      'splits': {},
      'empty_splits': {},
  }


def _check_existing(final: str, spec: Spec) -> None:
  """Raises ValueError (with the command that rebuilds) if the finished dataset `final` is not one
  of `spec`'s vocab: reusing it would train on token ids of another vocab."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  schema.check_identity(
      final,
      tfds.builder_from_directory(final).info.metadata,
      spec.vocab_file,
      schema.rebuild_command(
          spec.tfds_dir, spec.storage_dtype, spec.with_cls_prob, spec.vocab_file
      ),
  )


def _build_locked(
    data_dir: str,
    probe: Spec,
    examples_per_shard: int,
    execution: Execution,
    work: str,
    report: dict,
) -> dict:
  """`build` under the lock: plan, write the missing shards into `work`, count, publish."""
  paths = schema.annotation_paths(data_dir)
  plan_id = fingerprint(probe, paths, examples_per_shard)
  index = (
      None
      if probe.features.startswith(GENERATED_PREFIX)
      else os.path.join(work, WORK_DIR, 'index.npz')
  )
  resuming = _start_or_resume(work, plan_id)
  spec = _with_feature_dim(probe, index, resuming, paths, execution)
  report['feature_dim'] = spec.feature_dim
  split_tasks, split_counters = _plan_splits(paths, examples_per_shard, spec.skip_bad)
  _write_json(
      os.path.join(work, WORK_DIR, 'plan.json'),
      {'plan': plan_id, 'spec': dataclasses.asdict(spec)},
  )
  tasks = [t for ts in split_tasks.values() for t in ts]
  markers, resumed = _write_shards(spec, tasks, work, plan_id, index, execution, resuming)
  built = _count_splits(split_tasks, split_counters, markers, paths, work, report)
  report['shards'] = {s: len(ts) for s, ts in built.items()}
  report['resumed_shards'] = resumed
  report['num_workers'] = execution.num_workers
  report['engine'] = execution.engine
  storage.write_text(os.path.join(work, schema.REPORT_NAME), json.dumps(report, indent=1))
  _publish(spec, work, work.removesuffix(INCOMPLETE_SUFFIX), built, markers)
  return report


def _start_or_resume(work: str, plan_id: str) -> bool:
  """Prepares `work` for the plan `plan_id`; True if it holds an interrupted build of that plan
  (its shards are kept), False if it starts over (a build of other inputs or settings there is
  removed)."""
  plan_file = os.path.join(work, WORK_DIR, 'plan.json')
  previous = None
  if storage.is_file(plan_file):
    try:
      previous = json.loads(storage.read_bytes(plan_file))
    except ValueError:
      previous = None
  resuming = previous is not None and previous.get('plan') == plan_id
  if resuming:
    print(f'note: resuming the interrupted build in {work}', flush=True)
  elif storage.exists(work):
    print(f'note: starting over: {work} was left by a build of other inputs or settings')
    storage.remove_tree(work)
  storage.makedirs(os.path.join(work, WORK_DIR))
  for stale in epath.Path(work, WORK_DIR).glob('error-*.json'):
    stale.unlink()
  return resuming


def _with_feature_dim(
    probe: Spec, index: str | None, resuming: bool, paths: dict, execution: 'Execution'
) -> Spec:
  """`probe` with its feature width (read from the features unless given). Indexes the feature
  files into `index` (kept for the workers), or reuses the index of the build being resumed."""
  store = None
  if index and resuming:
    try:
      store = open_store(probe.features, index)
    except (OSError, ValueError) as err:  # index lost or damaged: scan the TSVs again
      print(f'note: re-indexing the features ({err})', flush=True)
  if store is None:
    if index:
      make_index(probe.features, index, execution)
    store = open_store(probe.features, index)
  feature_dim = probe.feature_dim
  if not feature_dim:
    feature_dim = (
        store.feature_dim
        if isinstance(store, GeneratedFeatures)
        else schema.infer_feature_dim(store, list(paths.values()))
    )
  store.close()
  return dataclasses.replace(probe, feature_dim=feature_dim)


def _plan_splits(
    paths: dict[str, str], examples_per_shard: int, skip_bad: bool
) -> tuple[dict[str, list[ShardTask]], dict[str, formats.BadInputCounter]]:
  """Every split's shard tasks (numbered in annotation order over all splits) and its
  line-level bad-input counts."""
  split_tasks: dict[str, list[ShardTask]] = {}
  split_counters: dict[str, formats.BadInputCounter] = {}
  order = 0
  for split, path in paths.items():
    planned, split_counters[split] = plan_split(split, path, examples_per_shard, skip_bad)
    split_tasks[split] = []
    for t in planned:
      split_tasks[split].append(ShardTask(order=order, **t))
      order += 1
  return split_tasks, split_counters


def _write_shards(
    spec: Spec,
    tasks: list[ShardTask],
    work: str,
    plan_id: str,
    index: str | None,
    execution: Execution,
    resuming: bool,
) -> tuple[dict[int, dict], int]:
  """Writes the shards that have no valid marker yet (all of them unless `resuming`) with the
  execution's engine; returns ({order: marker} of every task, how many were resumed)."""
  from capture_jax import progress as progress_lib  # pylint: disable=import-outside-toplevel

  markers: dict[int, dict] = {}
  for t in tasks:
    m = _read_marker(work, t, plan_id) if resuming else None
    if m is not None:
      markers[t.order] = m
  resumed = len(markers)
  pending = [t for t in tasks if t.order not in markers]
  bar = progress_lib.Progress(len(tasks), 'product1m shards', 'shard', enabled=execution.progress)
  bar.update(resumed)
  if pending and execution.engine == 'beam':
    _run_beam(spec, pending, work, plan_id, index, execution.beam_options)
  elif pending and execution.engine == 'processes':
    _run_processes(spec, pending, work, plan_id, index, execution.num_workers, bar.update)
  elif pending:
    writer = ShardWriter(spec, work, index)
    for t in pending:
      writer.write(t, plan_id)
      bar.update(1)
  bar.close()
  for t in pending:
    m = _read_marker(work, t, plan_id)
    if m is None:
      raise RuntimeError(f'shard {t.filename} has no done marker after its worker finished')
    markers[t.order] = m
  return markers, resumed


def _count_splits(
    split_tasks: dict[str, list[ShardTask]],
    split_counters: dict[str, formats.BadInputCounter],
    markers: dict[int, dict],
    paths: dict[str, str],
    work: str,
    report: dict,
) -> dict[str, list[ShardTask]]:
  """Fills report['splits'] and report['empty_splits'] from the markers; returns the shard tasks
  of the splits that have examples (an empty split's shards are removed). Raises ValueError if
  no split has any."""
  built: dict[str, list[ShardTask]] = {}
  for split, ts in split_tasks.items():
    counter = _merge_counts(split_counters[split], [markers[t.order] for t in ts])
    n = sum(markers[t.order]['examples'] for t in ts)
    if not n:
      report['empty_splits'][split] = schema.why_empty(paths[split], counter)
      logging.warning('product1m: split %s is not built: %s', split, report['empty_splits'][split])
      for t in ts:
        storage.remove_tree(os.path.join(work, t.filename))
      continue
    report['splits'][split] = {'examples': n, **counter.as_dict()}
    if counter.total or counter.truncated:
      logging.warning('product1m %s: %s', split, counter.summary())
    built[split] = ts
  if not built:
    raise ValueError(
        'no split has a usable sample, nothing to build: '
        + '; '.join(report['empty_splits'].values())
    )
  return built
