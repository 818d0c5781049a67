"""The chaos soak (issue #37): a training run in a gs:// workdir, through the fault proxy, with
random transient faults and N kill -9 at random moments, resumed after each; its final state and
metrics.jsonl must equal those of an uninterrupted run, bitwise.

    nice .venv/bin/python -m tests.chaos_soak --kills 20 --seed 0

What it does:
1. Starts the GCS emulator (gcp-storage-emulator, in memory) and `tests/gcs_proxy.FaultProxy`
   in front of it, in this process; every client of the runs (gcsfs, google-cloud-storage,
   tensorstore) talks to the proxy.
2. The reference: `python -m capture_jax.train` on the tiny test config (tests/helpers.py) in
   gs://BUCKET/reference, through the proxy without faults, uninterrupted. Its timings (the
   moment the step is compiled, the run's length) set the ranges the kill moments are drawn
   from.
3. The chaos run: the same command in gs://BUCKET/chaos with every request faulted with
   probability `--fault_rate` (503, 429, 500, connection reset, lost answer; stalls with
   `--stalls`), SIGKILLed `--kills` times, run again after each kill until it completes. Each
   kill's moment is drawn (seeded) from three aims: a delay from the start (mostly JAX start-up
   and compile), a delay after the run's first checkpoint commit (steps), or the n-th write of a
   checkpoint (during a save). Each kill's phase is recorded from what the run printed and what
   it sent to the bucket: start-up (before the step was compiled), steps (compiled, no
   checkpoint write in flight), save (a checkpoint's files written, its commit marker not yet).
4. The comparison, with the faults off: the latest checkpoint of both runs restored (the whole
   train state: parameters, optimizer state, counters) and compared leaf by leaf, bitwise; the
   checkpoint's checksums verified; metrics.jsonl row by row: the same steps and every field
   bitwise (through JSON, which writes a float's shortest exact repr) except the wall-clock ones
   (`WALL_CLOCK_FIELDS`: time, step time, throughput, MFU), which differ between any two runs.

Exit status 0 when everything is equal; 1 on a mismatch, on a run that exited other than by
success or our kill (its last output lines are printed), or on a run stuck past `--run_timeout`.
The seed fixes the kill plan and the fault draws, not the interleaving of requests (threads,
timing): a failure is reproduced by the same seed with luck, and diagnosed from the printed log.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault('NO_GCE_CHECK', 'true')

REPO = Path(__file__).resolve().parents[1]
# Fields of a metrics.jsonl row measured from the wall clock: not compared.
WALL_CLOCK_FIELDS = ('time', 'step_time_s', 'samples_per_s', 'mfu')
COMPILED = 'compiled the train step'
WRITES = ('POST', 'PUT', 'PATCH', 'DELETE')
UPLOADS = ('POST', 'PUT', 'PATCH')


@dataclasses.dataclass
class Kill:
  """One kill -9: how its moment was aimed, when it landed and in which phase."""

  aim: str  # 'delay' (from the start), 'steps' (after the compile), 'save' (n-th checkpoint write)
  after_s: float  # from the run's start
  phase: str  # 'start-up', 'steps' or 'save'
  committed: list[int]  # checkpoint steps this run committed before the kill


@dataclasses.dataclass
class Attempt:
  """One start of the training command."""

  returncode: int
  seconds: float
  output: list[str]
  kill: Kill | None
  compiled_s: float | None = None  # when the step was compiled, from the start
  checkpoint_writes: int = 0
  committed: tuple[int, ...] = ()
  resumed_from: int | None = None  # the step it resumed from (None: a fresh start)


# --------------------------------------------------------------------------
# The bucket: the emulator and the proxy, in this process.


class Bucket:
  """`with Bucket() as b:` the emulator behind a FaultProxy; `b.env`, the clients' environment."""

  def __enter__(self) -> Bucket:
    from gcp_storage_emulator.server import create_server  # pylint: disable=import-outside-toplevel

    from tests import gcs_proxy  # pylint: disable=import-outside-toplevel
    from tests import test_storage_gcs as gcs_tests  # pylint: disable=import-outside-toplevel

    gcs_tests._send_generation_headers()  # pylint: disable=protected-access
    self.name = gcs_tests.BUCKET
    port = gcs_tests.free_port()
    self._server = create_server('localhost', port, in_memory=True, default_bucket=self.name)
    self._server.start()
    self.proxy = gcs_proxy.FaultProxy(f'http://localhost:{port}').__enter__()
    self.env = {
        'STORAGE_EMULATOR_HOST': self.proxy.url,
        'TENSORSTORE_GCS_HTTP_URL': self.proxy.url,
        'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',
        'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
    }
    return self

  def __exit__(self, *exc) -> None:
    self.proxy.__exit__(*exc)
    self._server.stop()


