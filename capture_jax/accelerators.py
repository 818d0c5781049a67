"""Accelerators by name: each chip's HBM and peak bf16 FLOP/s, and the targets users rent.

The one owner of hardware facts. Real devices are looked up by the
`device_kind` JAX reports (`chip_for_device`: MFU in the trainer and the
benchmarks); targets (`TARGETS`, named as users name them: `v5e-16`,
`v5p-64`, `h200x8`, `2xv5e-256` for two slices) map to the arguments of
`jax.experimental.topologies.get_topology_desc`, which gives compile-only
devices on a CPU host (`Target.devices`, used by `python -m capture_jax.aot`).

TPU slice names count chips for v5e/v6e and TensorCores for v4/v5p (two per
chip, used as one megacore device). NVIDIA targets compile through the CUDA
PJRT plugin with a `GpuTargetConfigProto` rendered from the `GpuFacts` below
(the figures of XLA's own `xla/backends/gpu/target_config/specs/*.txtpb`,
reduced to the fields jaxlib 0.10.2 parses).
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
from typing import Any

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class GpuFacts:
  """What XLA's GPU compiler needs to know of a device it cannot see."""

  description: str  # the device_kind the real device reports
  core_count: int  # streaming multiprocessors
  fpus_per_core: int
  clock_rate_ghz: float
  memory_bandwidth: int  # bytes/s
  l2_cache_size: int
  device_memory_size: int
  shared_memory_per_core: int
  shared_memory_per_block_optin: int
  compute_capability: tuple[int, int]
  dnn_version: tuple[int, int, int] = (9, 10, 0)

  def target_config(self) -> str:
    """`stream_executor.GpuTargetConfigProto` in text format."""
    major, minor = self.compute_capability
    dnn = dict(zip(('major', 'minor', 'patch'), self.dnn_version))
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {self.shared_memory_per_core}
  threads_per_core_limit: 2048
  core_count: {self.core_count}
  fpus_per_core: {self.fpus_per_core}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {self.memory_bandwidth}
  l2_cache_size: {self.l2_cache_size}
  clock_rate_ghz: {self.clock_rate_ghz}
  device_memory_size: {self.device_memory_size}
  shared_memory_per_block_optin: {self.shared_memory_per_block_optin}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: {dnn['major']} minor: {dnn['minor']} patch: {dnn['patch']} }}
device_description_str: "{self.description}"
"""


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip (one JAX device).

  name: how users call it ('TPU v5e', 'H200').
  platform: 'tpu' or 'gpu'.
  device_kind: a regular expression matching the `device_kind` real (and compile-only)
    devices report.
  hbm_bytes: memory per device.
  peak_bf16_flops: dense bfloat16 FLOP/s per device (the MFU denominator).
  gpu: the facts a GPU target compiles against (GPUs only).
  """

  name: str
  platform: str
  device_kind: str
  hbm_bytes: int
  peak_bf16_flops: float
  gpu: GpuFacts | None = None


H100_SXM = GpuFacts(
    'NVIDIA H100 80GB HBM3',
    132,
    128,
    1.98,
    3352320000000,
    52428800,
    84942979072,
    233472,
    232448,
    (9, 0),
)
H200 = GpuFacts(
    'NVIDIA H200 141GB HBM3e',
    132,
    128,
    1.98,
    4800000000000,
    52428800,
    151397597184,
    233472,
    232448,
    (9, 0),
)
A100_SXM_80 = GpuFacts(
    'NVIDIA A100-SXM4-80GB',
    108,
    64,
    1.41,
    2039040000000,
    41943040,
    85100068864,
    167936,
    166912,
    (8, 0),
    (8, 9, 4),
)

CHIPS = {
    c.name: c
    for c in (
        # TPU device kinds as jaxlib reports them; v5p reports 'TPU v5', v5e 'TPU v5 lite'.
        Chip('TPU v2', 'tpu', r'^TPU v2$', 8 * GiB, 22.5e12),
        Chip('TPU v3', 'tpu', r'^TPU v3$', 16 * GiB, 61.5e12),
        Chip('TPU v4', 'tpu', r'^TPU v4$', 32 * GiB, 275e12),
        Chip('TPU v5e', 'tpu', r'^TPU v5( lite|e)$', 16 * GiB, 197e12),
        Chip('TPU v5p', 'tpu', r'^TPU v5p?$', 95 * GiB, 459e12),
        Chip('TPU v6e', 'tpu', r'^TPU v6( lite|e)$', 32 * GiB, 918e12),
        Chip('H100', 'gpu', r'H100', H100_SXM.device_memory_size, 989e12, H100_SXM),
        Chip('H200', 'gpu', r'H200', H200.device_memory_size, 989e12, H200),
        Chip('A100', 'gpu', r'A100', A100_SXM_80.device_memory_size, 312e12, A100_SXM_80),
        Chip('L4', 'gpu', r'\bL4\b', 24 * 10**9, 121e12),
        Chip('B200', 'gpu', r'B200', 180 * 10**9, 2250e12),
    )
}


