"""Per-step metrics: JSON lines and TensorBoard event files (tensorboardX, no TensorFlow), process 0 only."""

from __future__ import annotations

import io
import json
import time
from typing import Mapping


from capture_jax import accelerators, storage
from capture_jax.training import distributed
from capture_jax.training import lock as lock_lib

# Peak dense bf16 FLOP/s of a device, for model FLOP utilisation (one table: accelerators.py).
peak_flops = accelerators.peak_flops


METRICS_FILE = 'metrics.jsonl'


def truncate_after(path: storage.PathLike, step: int) -> int:
  """Keeps the rows of `path` with `step <= step` (and drops a torn last line); returns how many
  rows were dropped.

  A resumed run replays the steps after its checkpoint, and a run whose
  checkpoints were deleted starts again at 1: without this the file would
  hold those steps twice. Rewritten whole (`storage.write_text`: a temporary
  file and a rename on disk, one upload on GCS).
  """
  path = storage.as_path(path)
  if not storage.is_file(path):  # raises on a read error (never "absent" by mistake)
    return 0
  kept, dropped = [], 0
  for line in storage.read_text(path).splitlines():
    try:
      keep = int(json.loads(line)['step']) <= step
    except (ValueError, KeyError, TypeError):
      keep = False  # a line cut by a kill: not a row
    if keep:
      kept.append(line + '\n')
    else:
      dropped += 1
  if dropped:
    storage.write_text(path, ''.join(kept))
  return dropped


class _ObjectEventWriter:
  """tensorboardX's record writer for `gs://` logdirs, through `storage` (gcsfs): the event file
  is kept in memory and uploaded whole at each flush (tensorboardX flushes every 120 s, and the
  trainer at every checkpoint). Registered instead of tensorboardX's own GCS writer, which
  needs the google-cloud-storage client and its own credentials setup."""

  def __init__(self, path: str):
    self.path = path
    self.buffer = io.BytesIO()

  def write(self, data: bytes) -> None:
    self.buffer.write(data)

  def flush(self) -> None:
    try:
      storage.write_bytes(self.path, self.buffer.getvalue())
    except lock_lib.LockLostError:
      # Refused: this command lost its workdir's lock and stops on that error (its one `error:`
      # line). tensorboardX would otherwise try again at exit, with a traceback.
      pass

  def close(self) -> None:
    self.flush()


class _ObjectEventWriterFactory:

  def open(self, path: str) -> _ObjectEventWriter:
    return _ObjectEventWriter(path)

  def directory_check(self, path: str) -> None:
    del path  # GCS has no folders to create


def _summary_writer(logdir: storage.Path, purge_step: int | None):
  from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  from tensorboardX import record_writer  # pylint: disable=import-outside-toplevel

  if storage.is_remote(logdir):
    record_writer.register_writer_factory('gs', _ObjectEventWriterFactory())
  return SummaryWriter(str(logdir), purge_step=purge_step)


class MetricWriter:
  """Writes `{workdir}/metrics.jsonl` and TensorBoard events under `{workdir}/tensorboard` on process 0.

  With `start_step` (the step the run starts from), rows and events of later
  steps left by an earlier run are dropped first, so that the files hold one
  row per step of the run the checkpoints describe.
  """

  def __init__(
      self, workdir: storage.PathLike, enabled: bool | None = None, start_step: int | None = None
  ):
    self.enabled = distributed.is_main_process() if enabled is None else enabled
    self._jsonl = None
    self._tb = None
    if self.enabled:
      workdir = storage.as_path(workdir)
      path = workdir / METRICS_FILE
      if start_step is not None:
        dropped = truncate_after(path, start_step)
        if dropped:
          print(
              f'dropped {dropped} row(s) after step {start_step} from {path} (the run resumes '
              f'from step {start_step})',
              flush=True,
          )
      self._jsonl = storage.AppendFile(path)
      # purge_step: TensorBoard hides the earlier run's events from this step on.
      purge = None if start_step is None else start_step + 1
      self._tb = _summary_writer(workdir / 'tensorboard', purge)

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    record = {'step': int(step), 'time': time.time(), **{k: float(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    for key, value in metrics.items():
      self._tb.add_scalar(key, float(value), int(step))

  def flush(self) -> None:
    """Makes every row written so far durable (on GCS: uploaded); called at each checkpoint."""
    if self.enabled:
      self._jsonl.flush(force=True)
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      try:
        self._jsonl.close()
      finally:  # closed also when the rows' upload fails (tensorboardX flushes again at exit)
        self._tb.close()
