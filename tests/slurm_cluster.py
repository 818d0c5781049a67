"""A real one-node SLURM on this machine, for tests: munged, slurmctld and slurmd as our processes.

    with slurm_cluster.start(tmp_path / 'slurm') as cluster:   # raises Unavailable if it cannot
      job = cluster.sbatch('--ntasks=2', 'launch/slurm_gpu.sbatch', '--workdir=...')
      info = cluster.wait(job)                                 # {'JobState': 'COMPLETED', ...}

Everything lives under one folder: the generated `slurm.conf` (one node, this host by its
short name at 127.0.0.1, `CPUS` CPUs, no GPUs; free ports), a munge key, the daemons' state,
spool, pid and log files. The daemons run in the foreground as children of the test process
(munged with `--force`, since the tests run as root), and are stopped when the block ends.
Commands (`sbatch`, `scontrol`, ...) find this cluster through `SLURM_CONF`, which
`cluster.env` sets; jobs inherit it (sbatch exports the environment), so `srun` inside a job
talks to the same controller.

Needs Debian's `slurm-wlm` (22.05) and `munge` and root (slurmd starts the tasks as the
submitting user). Anything missing raises `Unavailable` with the reason, for a skip.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator, Mapping

import portpicker

CPUS = 2
DAEMONS = ('munged', 'slurmctld', 'slurmd')
TOOLS = ('munge', 'sbatch', 'scontrol', 'scancel', 'sinfo')
FINISHED = (
    'COMPLETED',
    'FAILED',
    'CANCELLED',
    'TIMEOUT',
    'NODE_FAIL',
    'PREEMPTED',
    'OUT_OF_MEMORY',
)
FINISHED_RE = re.compile('|'.join(FINISHED))


class Unavailable(RuntimeError):
  """SLURM cannot run here (a program missing, not root, a daemon that does not start)."""


def _which(name: str) -> str | None:
  # The daemons are in /usr/sbin, which a non-login PATH may lack.
  return shutil.which(name) or shutil.which(name, path='/usr/sbin:/sbin')


def slurm_conf(root: Path, node: str, ports: tuple[int, int], munge_socket: Path) -> str:
  """The cluster's slurm.conf: node `node` (127.0.0.1) with `CPUS` CPUs, partition `debug`.

  No cgroups (proctrack/linuxproc, task/none): they need a cgroup hierarchy that containers
  rarely give. `KillWait=5`: a job's remaining tasks get SIGKILL 5 s after SIGTERM (default 30).
  """
  ctld_port, slurmd_port = ports
  return f"""\