def chip_for_kind(device_kind: str) -> Chip | None:
  """The chip whose `device_kind` pattern matches (None for CPUs and unknown devices)."""
  for chip in CHIPS.values():
    if re.search(chip.device_kind, device_kind):
      return chip
  return None


def peak_flops(device: Any) -> float | None:
  """Peak dense bf16 FLOP/s of a real or compile-only JAX device (None: unknown, e.g. a CPU)."""
  chip = chip_for_kind(device.device_kind)
  return chip.peak_bf16_flops if chip else None


# --------------------------------------------------------------------------
# This host.

GOOGLE_PCI_VENDOR = '0x1ae0'  # TPU chips on the PCI bus


def local_accelerator_visible() -> bool:
  """Whether this host shows any accelerator JAX could use: NVIDIA or AMD device nodes, TPU
  device nodes (`/dev/accel*`, `/dev/vfio/N`) or a Google PCI device. Reads a few paths only."""
  if any(os.path.exists(p) for p in ('/dev/nvidia0', '/dev/nvidiactl', '/dev/dxg', '/dev/kfd')):
    return True
  if glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'):
    return True
  for vendor in glob.glob('/sys/bus/pci/devices/*/vendor'):
    try:
      with open(vendor) as f:
        if f.read().strip() == GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def default_to_cpu_without_accelerators() -> bool:
  """On a host with no accelerator and no `JAX_PLATFORMS`, makes JAX use its CPU backend
  without probing installed plugins (libtpu asks for TPU metadata, the CUDA plugin for
  drivers: seconds and lines of warnings on every command). Returns whether it did.
  Call before JAX initialises a backend; an explicit `JAX_PLATFORMS` always wins."""
  if os.environ.get('JAX_PLATFORMS') or local_accelerator_visible():
    return False
  import jax  # pylint: disable=import-outside-toplevel

  jax.config.update('jax_platforms', 'cpu')
  return True


# --------------------------------------------------------------------------
# Targets.


