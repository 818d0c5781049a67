"""Multi-process start-up: `jax.distributed.initialize` from the environment.

Call `initialize()` first thing in a program, before any other JAX call (it
must precede backend initialisation). Where the processes learn about each
other, in order:

1. Explicit variables (what `launch/local_multiprocess.sh` and
   `launch/slurm_gpu.sbatch` set):

   | variable | meaning |
   | --- | --- |
   | `CAPTURE_COORDINATOR` (or `JAX_COORDINATOR_ADDRESS`) | `host:port` of process 0's coordinator service |
   | `CAPTURE_NUM_PROCESSES` | number of processes |
   | `CAPTURE_PROCESS_ID` | this process's id, `0 .. N-1` |
   | `CAPTURE_LOCAL_DEVICE_IDS` | optional: comma-separated local accelerator ids this process uses (default: all) |

   Setting `CAPTURE_NUM_PROCESSES` or `CAPTURE_PROCESS_ID` (or
   `CAPTURE_COORDINATOR`) selects this mode, and then all three are required.
   `CAPTURE_NUM_PROCESSES=1` is a single process (nothing to do).
2. SLURM: inside an `srun` step with more than one task (`SLURM_JOB_ID`,
   `SLURM_PROCID` and `SLURM_STEP_NUM_TASKS`/`SLURM_NTASKS` > 1), JAX's own
   SLURM detection gives the coordinator (first node of the step's node list,
   a port derived from the job id, or `JAX_COORDINATOR_PORT`), the process
   count and the id. JAX would then make each task see only GPU
   `SLURM_LOCALID` (right for one task per GPU); with one task per node we
   pass every local GPU instead (counted from `CUDA_VISIBLE_DEVICES` or
   `SLURM_GPUS_ON_NODE`, or given by `CAPTURE_LOCAL_DEVICE_IDS`).
3. Cloud TPU: on a TPU VM (JAX detects the TPU chips when imported) or in a
   GKE TPU pod (`TPU_WORKER_HOSTNAMES`, `TPU_PROCESS_ADDRESSES` or
   `MEGASCALE_COORDINATOR_ADDRESS` set), `jax.distributed.initialize()` with
   no arguments reads the workers from the TPU metadata server / environment.
   A single-host TPU VM is initialised as a 1-process cluster, which is harmless.
4. Otherwise: one process, nothing to do.

`CAPTURE_CLUSTER` forces a mode: `auto` (default), `explicit`, `slurm`,
`tpu` or `none` (never initialise). On CPU, cross-process collectives use
Gloo (`jax_cpu_collectives_implementation`, unless
`JAX_CPU_COLLECTIVES_IMPLEMENTATION` chooses another).

Decisions read from storage (is a checkpoint's manifest there, do its checksums match, which
export shards are missing) are taken once, on process 0, and sent to the others
(`decide_on_main`): each process reading for
itself could see a transient error the others do not, go down another path and leave the
others waiting in a collective (or restore one host unverified).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
from typing import Any, Callable, Mapping

import jax
import numpy as np

logger = logging.getLogger(__name__)

MODES = ('auto', 'explicit', 'slurm', 'tpu', 'none')
_TPU_ENV = ('TPU_WORKER_HOSTNAMES', 'TPU_PROCESS_ADDRESSES', 'MEGASCALE_COORDINATOR_ADDRESS')


@dataclasses.dataclass(frozen=True)
class Plan:
  """How this process joins the others.

  method: 'single' (nothing to do), 'explicit', 'slurm' or 'tpu'.
  The other fields are the arguments given to `jax.distributed.initialize`
  (None: left to JAX's detection).
  """

  method: str
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None

  def initialize_kwargs(self) -> dict:
    if self.method == 'explicit':
      return dict(
          coordinator_address=self.coordinator_address,
          num_processes=self.num_processes,
          process_id=self.process_id,
          local_device_ids=list(self.local_device_ids)
          if self.local_device_ids is not None
          else None,
          # Everything is given: do not let a surrounding SLURM / TPU
          # environment restrict the visible devices.
          cluster_detection_method='deactivate',
      )
    if self.method == 'slurm':
      kw = dict(cluster_detection_method='slurm')
      if self.local_device_ids is not None:
        kw['local_device_ids'] = list(self.local_device_ids)
      return kw
    return {}


def _int(env: Mapping[str, str], name: str) -> int:
  value = env[name]
  try:
    return int(value)
  except ValueError:
    raise ValueError(f'{name} must be an integer, got {value!r}') from None


def _device_ids(env: Mapping[str, str]) -> tuple[int, ...] | None:
  """`CAPTURE_LOCAL_DEVICE_IDS` ('0,1,2' or 'all'/'' for every local device)."""
  raw = env.get('CAPTURE_LOCAL_DEVICE_IDS', '').strip()
  if raw in ('', 'all'):
    return None
  try:
    return tuple(int(x) for x in raw.split(',') if x.strip())
  except ValueError:
    raise ValueError(
        f"CAPTURE_LOCAL_DEVICE_IDS must be comma-separated integers or 'all', got {raw!r}"
    ) from None


def _slurm_tasks(env: Mapping[str, str]) -> int:
  return _int(env, 'SLURM_STEP_NUM_TASKS' if 'SLURM_STEP_NUM_TASKS' in env else 'SLURM_NTASKS')


def _slurm_local_gpus(env: Mapping[str, str]) -> tuple[int, ...] | None:
  visible = env.get('CUDA_VISIBLE_DEVICES', '').strip()
  if visible and visible not in ('NoDevFiles',):
    return tuple(range(len([v for v in visible.split(',') if v.strip()])))
  gpus = env.get('SLURM_GPUS_ON_NODE', '').strip()
  if gpus.isdigit() and int(gpus) > 0:
    return tuple(range(int(gpus)))
  return None


def resolve(env: Mapping[str, str] | None = None, on_tpu_vm: bool = False) -> Plan:
  """Decides how to initialise from `env` (default `os.environ`); pure, raises ValueError on bad values.

  `on_tpu_vm`: whether this host has TPU chips (`initialize` asks JAX).
  """
  env = os.environ if env is None else env
  mode = env.get('CAPTURE_CLUSTER', 'auto').strip().lower() or 'auto'
  if mode not in MODES:
    raise ValueError(f'CAPTURE_CLUSTER must be one of {list(MODES)}, got {mode!r}')
  if mode == 'none':
    return Plan('single', num_processes=1, process_id=0)

  explicit_vars = ('CAPTURE_COORDINATOR', 'CAPTURE_NUM_PROCESSES', 'CAPTURE_PROCESS_ID')
  if mode == 'explicit' or (mode == 'auto' and any(env.get(v) for v in explicit_vars)):
    coordinator = env.get('CAPTURE_COORDINATOR') or env.get('JAX_COORDINATOR_ADDRESS')
    missing = [
        v
        for v, ok in (
            ('CAPTURE_COORDINATOR (or JAX_COORDINATOR_ADDRESS)', coordinator),
            ('CAPTURE_NUM_PROCESSES', env.get('CAPTURE_NUM_PROCESSES')),
            ('CAPTURE_PROCESS_ID', env.get('CAPTURE_PROCESS_ID')),
        )
        if not ok
    ]
    num = _int(env, 'CAPTURE_NUM_PROCESSES') if env.get('CAPTURE_NUM_PROCESSES') else None
    pid = _int(env, 'CAPTURE_PROCESS_ID') if env.get('CAPTURE_PROCESS_ID') else None
    if num == 1 and pid in (None, 0):
      return Plan('single', num_processes=1, process_id=0)
    if missing:
      raise ValueError(
          f'multi-process start-up needs {missing} as well (set: '
          f'{[v for v in explicit_vars if env.get(v)]})'
      )
    if num < 1 or not 0 <= pid < num:
      raise ValueError(f'CAPTURE_PROCESS_ID={pid} must be in [0, CAPTURE_NUM_PROCESSES={num})')
    if ':' not in coordinator:
      raise ValueError(f'the coordinator address must be host:port, got {coordinator!r}')
    return Plan('explicit', coordinator, num, pid, _device_ids(env))

  slurm = all(v in env for v in ('SLURM_JOB_ID', 'SLURM_PROCID')) and (
      'SLURM_STEP_NUM_TASKS' in env or 'SLURM_NTASKS' in env
  )
  if mode == 'slurm' or (mode == 'auto' and slurm and _slurm_tasks(env) > 1):
    if not slurm:
      raise ValueError('CAPTURE_CLUSTER=slurm but this is not a SLURM step (run it under srun)')
    tasks = _slurm_tasks(env)
    nodes = int(env.get('SLURM_STEP_NUM_NODES') or env.get('SLURM_NNODES') or tasks)
    ids = _device_ids(env)
    if ids is None and tasks == nodes:  # one task per node: every local GPU
      ids = _slurm_local_gpus(env)
      if ids is None:
        logger.warning(
            'one SLURM task per node but the local GPUs cannot be counted (no CUDA_VISIBLE_DEVICES '
            'or SLURM_GPUS_ON_NODE); JAX will use GPU SLURM_LOCALID only. Set '
            'CAPTURE_LOCAL_DEVICE_IDS=0,1,... to use them all.'
        )
    return Plan(
        'slurm', num_processes=tasks, process_id=_int(env, 'SLURM_PROCID'), local_device_ids=ids
    )

  if mode == 'tpu' or (mode == 'auto' and (on_tpu_vm or any(env.get(v) for v in _TPU_ENV))):
    hosts = [h for h in env.get('TPU_WORKER_HOSTNAMES', '').split(',') if h.strip()]
    if mode == 'auto' and len(hosts) == 1:
      return Plan('single', num_processes=1, process_id=0)
    return Plan('tpu')

  return Plan('single', num_processes=1, process_id=0)


def _on_tpu_vm() -> bool:
  # Set by JAX's import-time Cloud TPU set-up when the host has TPU chips.
  try:
    from jax._src import cloud_tpu_init
  except ImportError:  # pragma: no cover - a JAX without the module
    return False
  return bool(getattr(cloud_tpu_init, 'running_in_cloud_tpu_vm', False))


def initialize(env: Mapping[str, str] | None = None, *, initialization_timeout: int = 300) -> Plan:
  """Joins the other processes of the job (see the module docstring); returns what was done.

  `env` defaults to `os.environ` (a `ConfigDict` or any mapping of the same
  variable names works too). Does nothing for a single process, or when
  `jax.distributed` is already initialised.
  """
  plan = resolve(env, on_tpu_vm=_on_tpu_vm())
  if plan.method == 'single':
    return plan
  if jax.distributed.is_initialized():
    logger.info('jax.distributed is already initialised')
    return plan
  if 'JAX_CPU_COLLECTIVES_IMPLEMENTATION' not in os.environ:
    # Cross-process collectives of the CPU backend (tests, CPU clusters);
    # the accelerator backends ignore it.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  kwargs = plan.initialize_kwargs()
  logger.info('jax.distributed.initialize(%s) [%s]', kwargs, plan.method)
  jax.distributed.initialize(initialization_timeout=initialization_timeout, **kwargs)
  return plan


def is_main_process() -> bool:
  """True on process 0, the one that writes logs."""
  return jax.process_index() == 0


def process_summary() -> str:
  """`process i/N, L local of D devices (platform)`, for start-up logs."""
  return (
      f'process {jax.process_index()}/{jax.process_count()}, {jax.local_device_count()} local of '
      f'{jax.device_count()} devices ({jax.default_backend()})'
  )


# --------------------------------------------------------------------------
# Deciding together.


class PeerError(RuntimeError):
  """A decision failed on process 0 with an error this process cannot rebuild; its message."""


def _broadcast_json(obj: Any) -> Any:
  """Process 0's JSON-able `obj` on every process (two broadcasts: the length, then the bytes)."""
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  data = np.frombuffer(json.dumps(obj).encode('utf-8'), np.uint8) if is_main_process() else None
  size = int(multihost_utils.broadcast_one_to_all(np.int32(0 if data is None else data.size)))
  buffer = np.zeros(size, np.int32)  # int32: the broadcast is a sum over devices
  if data is not None:
    buffer[:] = data
  received = np.asarray(multihost_utils.broadcast_one_to_all(buffer)).astype(np.uint8)
  return json.loads(received.tobytes().decode('utf-8'))


def _rebuild(error: dict[str, str]) -> BaseException:
  """Process 0's exception, as its own class where that takes a message (else PeerError)."""
  message = f'{error["message"]} (decided on process 0)'
  try:
    cls = getattr(importlib.import_module(error['module']), error['name'])
    if isinstance(cls, type) and issubclass(cls, Exception):
      return cls(message)
  except Exception:  # pylint: disable=broad-except
    pass
  return PeerError(f'{error["name"]}: {message}')


def decide_on_main(decide: Callable[[], Any]) -> Any:
  """`decide()` run on process 0 only; its result (JSON-able) returned on every process.

  If it raises on process 0, every process raises: process 0 its own
  exception, the others one of the same class and message (`PeerError`
  where the class cannot be rebuilt). One process: just `decide()`.
  """
  if jax.process_count() == 1:
    return decide()
  payload, raised = None, None
  if is_main_process():
    try:
      payload = {'value': decide()}
    except Exception as e:  # pylint: disable=broad-except
      raised = e
      payload = {
          'error': {
              'module': type(e).__module__,
              'name': type(e).__qualname__,
              'message': str(e),
          }
      }
  received = _broadcast_json(payload)
  if raised is not None:
    raise raised
  if 'error' in received:
    raise _rebuild(received['error'])
  return received['value']


__all__ = (
    'Plan',
    'resolve',
    'initialize',
    'is_main_process',
    'process_summary',
    'PeerError',
    'decide_on_main',
)
