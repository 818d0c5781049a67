"""`launch/slurm_gpu.sbatch` under a real SLURM (tests/slurm_cluster.py: slurmctld and slurmd on
this machine, one node with 2 CPUs): two JAX processes on CPU devices (Gloo) train the tiny
config in one workdir; preemption (`scancel --signal=TERM`) and a task killed with SIGKILL end
the job, and the next submission resumes to the uninterrupted run's parameters, bitwise.

Skipped, with the reason, where SLURM cannot run (`.ci/run` installs slurm-wlm and munge).
On a failure the message holds the job's output and the tails of the daemons' logs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from capture_jax.training import checkpoint as checkpoint_lib
from tests import slurm_cluster
from tests.helpers import compile_cache_env
from tests.helpers import trainer_config
from tests.helpers import write_config_module

REPO = Path(__file__).resolve().parents[1]
SCRIPT = 'launch/slurm_gpu.sbatch'
SLOW_MAIN = 'tests/multidevice/slow_train.py'
VIEW_MAIN = 'tests/multidevice/slurm_view.py'
STEPS = 10


@pytest.fixture(scope='module')
def cluster(tmp_path_factory):
  stack = contextlib.ExitStack()
  try:
    running = stack.enter_context(slurm_cluster.start(tmp_path_factory.mktemp('slurm') / 'cluster'))
  except slurm_cluster.Unavailable as e:
    pytest.skip(f'no SLURM here: {e}')
  with stack:
    yield running


@pytest.fixture(scope='module')
def config_file(tmp_path_factory) -> Path:
  """The tiny trainer config (checkpoints every 2 steps), as a configs/*.py module."""
  root = tmp_path_factory.mktemp('slurm_config')
  cfg = trainer_config(root / 'data')
  cfg.train.num_steps = STEPS
  cfg.checkpoint.keep_last = 100
  return write_config_module(root / 'config.py', cfg)


class Job:
  """One submission of the script: its id, workdir and output file."""

  def __init__(self, cluster, config_file: Path, workdir: Path, *sbatch_args: str, **env: str):
    self.cluster, self.workdir = cluster, workdir
    self.output = workdir.parent / f'{workdir.name}.{len(list(workdir.parent.glob("*.out")))}.out'
    self.id = cluster.sbatch(
        # The script asks for 2 GPU nodes; this cluster has one node with 2 CPUs and no GPUs.
        '--nodes=1',
        '--ntasks-per-node=2',
        '--cpus-per-task=1',
        '--gpus-per-node=0',
        f'--output={self.output}',
        *sbatch_args,
        SCRIPT,
        f'--config={config_file}',
        f'--workdir={workdir}',
        cwd=REPO,
        env={'PYTHON': sys.executable, 'JAX_PLATFORMS': 'cpu', **compile_cache_env(), **env},
    )

  def text(self) -> str:
    return self.output.read_text(errors='replace') if self.output.exists() else ''

  def report(self) -> str:
    return (
        f'job {self.id} output ({self.output}):\n{self.text()[-6000:]}\n{self.cluster.log_tails()}'
    )

  def wait(self, timeout: float = 600) -> dict[str, str]:
    return self.cluster.wait(self.id, timeout)

  def wait_for_checkpoint(self, step: int, timeout: float = 300) -> None:
    def saved_or_ended():
      return step in saved_steps(self.workdir) or self.cluster.job(self.id)['JobState'] not in (
          'PENDING',
          'RUNNING',
      )

    self.cluster.wait_until(saved_or_ended, timeout)
    assert step in saved_steps(self.workdir), self.report()


def saved_steps(workdir: Path) -> list[int]:
  """The steps of the finished (renamed from Orbax's temporary name) checkpoints."""
  ckpts = checkpoint_lib.checkpoint_dir(workdir)
  return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.is_dir() else []


def final_params(workdir: Path) -> dict[str, np.ndarray]:
  """The parameters of the last checkpoint, as numpy arrays by path (read on one process)."""
  path = checkpoint_lib.checkpoint_dir(workdir) / str(saved_steps(workdir)[-1]) / 'state'
  with ocp.PyTreeCheckpointer() as ckptr:
    meta = ckptr.metadata(path).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
    state = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
  flat = ocp.tree.to_flat_dict(state['params'], sep='/')
  return {k: np.asarray(v) for k, v in flat.items()}


def losses(workdir: Path) -> list[tuple[int, float]]:
  """`metrics.jsonl`'s (step, total loss) rows, in file order (a step written twice shows)."""
  rows = map(json.loads, (workdir / 'metrics.jsonl').read_text().splitlines())
  return [(r['step'], r['loss/total']) for r in rows]


def assert_same_run(workdir: Path, reference: Path) -> None:
  a, b = final_params(reference), final_params(workdir)
  assert sorted(a) == sorted(b) and a
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert losses(workdir) == losses(reference)


@pytest.fixture(scope='module')
def reference(cluster, config_file, tmp_path_factory) -> Job:
  """One uninterrupted job (plain `-m capture_jax.train`), shared by the tests."""
  job = Job(cluster, config_file, tmp_path_factory.mktemp('slurm_runs') / 'reference')
  info = job.wait()
  assert (info['JobState'], info['ExitCode']) == ('COMPLETED', '0:0'), job.report()
  return job


@pytest.mark.slow
def test_script_trains_two_processes_in_one_workdir(cluster, reference):
  """The node list, task count and ids come from SLURM: one coordinator on the node, two
  processes, each writing its share of every checkpoint."""
  text = reference.text()
  port = 20000 + int(reference.id) % 20000
  line = f'slurm_gpu: 2 processes on 1 nodes (2 per node), coordinator {cluster.node}:{port}'
  assert line in text, reference.report()
  assert saved_steps(reference.workdir)[-1] == STEPS
  data = checkpoint_lib.checkpoint_dir(reference.workdir) / str(STEPS) / 'data'
  shares = sorted(p.name for p in data.iterdir() if p.suffix == '.json')
  assert shares == ['process_0-of-2.json', 'process_1-of-2.json'], reference.report()
  assert [step for step, _ in losses(reference.workdir)] == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_jax_slurm_detection_agrees_with_the_script_and_the_time_limit_warns_every_task(
    cluster, config_file, tmp_path
):
  """Each task's coordinator host, process count and id from the script (scontrol show hostnames,
  SLURM_NTASKS, SLURM_PROCID) are the ones JAX's own SLURM detection reads (SLURM_STEP_NODELIST,
  ...), and the trainer's arguments arrive unchanged through srun. `--time=2 --signal=TERM@100`
  (the script's `--signal=TERM@180`, scaled down): SIGTERM reaches every task before the limit."""
  job = Job(
      cluster,
      config_file,
      tmp_path / 'view',
      '--time=2',
      '--signal=TERM@100',
      CAPTURE_MAIN=VIEW_MAIN,
      CAPTURE_TEST_AWAIT_SIGTERM_S='110',
  )
  info = job.wait()
  assert (info['JobState'], info['ExitCode']) == ('COMPLETED', '0:0'), job.report()
  lines = job.text().splitlines()
  views = [json.loads(line[5:]) for line in lines if line.startswith('VIEW ')]
  views.sort(key=lambda v: v['jax']['process_id'])
  assert len(views) == 2, job.report()
  port = 20000 + int(job.id) % 20000
  for i, v in enumerate(views):
    assert v['argv'] == [f'--config={config_file}', f'--workdir={tmp_path / "view"}']
    assert v['script'] == {
        'coordinator': f'{cluster.node}:{port}',
        'num_processes': '2',
        'process_id': str(i),
        'local_device_ids': str(i),  # 2 tasks on the node: task i takes local device i
    }
    jax_view = v['jax']
    assert jax_view['present'] and jax_view['coordinator'].split(':')[0] == cluster.node
    assert (jax_view['num_processes'], jax_view['process_id']) == (2, i)
    assert jax_view['local_process_id'] == i
    # CAPTURE_CLUSTER=slurm: JAX's detection; 2 tasks on 1 node, so GPU SLURM_LOCALID each.
    assert v['plan'] == ['slurm', 2, i, None]
  terms = [json.loads(line[8:]) for line in lines if line.startswith('SIGTERM ')]
  terms.sort(key=lambda t: t['process_id'])
  assert [t['process_id'] for t in terms] == [0, 1], job.report()
  # Due 20 s after the start; SLURM checks time limits every 30 s or so.
  assert all(t['after_s'] is not None and t['after_s'] < 110 for t in terms), job.report()


@pytest.mark.slow
def test_scancel_signal_term_stops_both_tasks_at_one_step_and_the_next_job_resumes(
    cluster, config_file, reference, tmp_path
):
  """What a cluster sends before preempting or at `--signal=TERM@...`: SIGTERM to every task."""
  workdir = tmp_path / 'run'
  first = Job(cluster, config_file, workdir, CAPTURE_MAIN=SLOW_MAIN)
  first.wait_for_checkpoint(2)
  cluster.run('scancel', '--signal=TERM', first.id)
  info = first.wait()
  assert (info['JobState'], info['ExitCode']) == ('COMPLETED', '0:0'), first.report()
  text = first.text()
  stop = saved_steps(workdir)[-1]
  assert 2 <= stop < STEPS, first.report()
  for i in range(2):
    assert f'RESULT process {i} step {stop} preempted True' in text, first.report()
  assert f'stopped at step {stop} on request' in text
  data = checkpoint_lib.checkpoint_dir(workdir) / str(stop) / 'data'
  assert sorted(p.name for p in data.iterdir() if p.suffix == '.json') == [
      'process_0-of-2.json',
      'process_1-of-2.json',
  ]

  second = Job(cluster, config_file, workdir)
  info = second.wait()
  assert (info['JobState'], info['ExitCode']) == ('COMPLETED', '0:0'), second.report()
  assert f'resumed from the checkpoint at step {stop}' in second.text(), second.report()
  assert_same_run(workdir, reference.workdir)


def task_pids(cluster, job_id: str) -> dict[int, int]:
  """The pids of the job's step 0 tasks by global task id (`scontrol listpids`)."""
  out = cluster.run('scontrol', 'listpids', f'{job_id}.0').stdout.splitlines()[1:]
  return {int(f[4]): int(f[0]) for f in map(str.split, out) if len(f) == 5 and f[4].isdigit()}


@pytest.mark.slow
def test_a_killed_task_ends_the_job_and_the_next_job_resumes_from_the_last_checkpoint(
    cluster, config_file, reference, tmp_path
):
  """SIGKILL to process 1 (no checkpoint, no goodbye): srun --kill-on-bad-exit ends process 0,
  which would otherwise wait for it in a collective; the next job resumes."""
  workdir = tmp_path / 'run'
  first = Job(cluster, config_file, workdir, CAPTURE_MAIN=SLOW_MAIN)
  first.wait_for_checkpoint(2)
  pids = task_pids(cluster, first.id)
  assert sorted(pids) == [0, 1], first.report()
  os.kill(pids[1], signal.SIGKILL)
  killed_at = time.monotonic()
  info = first.wait(timeout=120)
  assert info['JobState'] == 'FAILED' and info['ExitCode'] != '0:0', first.report()
  # KillWait=5 s (slurm_cluster.slurm_conf). Without --kill-on-bad-exit, JAX's coordination
  # service aborts process 0 once process 1's heartbeats stop: about 60 s here.
  assert time.monotonic() - killed_at < 30, first.report()
  assert 'RESULT' not in first.text(), first.report()
  last = saved_steps(workdir)[-1]
  assert 2 <= last < STEPS, first.report()

  second = Job(cluster, config_file, workdir)
  info = second.wait()
  assert (info['JobState'], info['ExitCode']) == ('COMPLETED', '0:0'), second.report()
  assert f'resumed from the checkpoint at step {last}' in second.text(), second.report()
  assert_same_run(workdir, reference.workdir)


def test_no_slurm_is_a_reason_to_skip_not_a_pass(monkeypatch, tmp_path):
  """What the `cluster` fixture turns into a skip: a missing program is named, nothing starts."""
  monkeypatch.setattr(slurm_cluster, '_which', lambda name: None if name == 'slurmd' else name)
  with pytest.raises(slurm_cluster.Unavailable, match='slurmd not installed'):
    with slurm_cluster.start(tmp_path / 'cluster'):
      pass
  assert not (tmp_path / 'cluster').exists()


def test_slurm_conf_names_one_node_with_its_cpus_and_no_gpus(tmp_path):
  conf = slurm_cluster.slurm_conf(tmp_path, 'node7', (7001, 7002), tmp_path / 'munge.socket')
  assert f'NodeName=node7 NodeAddr=127.0.0.1 CPUs={slurm_cluster.CPUS} State=UNKNOWN' in conf
  assert 'Gres' not in conf and f'AuthInfo=socket={tmp_path}/munge.socket' in conf
  assert 'SlurmctldPort=7001' in conf and 'SlurmdPort=7002' in conf
