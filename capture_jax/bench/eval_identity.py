"""Before/after check of a refactor: the evaluation writes identical metrics.json and ranked lists.

    python -m capture_jax.bench.eval_identity WORKDIR OUT

Run with the new code on a demo workdir (`--config.train.num_steps=150`) whose eval_dev/ the
old code wrote, its embeddings/ moved aside first so that every export is made again.
"""

from __future__ import annotations

import filecmp
import sys
from pathlib import Path

from absl import flags

from capture_jax import cli
from capture_jax import config as config_lib
from capture_jax import demo
from capture_jax.retrieval import evaluation


def compare(workdir: Path, out: Path) -> dict[str, bool]:
  """Evaluates the demo config (150 steps) of `workdir` into `out`; whether each file of
  `{workdir}/eval_dev` (metrics.json, the ranked lists) is byte-identical in `out`."""
  config = config_lib.load_config_file(demo.REPO / 'configs' / 'demo.py')
  config.train.num_steps = 150
  demo.fill_data_paths(config, workdir)
  evaluation.evaluate(config, workdir, 'dev', out_dir=out)
  old = workdir / 'eval_dev'
  assert sorted(p.name for p in (out / 'ranked_lists').iterdir()) == sorted(
      p.name for p in (old / 'ranked_lists').iterdir()
  )
  names = ['metrics.json', 'retrieval_id_list.txt'] + [
      f'ranked_lists/{p.name}' for p in sorted((old / 'ranked_lists').iterdir())
  ]
  return {n: filecmp.cmp(old / n, out / n, shallow=False) for n in names}


def define_flags() -> dict[str, flags.FlagHolder]:
  """The command's flags: none (WORKDIR and OUT are its two arguments)."""
  return {}


def main(args: dict[str, flags.FlagHolder], words: list[str]) -> int:
  del args
  if len(words) != 2:
    print(f'error: expected WORKDIR OUT, got {words}', file=sys.stderr)
    return 1
  for name, same in compare(Path(words[0]), Path(words[1])).items():
    print(('identical ' if same else 'DIFFERENT ') + name)
  return 0


def console_main() -> None:
  """`python -m capture_jax.bench.eval_identity WORKDIR OUT`."""
  args = define_flags()
  cli.run(lambda argv: main(args, argv[1:]), accepts_arguments=True)


if __name__ == '__main__':
  console_main()
