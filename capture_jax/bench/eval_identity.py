"""Before/after check of a refactor: the evaluation writes identical metrics.json and ranked lists.

    python -m capture_jax.bench.eval_identity WORKDIR OUT

Run with the new code on a demo workdir (`--config.train.num_steps=150`) whose eval_dev/ the
old code wrote, its embeddings/ moved aside first so that every export is made again.
"""

import filecmp, sys
from pathlib import Path
import ml_collections
from capture_jax import demo
from capture_jax.retrieval import evaluation
import importlib.util


def main() -> None:
  workdir, out = Path(sys.argv[1]), Path(sys.argv[2])
  spec = importlib.util.spec_from_file_location('demo_config', 'configs/demo.py')
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config()
  config.train.num_steps = 150
  demo.fill_data_paths(config, workdir)
  evaluation.evaluate(config, workdir, 'dev', out_dir=out)
  old = workdir / 'eval_dev'
  names = ['metrics.json', 'retrieval_id_list.txt'] + [
      f'ranked_lists/{p.name}' for p in sorted((old / 'ranked_lists').iterdir())
  ]
  assert sorted(p.name for p in (out / 'ranked_lists').iterdir()) == sorted(
      p.name for p in (old / 'ranked_lists').iterdir()
  )
  for n in names:
    same = filecmp.cmp(old / n, out / n, shallow=False)
    print(('identical ' if same else 'DIFFERENT ') + n)


if __name__ == '__main__':
  main()