# --------------------------------------------------------------------------
# One run of the command, killed at a moment or not.


class Watch:
  """The run's output lines and the proxy's requests since the run started, timestamped."""

  def __init__(self, proc: subprocess.Popen, proxy):
    self.proc, self.proxy, self.start = proc, proxy, time.monotonic()
    self.lines: list[str] = []
    self.requests: list[tuple[float, str, str, str]] = []  # (t, method, target, outcome)
    self._seen = len(proxy.log)
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self) -> None:
    for line in self.proc.stdout:
      self.lines.append(line.rstrip('\n'))

  def poll(self) -> None:
    log = self.proxy.log
    now = time.monotonic() - self.start
    while self._seen < len(log):
      self.requests.append((now, *log[self._seen]))
      self._seen += 1

  def compiled(self) -> bool:
    return any(COMPILED in line for line in self.lines)

  def checkpoint_writes(self) -> list[str]:
    """The write requests (uploads, deletes) under checkpoints/ so far."""
    return [t for _, m, t, _ in self.requests if m in WRITES and '/checkpoints/' in t]

  def _uploads(self) -> list[str]:
    # Deletes are Orbax removing old steps (keep_last), not a save.
    return [t for _, m, t, _ in self.requests if m in UPLOADS and '/checkpoints/' in t]

  def committed(self) -> list[int]:
    """Checkpoint steps whose commit marker this run uploaded."""
    found = (re.search(r'checkpoints/(\d+)/commit_success', t) for t in self._uploads())
    return sorted({int(m.group(1)) for m in found if m})

  def saving(self) -> bool:
    """A checkpoint being written: a step's files uploaded, its commit marker not yet."""
    steps = set()
    for t in self._uploads():
      m = re.search(r'checkpoints/(\d+)[./]', t)
      if m:
        steps.add(int(m.group(1)))
    return bool(steps - set(self.committed()))

  def resumed_from(self) -> int | None:
    for line in self.lines:
      m = re.search(r'resumed from the checkpoint at step (\d+)', line)
      if m:
        return int(m.group(1))
    return None

  def wait(self, timeout: float) -> int:
    self.proc.wait(timeout)
    self._reader.join(10)
    self.poll()
    return self.proc.returncode


def start(command: list[str], env: dict[str, str], proxy) -> Watch:
  proc = subprocess.Popen(
      command,
      env=env,
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      start_new_session=True,  # its own process group: the kill reaches every process of it
  )
  return Watch(proc, proxy)


def run_once(command, env, proxy, aim: tuple[str, float] | None, timeout: float) -> Attempt:
  """Runs the command; with `aim`, kills it (SIGKILL) at that moment if it is still running.

  aim: ('delay', s) s after the start; ('steps', s) s after this run's first checkpoint commit
  (its steps have made progress); ('save', n) at the n-th checkpoint write request of this run.
  """
  watch = start(command, env, proxy)
  try:
    return _watch_and_kill(watch, aim, timeout)
  finally:  # the soak stopped (an error, ^C, SIGTERM): its run does not outlive it
    if watch.proc.poll() is None:
      os.killpg(watch.proc.pid, signal.SIGKILL)
      watch.proc.wait()


def _watch_and_kill(watch: Watch, aim, timeout: float) -> Attempt:
  kill, since, first_commit = None, None, None
  deadline = watch.start + timeout
  while watch.proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.01)
    watch.poll()
    now = time.monotonic() - watch.start
    if since is None and watch.compiled():
      since = now
    if first_commit is None and watch.committed():
      first_commit = now
    if aim is None:
      continue
    due = (
        (aim[0] == 'delay' and now >= aim[1])
        or (aim[0] == 'steps' and first_commit is not None and now >= first_commit + aim[1])
        or (aim[0] == 'save' and len(watch.checkpoint_writes()) >= aim[1])
    )
    if due:
      phase = 'save' if watch.saving() else 'steps' if watch.compiled() else 'start-up'
      kill = Kill(aim[0], now, phase, watch.committed())
      os.killpg(watch.proc.pid, signal.SIGKILL)
      break
  if watch.proc.poll() is None and kill is None:  # stuck: stop it and report
    os.killpg(watch.proc.pid, signal.SIGKILL)
    watch.wait(30)
    return Attempt(None, timeout, watch.lines, None)
  returncode = watch.wait(60)
  seconds = time.monotonic() - watch.start
  writes, committed = len(watch.checkpoint_writes()), tuple(watch.committed())
  return Attempt(
      returncode, seconds, watch.lines, kill, since, writes, committed, watch.resumed_from()
  )