ClusterName=capturetest
SlurmctldHost={node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=debug
SlurmdDebug=debug
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
KillWait=5
MinJobAge=3600
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName={node} NodeAddr=127.0.0.1 CPUs={CPUS} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def parse_fields(text: str) -> dict[str, str]:
  """`scontrol show -o` output (`Key=Value Key=Value ...`) as a dict."""
  return dict(m.groups() for m in re.finditer(r'(\w+)=(\S*)', text))


class Cluster:
  """A running cluster (see the module docstring); `env` is what commands need."""

  def __init__(self, root: Path, node: str):
    self.root = root
    self.node = node
    self.env = {**os.environ, 'SLURM_CONF': str(root / 'slurm.conf')}
    self.procs: dict[str, subprocess.Popen] = {}

  # -- the daemons --

  def spawn(self, name: str, *args: str) -> None:
    log = open(self.root / 'log' / f'{name}.out', 'wb')  # pylint: disable=consider-using-with
    self.procs[name] = subprocess.Popen(
        [_which(name) or name, *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=self.env,
        start_new_session=True,  # a ^C to pytest is not theirs; stop() ends them
    )
    log.close()

  def check_alive(self) -> None:
    for name, proc in self.procs.items():
      if proc.poll() is not None:
        raise Unavailable(f'{name} exited with status {proc.returncode}\n{self.log_tails()}')

  def stop(self) -> None:
    """Cancels what still runs, then stops the daemons (TERM, then KILL after 15 s)."""
    if 'slurmctld' in self.procs and self.procs['slurmctld'].poll() is None:
      self.run('scancel', '--full', f'--user={os.getuid()}', check=False, timeout=30)
      self.wait_until(lambda: not self.run('squeue', '-h', check=False).stdout.strip(), 30)
    for name in reversed(list(self.procs)):
      proc = self.procs[name]
      if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
          proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
          proc.kill()
          proc.wait()

  def log_tails(self, lines: int = 40) -> str:
    """The last `lines` of each daemon's log, for a failure message."""
    parts = [f'(SLURM logs under {self.root / "log"})']
    for path in sorted((self.root / 'log').glob('*')):
      tail = path.read_text(errors='replace').splitlines()[-lines:]
      parts.append(f'--- {path.name}\n' + '\n'.join(tail))
    return '\n'.join(parts)

  # -- commands --

  def run(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    """A SLURM or munge command against this cluster; raises with the logs' tails on failure."""
    proc = subprocess.run(
        argv, env=self.env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
      raise RuntimeError(
          f'{" ".join(argv)}: status {proc.returncode}\n{proc.stdout}{proc.stderr}\n'
          + self.log_tails()
      )
    return proc

  @staticmethod
  def wait_until(ready, timeout: float, poll: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if ready():
        return True
      time.sleep(poll)
    return False

  def sbatch(
      self, *args: str, cwd: Path | None = None, env: Mapping[str, str] | None = None
  ) -> str:
    """Submits; returns the job id (`sbatch --parsable`)."""
    proc = subprocess.run(
        [_which('sbatch'), '--parsable', *args],
        env={**self.env, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
      raise RuntimeError(f'sbatch {" ".join(args)}: {proc.stderr}\n{self.log_tails()}')
    return proc.stdout.strip().split(';')[0]

  def job(self, job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, ExitCode, ...)."""
    return parse_fields(self.run('scontrol', 'show', '-o', 'job', job_id).stdout)

  def wait(self, job_id: str, timeout: float = 600) -> dict[str, str]:
    """Waits until the job has finished; its final `job()` fields."""
    info = {}

    def finished():
      nonlocal info
      info = self.job(job_id)
      return FINISHED_RE.fullmatch(info.get('JobState', '')) is not None

    if not self.wait_until(finished, timeout, poll=0.5):
      raise TimeoutError(f'job {job_id} still {info.get("JobState")} after {timeout} s')
    return info


def _check_prerequisites() -> str:
  """The short host name; raises Unavailable when something SLURM needs is missing."""
  missing = [n for n in (*DAEMONS, *TOOLS, 'srun', 'squeue', 'slurmstepd') if not _which(n)]
  if missing:
    raise Unavailable(
        f'{", ".join(missing)} not installed (apt-get install slurm-wlm munge; .ci/run does)'
    )
  if os.geteuid() != 0:
    raise Unavailable('slurmd must run as root to start the tasks of a job')
  node = socket.gethostname().split('.')[0]
  try:
    socket.gethostbyname(node)
  except OSError:
    raise Unavailable(f'the host name {node!r} does not resolve (jobs reach the node by name)')
  return node


def _start_munge(cluster: Cluster) -> Path:
  root = cluster.root
  (root / 'munge').mkdir(mode=0o700)
  key = root / 'munge' / 'munge.key'
  key.write_bytes(os.urandom(1024))
  key.chmod(0o400)
  sock = root / 'munge' / 'munge.socket'
  cluster.spawn(
      'munged',
      '--foreground',
      '--force',
      f'--key-file={key}',
      f'--socket={sock}',
      f'--pid-file={root}/munge/munged.pid',
      f'--seed-file={root}/munge/munged.seed',
      f'--log-file={root}/log/munged.log',
  )

  def works():
    cluster.check_alive()
    return (
        sock.exists() and cluster.run('munge', '-n', '-S', str(sock), check=False).returncode == 0
    )

  if not cluster.wait_until(works, 30):
    raise Unavailable(f'munged did not answer on {sock}\n{cluster.log_tails()}')
  return sock


def _node_state(cluster: Cluster) -> str:
  cluster.check_alive()
  proc = cluster.run('sinfo', '-h', '-N', '-o', '%T', check=False, timeout=10)
  return proc.stdout.strip() if proc.returncode == 0 else ''


@contextlib.contextmanager
def start(root: Path, startup_timeout: float = 60) -> Iterator[Cluster]:
  """Starts munged, slurmctld and slurmd under `root` (a new folder); stops them on exit."""
  node = _check_prerequisites()
  root.mkdir(parents=True)
  for sub in ('state', 'spool', 'log'):
    (root / sub).mkdir()
  cluster = Cluster(root, node)
  try:
    sock = _start_munge(cluster)
    ports = (portpicker.pick_unused_port(), portpicker.pick_unused_port())
    (root / 'slurm.conf').write_text(slurm_conf(root, node, ports, sock))
    conf = str(root / 'slurm.conf')
    cluster.spawn('slurmctld', '-D', '-c', '-f', conf)
    cluster.spawn('slurmd', '-D', '-f', conf, '-N', node)
    if not cluster.wait_until(lambda: _node_state(cluster) == 'idle', startup_timeout, 0.5):
      raise Unavailable(
          f'the node did not become idle in {startup_timeout} s (sinfo: '
          f'{_node_state(cluster)!r})\n{cluster.log_tails()}'
      )
    yield cluster
  finally:
    cluster.stop()