@dataclasses.dataclass(frozen=True)
class Target:
  """A slice (or slices) of chips, as rented: `num_devices` devices over `num_processes` hosts.

  topology: `get_topology_desc` keyword arguments.
  compiler_options: XLA options every compile for this target needs.
  """

  name: str
  chip: Chip
  num_devices: int
  num_processes: int
  topology: tuple[tuple[str, Any], ...]
  compiler_options: tuple[tuple[str, Any], ...] = ()

  def usable_bytes(self) -> int:
    """Memory a program may use per device: all of a TPU's HBM; on NVIDIA GPUs the share JAX's
    client preallocates (`XLA_PYTHON_CLIENT_MEM_FRACTION`, 0.75 unless set)."""
    if self.chip.platform != 'gpu':
      return self.chip.hbm_bytes
    return int(float(os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION', 0.75)) * self.chip.hbm_bytes)

  def devices(self) -> list[Any]:
    """Compile-only devices of this target (needs libtpu, or the CUDA PJRT plugin, installed;
    no accelerator)."""
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

    kwargs = dict(self.topology)
    if self.chip.platform == 'tpu':
      # libtpu takes a host-wide lock file unless told otherwise, so a second compile-only
      # process (two `aot` commands, or a test beside one) would fail; no chip is opened here.
      os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
    try:
      devices = list(topologies.get_topology_desc(**kwargs).devices)
    except (ImportError, RuntimeError, NotImplementedError) as e:
      raise TargetUnavailableError(
          f'cannot make the {self.name} topology on this host ({type(e).__name__}: '
          f'{str(e).splitlines()[0] if str(e) else ""}); the compilers come with '
          '`pip install -e .[aot]`'
      ) from e
    if len(devices) != self.num_devices:
      raise TargetUnavailableError(
          f'the {self.name} topology gave {len(devices)} devices, expected {self.num_devices}'
      )
    return devices


class TargetUnavailableError(RuntimeError):
  """This host cannot make the target's compile-only devices (a compiler plugin is missing)."""


# Chips per host of multi-host slices (TPU VMs: 4 chips, 2x2, per host; v5e/v6e single-host
# slices of 8 chips are one 2x4 host).
_TPU_GENERATIONS = {
    # generation: (chip, topology prefix, chip_config_name, devices per name unit)
    'v4': ('TPU v4', 'v4', 'megacore', 2),
    'v5p': ('TPU v5p', 'v5p', 'megacore', 2),
    'v5e': ('TPU v5e', 'v5e', 'default', 1),
    'v6e': ('TPU v6e', 'v6e', 'default', 1),
}
_TPU_SHAPES = {  # chips -> topology of one slice
    4: '2x2x1',
    8: '2x2x2',
    16: '2x2x4',
    32: '2x4x4',
    64: '4x4x4',
    128: '4x4x8',
    256: '4x8x8',
    512: '8x8x8',
}
_TPU_2D_SHAPES = {4: '2x2', 8: '2x4', 16: '4x4', 32: '4x8', 64: '8x8', 128: '8x16', 256: '16x16'}


def _tpu_target(name: str, generation: str, units: int, num_slices: int) -> Target:
  chip_name, prefix, chip_config, per_unit = _TPU_GENERATIONS[generation]
  chips = units // per_unit
  two_d = generation in ('v5e', 'v6e')
  shapes = _TPU_2D_SHAPES if two_d else _TPU_SHAPES
  if chips not in shapes or units % per_unit:
    sizes = ', '.join(f'{generation}-{c * per_unit}' for c in shapes)
    raise ValueError(f'unknown TPU slice {name!r}; known sizes: {sizes}')
  shape = shapes[chips]
  # One host drives 4 chips (2x2); a v5e/v6e slice of 8 chips is one 2x4 host.
  host = (2, 4, 1) if two_d and chips == 8 else (2, 2, 1)
  hosts = max(1, chips // math.prod(host)) * num_slices
  return Target(
      name,
      CHIPS[chip_name],
      chips * num_slices,
      hosts,
      (
          ('platform', 'tpu'),
          ('topology_name', f'{prefix}:{shape}'),
          ('chip_config_name', chip_config),
          ('chips_per_host_bounds', host),
          ('num_slices', num_slices),
      ),
  )


_GPUS = {'h100': 'H100', 'h200': 'H200', 'a100': 'A100'}


def _gpu_target(name: str, gpu: str, per_host: int, hosts: int) -> Target:
  chip = CHIPS[_GPUS[gpu]]
  if per_host not in (1, 2, 4, 8):
    raise ValueError(f'{name!r}: a GPU host has 1, 2, 4 or 8 GPUs')
  return Target(
      name,
      chip,
      per_host * hosts,
      hosts,
      (
          ('platform', 'cuda'),
          ('topology_name', ''),
          ('target_config', chip.gpu.target_config()),
          ('topology', f'1x{hosts}x{per_host}'),
      ),
      # Without a device XLA cannot autotune Triton GEMM tilings and fails to tile some dots
      # (e.g. bf16[1184,768]); cuBLAS GEMMs compile.
      (('xla_gpu_enable_triton_gemm', False),),
  )


def target(name: str) -> Target:
  """The target called `name`: TPU slices `v4-8`, `v5e-16`, `v5p-64`, `v6e-256`, multi-slice
  `2xv5e-256`; NVIDIA hosts `h200x1`, `h100x8`, `a100x8`, multi-host `h100x8x4` (4 hosts of 8).

  Raises ValueError naming the known forms.
  """
  m = re.fullmatch(r'(?:(\d+)x)?(v4|v5p|v5e|v6e)-(\d+)', name)
  if m:
    return _tpu_target(name, m.group(2), int(m.group(3)), int(m.group(1) or 1))
  m = re.fullmatch(r'(h100|h200|a100)x(\d+)(?:x(\d+))?', name)
  if m:
    return _gpu_target(name, m.group(1), int(m.group(2)), int(m.group(3) or 1))
  raise ValueError(
      f'unknown target {name!r}; targets are TPU slices (e.g. {", ".join(TARGET_EXAMPLES[:8])}; '
      'NxNAME for N slices) and NVIDIA hosts (h100x8, h200x1, h200x8, a100x8; h100x8xH for H hosts)'
  )


# The targets named in docs and tests (any valid name works).
TARGET_EXAMPLES = (
    'v4-8',
    'v4-32',
    'v5e-4',
    'v5e-16',
    'v5e-256',
    'v5p-8',
    'v5p-16',
    'v5p-64',
    'v6e-8',
    'v6e-256',
    '2xv5e-256',
    'h100x8',
    'h200x1',
    'h200x8',
    'a100x8',
    'h100x8x4',
)