# --------------------------------------------------------------------------
# The config and the command.


def write_config(folder: Path, num_steps: int, every_steps: int) -> Path:
  """The tests' tiny trainer config (tests/helpers.trainer_config) as a config file."""
  from tests import helpers  # pylint: disable=import-outside-toplevel

  cfg = helpers.trainer_config(folder / 'data')
  cfg.train.num_steps = num_steps
  cfg.checkpoint.update(every_steps=every_steps, keep_last=3)
  (folder / 'config.json').write_text(cfg.to_json())
  path = folder / 'soak_config.py'
  path.write_text(
      'import json\nimport ml_collections\n\n\ndef get_config():\n'
      f'  return ml_collections.ConfigDict(json.load(open({str(folder / "config.json")!r})))\n'
  )
  return path


def train_command(config: Path, workdir: str) -> list[str]:
  return [sys.executable, '-m', 'capture_jax.train', f'--config={config}', f'--workdir={workdir}']


# --------------------------------------------------------------------------
# The comparison.


def restore_state(workdir: str, config_json: Path):
  """The latest checkpoint's step and whole train state (as saved, no target), and the
  checkpoint's checksum problems."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  from capture_jax.training import checkpoint as checkpoint_lib  # pylint: disable=import-outside-toplevel

  cfg = ml_collections.ConfigDict(json.loads(config_json.read_text()))
  manager = checkpoint_lib.make_manager(workdir, cfg.checkpoint)
  try:
    step = manager.latest_step()
    problems = checkpoint_lib.checksum_problems(checkpoint_lib.step_dir(manager, step))
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return step, state['state'], problems
  finally:
    manager.close()


def state_differences(a, b) -> list[str]:
  """The leaves (by path) of two states that differ in structure, dtype, shape or any bit."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  leaves_a = dict(jax.tree_util.tree_flatten_with_path(a)[0])
  leaves_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
  if leaves_a.keys() != leaves_b.keys():
    return [f'tree structure differs: {sorted(map(str, leaves_a.keys() ^ leaves_b.keys()))[:5]}']
  out = []
  for path, x in leaves_a.items():
    x, y = np.asarray(x), np.asarray(leaves_b[path])
    if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
      out.append(f'{jax.tree_util.keystr(path)}: {x.dtype}{x.shape} vs {y.dtype}{y.shape}')
  return out


def metrics_differences(a: str, b: str) -> list[str]:
  """Row-by-row differences of two metrics.jsonl texts, wall-clock fields left out."""

  def rows(text):
    out = []
    for line in text.splitlines():
      row = json.loads(line)
      out.append(json.dumps({k: v for k, v in row.items() if k not in WALL_CLOCK_FIELDS}))
    return out

  ra, rb = rows(a), rows(b)
  out = [f'row {i + 1}: {x} != {y}' for i, (x, y) in enumerate(zip(ra, rb)) if x != y]
  if len(ra) != len(rb):
    out.append(f'{len(ra)} rows vs {len(rb)} rows')
  return out


# --------------------------------------------------------------------------
# The soak.


