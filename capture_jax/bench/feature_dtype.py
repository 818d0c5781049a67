"""Host cost of the float32 batch contract at paper sizes (issue 22, measured only).

Copies the features of 256 records (float16 storage, 10 to 36 regions of 2,048) into a
padded [256, 37, 2048] buffer as float32 and as float16; prints the median of 15.

    python -m capture_jax.bench.feature_dtype
"""

import time, statistics, numpy as np

rng = np.random.default_rng(0)
recs = [
    rng.random((int(n), 2048), np.float32).astype(np.float16) for n in rng.integers(10, 37, 256)
]


def collate(dtype):
  out = np.empty((256, 37, 2048), dtype)
  for i, r in enumerate(recs):
    n = r.shape[0]
    out[i, 0] = 0
    out[i, 1 : n + 1] = r
    out[i, n + 1 :] = 0
  return out


for dtype in (np.float32, np.float16):
  collate(dtype)
  ts = []
  for _ in range(15):
    t = time.perf_counter()
    collate(dtype)
    ts.append(time.perf_counter() - t)
  med = statistics.median(ts)
  print(
      f'{np.dtype(dtype).name}: {med*1e3:.1f} ms per batch of 256, {med/256*1e6:.0f} us/sample, batch {collate(dtype).nbytes/2**20:.0f} MiB'
  )
