"""Host cost of the float32 batch contract at paper sizes (issue 22, measured only).

Copies the features of 256 records (float16 storage, 10 to 36 regions of 2,048) into a
padded [256, 37, 2048] buffer as float32 and as float16; prints the median of `--repeats`.

    python -m capture_jax.bench.feature_dtype [--repeats=15]
"""

from __future__ import annotations

import statistics
import time

import numpy as np
from absl import flags

from capture_jax import cli

BATCH, REGIONS, WIDTH = 256, 36, 2048


def records(seed: int = 0) -> list[np.ndarray]:
  """BATCH float16 feature arrays [n, WIDTH], n in [10, REGIONS]."""
  rng = np.random.default_rng(seed)
  return [
      rng.random((int(n), WIDTH), np.float32).astype(np.float16)
      for n in rng.integers(10, REGIONS + 1, BATCH)
  ]


def collate(recs: list[np.ndarray], dtype) -> np.ndarray:
  """[BATCH, REGIONS + 1, WIDTH] of `dtype`: row 0 of each sample (the global slot) and the
  padding zeroed, the regions copied after it."""
  out = np.empty((len(recs), REGIONS + 1, WIDTH), dtype)
  for i, r in enumerate(recs):
    n = r.shape[0]
    out[i, 0] = 0
    out[i, 1 : n + 1] = r
    out[i, n + 1 :] = 0
  return out


def define_flags() -> dict[str, flags.FlagHolder]:
  """The command's flags (defined when the command runs, not on import)."""
  return {
      'repeats': flags.DEFINE_integer(
          'repeats', 15, 'Timed copies per dtype (the median is printed).'
      ),
  }


def main(args: dict[str, flags.FlagHolder]) -> None:
  recs = records()
  for dtype in (np.float32, np.float16):
    collate(recs, dtype)
    ts = []
    for _ in range(args['repeats'].value):
      t = time.perf_counter()
      collate(recs, dtype)
      ts.append(time.perf_counter() - t)
    med = statistics.median(ts)
    print(
        f'{np.dtype(dtype).name}: {med * 1e3:.1f} ms per batch of {BATCH}, '
        f'{med / BATCH * 1e6:.0f} us/sample, batch {collate(recs, dtype).nbytes / 2**20:.0f} MiB'
    )


def console_main() -> None:
  """`python -m capture_jax.bench.feature_dtype`."""
  cli.run_command(define_flags, main, required=())


if __name__ == '__main__':
  console_main()