def draw_aim(
    rng: random.Random, reference: Attempt, saves: int, startup_s: float | None
) -> tuple[str, float]:
  """A kill moment (seeded): a delay up to 1.2 times the start-up (to the compiled step) of the
  runs so far (`startup_s`; None before a run from the compilation cache: no delay then); a
  delay of up to two save intervals of the reference after the run's first checkpoint commit;
  or the n-th checkpoint write, within the run's first three saves."""
  aim = rng.choice(['delay', 'steps', 'save'] if startup_s else ['steps', 'save'])
  if aim == 'delay':
    return aim, rng.uniform(0, startup_s * 1.2)
  if aim == 'steps':
    return aim, rng.uniform(0, 2 * (reference.seconds - reference.compiled_s) / saves)
  return aim, rng.randint(1, max(1, 3 * reference.checkpoint_writes // saves))


def tail(attempt: Attempt, n: int = 25) -> str:
  return '\n'.join('    ' + line for line in attempt.output[-n:])


def soak(args: argparse.Namespace) -> int:
  """The reference, the chaos run, the comparison; prints the summary. Returns the exit status."""
  from tests import gcs_proxy  # pylint: disable=import-outside-toplevel

  # The proxy's dropped connections and the emulator's 404s are the soak working, not news.
  for name in ('aiohttp.server', 'gcp_storage_emulator'):
    logging.getLogger(name).setLevel(logging.CRITICAL)
  rng = random.Random(args.seed)
  began = time.monotonic()
  with tempfile.TemporaryDirectory(prefix='chaos-soak-') as tmp, Bucket() as bucket:
    tmp = Path(tmp)
    config = write_config(tmp, args.steps, args.every)
    env = {
        **os.environ,
        **bucket.env,
        'CAPTURE_STORAGE_REQUEST_TIMEOUT_S': str(args.request_timeout),
        'PYTHONUNBUFFERED': '1',
        # The runs share compiled programs (the reference fills the cache): a resumed run
        # reaches its steps in seconds, not minutes, so that the kills land on steps and saves.
        'JAX_COMPILATION_CACHE_DIR': args.compile_cache or str(tmp / 'jax_cache'),
        'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
        'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '-1',
    }
    os.environ.update(bucket.env)  # the comparison, in this process, reads through the proxy
    reference_dir, chaos_dir = f'gs://{bucket.name}/reference', f'gs://{bucket.name}/chaos'

    print(f'reference: {args.steps} steps, a checkpoint every {args.every}, in {reference_dir}')
    reference = run_once(train_command(config, reference_dir), env, bucket.proxy, None, 600)
    if reference.returncode != 0 or reference.compiled_s is None:
      print(f'FAIL: the reference run exited {reference.returncode}:\n{tail(reference)}')
      return 1
    saves = max(1, len(reference.committed))
    print(
        f'  {reference.seconds:.1f} s, compiled at {reference.compiled_s:.1f} s, '
        f'{saves} checkpoints, {reference.checkpoint_writes} checkpoint writes',
        flush=True,
    )

    kinds = ['503', '429', '500', 'reset', 'lost'] + (['stall'] if args.stalls else [])
    faults = gcs_proxy.RandomFaults(
        args.fault_rate, kinds, seed=args.seed, stall_s=3 * args.request_timeout
    )
    bucket.proxy.randomly(faults)
    attempts: list[Attempt] = []
    while True:
      kills = sum(a.kill is not None for a in attempts)
      startup = min((a.compiled_s for a in attempts if a.compiled_s is not None), default=None)
      aim = draw_aim(rng, reference, saves, startup) if kills < args.kills else None
      attempt = run_once(train_command(config, chaos_dir), env, bucket.proxy, aim, args.run_timeout)
      attempts.append(attempt)
      print(describe(len(attempts), aim, attempt), flush=True)
      if attempt.returncode is None:
        print(f'FAIL: the run was stuck past {args.run_timeout} s:\n{tail(attempt)}')
        return 1
      if attempt.returncode == 0:
        attempt.kill = None  # finished before the kill landed
        break
      if attempt.kill is None or attempt.returncode != -signal.SIGKILL:
        print(f'FAIL: the run exited {attempt.returncode}:\n{tail(attempt)}')
        return 1
    bucket.proxy.randomly(None)
    injected = dict(faults.counts)

    differences = compare(reference_dir, chaos_dir, tmp / 'config.json')
    print_summary(args, attempts, injected, differences, time.monotonic() - began)
    return 1 if differences or sum(a.kill is not None for a in attempts) < args.kills else 0


def start_of(attempt: Attempt) -> int | str | None:
  """The step a run resumed from, 'scratch', or None when it was killed before it knew."""
  if attempt.resumed_from is not None:
    return attempt.resumed_from
  return 'scratch' if attempt.compiled_s is not None else None


def describe(n: int, aim, attempt: Attempt) -> str:
  start = start_of(attempt) or '(not restored yet)'
  if attempt.kill is not None and attempt.returncode != 0:
    k = attempt.kill
    aimed = f'{k.aim} {aim[1]:.2f}' if k.aim != 'save' else f'save write #{aim[1]}'
    return (
        f'run {n}: from {start}, killed at {k.after_s:.1f} s ({aimed}) in phase {k.phase}, '
        f'committed {list(k.committed)}'
    )
  return f'run {n}: from {start}, exited {attempt.returncode} after {attempt.seconds:.1f} s'


def compare(reference_dir: str, chaos_dir: str, config_json: Path) -> list[str]:
  """Every difference between the two runs' final states and metrics.jsonl (empty: equal)."""
  from capture_jax import storage  # pylint: disable=import-outside-toplevel
  from capture_jax.training import checkpoint as checkpoint_lib  # pylint: disable=import-outside-toplevel
  from capture_jax.training import lock as lock_lib  # pylint: disable=import-outside-toplevel

  out = []
  step_a, state_a, problems_a = restore_state(reference_dir, config_json)
  step_b, state_b, problems_b = restore_state(chaos_dir, config_json)
  if step_a != step_b:
    out.append(f'latest checkpoint: step {step_a} (reference) vs {step_b} (chaos)')
  for name, step, problems in (('reference', step_a, problems_a), ('chaos', step_b, problems_b)):
    if problems is None:  # a completed run checksums its last checkpoint
      out.append(f'{name} checkpoint {step}: no {checkpoint_lib.CHECKSUMS_FILE}')
    out += [f'{name} checkpoint: {p}' for p in problems or []]
  if storage.exists(storage.as_path(chaos_dir) / lock_lib.TRAIN_LOCK_FILE):
    out.append(f'{chaos_dir}: the lock was not released by the run that completed')
  out += state_differences(state_a, state_b)
  metrics = [(storage.as_path(d) / 'metrics.jsonl').read_text() for d in (reference_dir, chaos_dir)]
  out += metrics_differences(*metrics)
  return out


def print_summary(args, attempts: list[Attempt], injected, differences, seconds: float) -> None:
  kills = [a.kill for a in attempts if a.kill is not None]
  phases = collections.Counter(k.phase for k in kills)
  starts = [start_of(a) for a in attempts if start_of(a) is not None]
  print('\nchaos soak summary')
  print(f'  seed {args.seed}, {args.steps} steps, a checkpoint every {args.every}')
  print(f'  kill -9: {len(kills)} of {args.kills} asked; by phase: {dict(phases)}')
  print(
      f'  runs: {len(attempts)} ({len(attempts) - 1} resumes); those that got past their '
      f'restore started from {starts}'
  )
  print(f'  faults injected (rate {args.fault_rate}): {sum(injected.values())} {injected}')
  print(f'  wall time: {seconds:.0f} s')
  if differences:
    print('  result: DIFFERENT from the uninterrupted run:')
    for d in differences[:30]:
      print(f'    {d}')
  else:
    print(
        '  result: final train state (every leaf) and metrics.jsonl (every field but '
        f'{", ".join(WALL_CLOCK_FIELDS)}) bitwise equal to the uninterrupted run'
    )


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog='python -m tests.chaos_soak', description=__doc__.split('\n')[0]
  )
  parser.add_argument('--kills', type=int, default=20, help='kill -9 to land')
  parser.add_argument('--seed', type=int, default=0, help='the kill plan and the fault draws')
  parser.add_argument('--fault_rate', type=float, default=0.02, help='per request')
  parser.add_argument('--stalls', action='store_true', help='also stall requests (3x the timeout)')
  parser.add_argument(
      '--request_timeout',
      type=float,
      default=5.0,
      help='$CAPTURE_STORAGE_REQUEST_TIMEOUT_S of the runs',
  )
  parser.add_argument('--steps', type=int, default=None, help='default: 3 * kills + 6')
  parser.add_argument('--every', type=int, default=2, help='checkpoint every N steps')
  parser.add_argument(
      '--compile_cache',
      default=None,
      help="JAX's compilation cache for the runs (default: a fresh one)",
  )
  parser.add_argument('--run_timeout', type=float, default=600, help='a run past this is stuck')
  args = parser.parse_args(argv)
  if args.steps is None:
    args.steps = 3 * args.kills + 6
  return args


def main(argv=None) -> int:
  # SIGTERM unwinds like ^C: the run in progress is killed, the emulator stopped.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
  return soak(parse_args(argv))


if __name__ == '__main__':
  sys.exit(main())
