"""One process of the 2-process test of decisions taken together (`tests/test_faults_pod.py`).

    CAPTURE_MAIN=tests/multidevice/decide_process.py CAPTURE_DEVICES_PER_PROCESS=1 \
        launch/local_multiprocess.sh 2 OUT_DIR

Both processes save checkpoints 1 and 2 of a small array sharded over their two devices (with
checksums), then restore them while a read error is injected on process 1 only:

- `listing`: process 1 cannot list storage (every `storage.file_listing` raises OSError). The
  checksums and the steps are read on process 0 and sent, so both restore step 2, verified.
- `corrupt`: a byte of step 2 is flipped, and process 1 still cannot list: process 0 finds the
  checksum mismatch, and both restore step 1 (process 1 alone would have restored step 2
  unverified, or stopped).
- `decide`: `decide_on_main` sends process 0's value, and its exception as the same class.

Each process writes `OUT_DIR/process_{id}.json` with what it decided.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from capture_jax.training import distributed  # noqa: E402

distributed.initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from capture_jax import storage  # noqa: E402
from capture_jax.training import checkpoint as checkpoint_lib  # noqa: E402


def injected_listing_error(folder):
  raise OSError(f'injected read error listing {folder} on process {jax.process_index()}')


def main(out_dir: Path) -> None:
  pid = jax.process_index()
  mesh = jax.make_mesh((2,), ('data',))
  sharding = NamedSharding(mesh, P('data'))
  workdir = out_dir / 'run'
  config = checkpoint_lib.ml_collections.ConfigDict(
      {'every_steps': 1, 'keep_last': 5, 'keep_every': 0, 'async_save': False}
  )
  manager = checkpoint_lib.make_manager(workdir, config)

  def state_of(step: int):
    return jax.make_array_from_callback(
        (4,), sharding, lambda index: np.arange(4, dtype=np.float32)[index] + 10 * step
    )

  for step in (1, 2):
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({'x': state_of(step)})))
  manager.wait_until_finished()
  checkpoint_lib.record_checksums(manager)
  abstract = {'x': jax.ShapeDtypeStruct((4,), np.float32, sharding=sharding)}
  result = {'process': pid}

  def restored(case: str):
    out = checkpoint_lib.restore_latest(manager, abstract, None)
    if out is None:
      return None
    state, step = out
    local = [np.asarray(s.data).tolist() for s in state['x'].addressable_shards]
    return {'step': step, 'local': local}

  # 1. Process 1 cannot list storage: the decisions come from process 0.
  real_listing = storage.file_listing
  if pid == 1:
    storage.file_listing = injected_listing_error
  result['listing'] = restored('listing')
  storage.file_listing = real_listing

  # 2. Step 2 is corrupt (flipped bytes); process 1 still cannot list.
  if pid == 0:
    files = [p for p in (workdir / 'checkpoints' / '2' / 'state').rglob('*') if p.is_file()]
    target = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
  distributed.decide_on_main(lambda: None)  # process 1 waits for the flip
  if pid == 1:
    storage.file_listing = injected_listing_error
  result['corrupt'] = restored('corrupt')
  storage.file_listing = real_listing

  # 3. The helper itself.
  result['decide_value'] = distributed.decide_on_main(lambda: {'from': jax.process_index()})
  try:
    distributed.decide_on_main(lambda: (_ for _ in ()).throw(FileNotFoundError('no such shard')))
  except FileNotFoundError as e:
    result['decide_error'] = ['FileNotFoundError', str(e)]
  manager.close()
  (out_dir / f'process_{pid}.json').write_text(json.dumps(result))
  print('OK', json.dumps(result), flush=True)


if __name__ == '__main__':
  main(Path(sys.argv[1]))
