"""What an export makes of a checkpoint with one flipped byte (the RELIABILITY.md figures).

    python -m tests.checkpoint_flips [--unchecked]

Trains the tests' tiny model for 2 steps, exports the gallery, then for one byte flipped at a
quarter, half and three quarters of each data file of the last step's `state` (a fresh copy of
the run each time) exports again and says what happened: refused by the checksums
(`CorruptCheckpointError`), another error (Orbax's read errors, the non-finite refusal), or
exported with the same or other embeddings (max abs difference). `--unchecked` skips
`checkpoint.check_intact`: what Orbax alone does, as export did before it checked.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import numpy as np  # noqa: E402

from capture_jax import train  # noqa: E402
from capture_jax.retrieval import export_format  # noqa: E402
from capture_jax.retrieval import exporting  # noqa: E402
from capture_jax.training import checkpoint as checkpoint_lib  # noqa: E402
from tests.helpers import trainer_config  # noqa: E402

FRACTIONS = (0.25, 0.5, 0.75)


def export_gallery(cfg, workdir: Path, out: Path) -> np.ndarray:
  result = exporting.export(cfg, workdir, 'gallery', out=out, progress=False)
  return export_format.read_embeddings(result.out_dir).vectors


def outcome(cfg, run: Path, out: Path, intact: np.ndarray) -> tuple[str, float | None]:
  """What one export of `run` gives: a kind, and the max abs difference when it exported."""
  try:
    vectors = export_gallery(cfg, run, out)
  except checkpoint_lib.CorruptCheckpointError:
    return 'refused by the checksums', None
  except Exception as e:  # pylint: disable=broad-except  (what else stops it is the figure)
    return f'error: {type(e).__name__}', None
  diff = float(np.abs(vectors - intact).max())
  return ('exported, same embeddings' if diff == 0 else 'exported, other embeddings'), diff


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--unchecked', action='store_true', help='skip checkpoint.check_intact')
  args = parser.parse_args()
  if args.unchecked:
    checkpoint_lib.check_intact = lambda *a, **k: None
  root = Path(tempfile.mkdtemp(prefix='checkpoint_flips-'))
  cfg = trainer_config(root / 'data')
  cfg.train.num_steps = 2
  cfg.eval.update(shard_size=16, progress_bar=False, baselines=False, query_mode='whole')
  pristine = root / 'pristine'
  train.run(cfg, pristine)
  intact = export_gallery(cfg, pristine, root / 'intact')
  ckpts = pristine / 'checkpoints'
  step = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
  files = sorted(
      p for p in (ckpts / str(step) / 'state').rglob('*') if p.is_file() and p.parent.name == 'd'
  )
  counts, diffs = collections.Counter(), []
  for i, path in enumerate(files):
    for fraction in FRACTIONS:
      run = root / 'run'
      shutil.rmtree(run, ignore_errors=True)
      shutil.copytree(pristine, run)
      target = run / path.relative_to(pristine)
      data = bytearray(target.read_bytes())
      data[int(len(data) * fraction)] ^= 0xFF
      target.write_bytes(bytes(data))
      kind, diff = outcome(cfg, run, root / f'out-{i}-{fraction}', intact)
      counts[kind] += 1
      if diff:
        diffs.append(diff)
      print(f'{path.name[:12]} ({len(data)} bytes) at {fraction}: {kind}', flush=True)
  print(f'\n{sum(counts.values())} flips, {"unchecked" if args.unchecked else "checked"}:')
  for kind, n in sorted(counts.items()):
    print(f'  {kind}: {n}')
  if diffs:
    print(f'  other embeddings: max abs difference {min(diffs):.2g} to {max(diffs):.2g}')
  shutil.rmtree(root)


if __name__ == '__main__':
  main()
