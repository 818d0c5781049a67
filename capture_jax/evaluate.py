r"""Instance-level retrieval evaluation of a checkpoint: export, search, official metrics, report.

    python -m capture_jax.evaluate --config=configs/demo.py --workdir=runs/demo [--split=dev] \
        [--checkpoint=STEP] [--out=DIR] [--config.eval.query_mode=whole|instances|both] \
        [--config.eval.search=exact|faiss] [--config.eval.embedding=fused|text|visual|encoder]
    python -m capture_jax.evaluate --config=... --workdir=DIR --gallery_embeddings=G \
        --query_embeddings=Q [--instance_embeddings=I]

The program (`capture_jax.retrieval.evaluation.evaluate`), in the order it runs:

1. checks: the config, the ground-truth files in `config.data.data_dir`, every
   query id of the split present in the annotations, the checkpoint and its config;
2. exports (`capture_jax.retrieval.exporting`) of the gallery, the queries (one
   row per sample) and the instance queries (one row per product instance,
   from the proposer of `eval.instances`: learned when trained in the
   workdir, else boxes; with `eval.compare_proposers` every other one too),
   with the checkpoint and with the random initialisation; an export already
   in `{workdir}/embeddings` of the same identity is reused. Exports given
   with `--gallery_embeddings/--query_embeddings/--instance_embeddings` are
   evaluated instead (no checkpoint needed);
3. top-100 search by cosine (exact, or FAISS with `eval.search='faiss'`,
   whose recall@100 against exact search is reported);
4. ranked lists: per query, the whole-sample list, and the per-instance
   lists merged round-robin with de-duplication (`instance_merge`), in the
   three modes `whole`, `instances`, `both`;
5. baselines on the same queries and gallery: TF-IDF over titles (text only)
   and the mean region feature (visual only), plus the random-weights model;
6. the official metrics (mAP, Prec, mAR at R = 10, 50, 100) of every method.

Written to `{workdir}/eval_{split}/`: `retrieval_id_list.txt` (CAPTURE in
`eval.query_mode`, the official format), `ranked_lists/*.txt` (every method),
`report.md` (the table, the best query mode, listings of a few queries),
`metrics.json`, `metrics.png` and `evaluation.json` (what was evaluated, and
each stage's seconds). The table is printed too.
"""

from __future__ import annotations

from typing import Any

from absl import flags
from ml_collections import config_flags

from capture_jax import cli
from capture_jax.retrieval import evaluation
from capture_jax.retrieval import metrics as metrics_lib


def define_flags() -> dict[str, Any]:
  """The command's flags (defined when the command runs, not on import)."""
  return {
      'config': config_flags.DEFINE_config_file(
          'config', None, 'A configs/*.py file.', lock_config=True
      ),
      'workdir': flags.DEFINE_string('workdir', None, 'Run directory with checkpoints/.'),
      'split': flags.DEFINE_enum('split', 'dev', ['dev', 'test'], 'Query split.'),
      'checkpoint': flags.DEFINE_integer(
          'checkpoint', None, 'Checkpoint step (default: the latest).'
      ),
      'out': flags.DEFINE_string('out', None, 'Output folder (default {workdir}/eval_{split}).'),
      'gallery_embeddings': flags.DEFINE_string(
          'gallery_embeddings', None, 'Evaluate this export of the gallery instead of exporting it.'
      ),
      'query_embeddings': flags.DEFINE_string(
          'query_embeddings', None, 'Evaluate this export of the queries instead of exporting them.'
      ),
      'instance_embeddings': flags.DEFINE_string(
          'instance_embeddings',
          None,
          'Evaluate this export of the instance queries (`capture_jax.export --instances`; with '
          'the two above); the report names them after its proposer.',
      ),
  }


def main(args: dict[str, Any]) -> None:
  embeddings = ('gallery_embeddings', 'query_embeddings', 'instance_embeddings')
  result = cli.checkpoint_command(
      args, evaluation.evaluate, out_dir=args['out'].value, **cli.flag_values(args, embeddings)
  )
  if result is not None:
    print(result.table)
    print(f'best query mode on mAP@10: {result.best_query_mode}')
    print(
        f'wrote {result.out_dir}/report.md, metrics.json, metrics.png and {metrics_lib.RANKED_FILE}'
    )


def console_main() -> None:
  cli.run_command(define_flags, main)


if __name__ == '__main__':
  console_main()
