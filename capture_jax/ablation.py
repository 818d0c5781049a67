"""`make ablation`: the paper's claims as one command, on the demo data and budget.

    python -m capture_jax.ablation [--config=configs/demo.py] [--workdir=runs/ablation]
        [--data_workdir runs/demo] [--variants full,mlm,...]

Trains every variant below with the demo configuration (same data, steps,
batch and seed; only the listed fields change), evaluates each on the dev
queries against the gallery with `capture_jax.evaluate`, and writes one table
(`WORKDIR/ablation.md`, `ablation.json`) with mAP@10/50/100 per variant, plus
the TF-IDF, mean-region and random-weights baselines (evaluated once, with the
full model). The demo data set is generated and built first if it is not there
yet. Each variant is its own run folder (`WORKDIR/VARIANT`): a finished
variant is reused, an interrupted one continues from its last checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Mapping

import ml_collections
from absl import flags
from ml_collections import config_flags

from capture_jax import cli
from capture_jax import config as config_lib
from capture_jax import demo as demo_lib


@dataclasses.dataclass(frozen=True)
class Variant:
  group: str
  description: str
  overrides: Mapping[str, Any]


VARIANTS: dict[str, Variant] = {
    'full': Variant(
        'all', 'the full model as configured: hybrid stream, MLM + MRM + contrastive', {}
    ),
    'mlm': Variant(
        'pretext tasks', 'MLM only', {'loss.mrm_weight': 0.0, 'loss.contrastive_weight': 0.0}
    ),
    'mlm_mrm': Variant(
        'pretext tasks', 'MLM + MRM (no contrastive loss)', {'loss.contrastive_weight': 0.0}
    ),
    'contrastive': Variant(
        'pretext tasks', 'contrastive only', {'loss.mlm_weight': 0.0, 'loss.mrm_weight': 0.0}
    ),
    'single_stream': Variant(
        'architecture',
        'single stream: no co-attention layers, the joint co-transformer only',
        {'model.co_num_layers': 0},
    ),
    'two_stream': Variant(
        'architecture',
        'two streams: co-attention layers only, no joint co-transformer',
        {'model.cross_num_layers': 0},
    ),
    'ntxent': Variant(
        'contrastive loss',
        'NT-Xent as released (intra-modal negatives, temperature 0.07)',
        {'loss.contrastive': 'ntxent', 'loss.temperature': 0.07},
    ),
    'clip': Variant(
        'contrastive loss',
        'CLIP-style symmetric InfoNCE, learnable temperature',
        {'loss.contrastive': 'clip'},
    ),
    'siglip': Variant('contrastive loss', 'sigmoid (SigLIP)', {'loss.contrastive': 'siglip'}),
}
METRICS = ('mAP@10', 'mAP@50', 'mAP@100')


def variant_config(base: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """`base` with the variant's fields changed (an unknown field is an error)."""
  if name not in VARIANTS:
    raise ValueError(f'unknown ablation variant {name!r}; known: {", ".join(VARIANTS)}')
  config = copy.deepcopy(base)  # FieldReferences kept (data.max_text_len follows the model)
  for dotted, value in VARIANTS[name].overrides.items():
    section, field = dotted.split('.')
    if field not in config[section]:
      raise KeyError(f'variant {name!r} sets {dotted}, which the config does not have')
    config[section][field] = value
  config.eval.baselines = name == 'full'
  return config


def same_run(base: ml_collections.ConfigDict, name: str) -> bool:
  """Whether variant `name` trains exactly what `full` trains (its row is then `full`'s)."""
  strip = lambda c: {**c.to_dict(), 'eval': None}
  return name != 'full' and strip(variant_config(base, name)) == strip(variant_config(base, 'full'))


def table(
    rows: Mapping[str, Mapping[str, float]], baselines: Mapping[str, Mapping[str, float]]
) -> str:
  """Markdown: one row per variant (then the baselines), metrics in percent."""
  lines = [
      '| group | variant | ' + ' | '.join(METRICS) + ' |',
      '|---|---|' + '---:|' * len(METRICS),
  ]
  for name, metrics in rows.items():
    v = VARIANTS[name]
    same = ' (= `full`)' if name != 'full' and metrics is rows.get('full') else ''
    lines.append(
        f'| {v.group} | `{name}`{same}: {v.description} | '
        + ' | '.join(f'{100 * metrics[m]:.2f}' for m in METRICS)
        + ' |'
    )
  for method, metrics in baselines.items():
    lines.append(
        f'| baseline | {method} | ' + ' | '.join(f'{100 * metrics[m]:.2f}' for m in METRICS) + ' |'
    )
  return '\n'.join(lines)


def run_variant(config: ml_collections.ConfigDict, name: str, workdir: Path):
  """Trains (or reuses) and evaluates one variant; returns the `results.EvalResult`."""
  print(f'\n== variant {name}: {VARIANTS[name].description}', flush=True)
  start = time.perf_counter()
  demo_lib.pretrain(config, workdir, number=None)
  result = demo_lib.evaluate(config, workdir, number=None)
  print(f'   {name} done in {time.perf_counter() - start:.0f} s', flush=True)
  return result


def run(
    base: ml_collections.ConfigDict,
    workdir: str | Path,
    data_workdir: str | Path,
    variants: str = ','.join(VARIANTS),
) -> None:
  """Trains and evaluates `variants` (comma-separated names of `VARIANTS`) on the demo data in
  `data_workdir`, each in `workdir/NAME`, and writes the table."""
  names = [n for n in variants.split(',') if n]
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    raise ValueError(f'unknown variant(s) {unknown}; known: {", ".join(VARIANTS)}')
  demo_lib.fill_data_paths(base, Path(data_workdir))
  demo_lib.prepare_data(base)
  workdir = Path(workdir)
  rows, baselines, main_method = {}, {}, None
  if any(same_run(base, n) for n in names) or 'full' in names:  # `full` first: others may reuse it
    names = ['full'] + [n for n in names if n != 'full']
  for name in names:
    if same_run(base, name):
      print(
          f'\n== variant {name}: the same run as `full` ({VARIANTS[name].description})', flush=True
      )
      rows[name] = rows['full']
      continue
    config = variant_config(base, name)
    result = run_variant(config, name, workdir / name)
    main_method = result.summary['main_method']
    rows[name] = result.metrics[main_method]
    if config.eval.baselines:
      baselines = {m: v for m, v in result.metrics.items() if not m.startswith('CAPTURE (')}
  text = table(rows, baselines)
  header = (
      f'Ablation on the demo data ({base.train.num_steps} steps, global batch {base.data.batch_size}, '
      f'embedding `{base.eval.embedding}`, method {main_method}, dev queries against the gallery).'
  )
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / 'ablation.md').write_text(header + '\n\n' + text + '\n', encoding='utf-8')
  (workdir / 'ablation.json').write_text(
      json.dumps({'variants': rows, 'baselines': baselines, 'method': main_method}, indent=2)
      + '\n',
      encoding='utf-8',
  )
  print('\n' + header + '\n\n' + text, flush=True)
  print(f'\nwrote {workdir / "ablation.md"} and {workdir / "ablation.json"}', flush=True)


def define_flags() -> dict[str, flags.FlagHolder]:
  """The command's flags (defined when the command runs, not on import)."""
  return {
      'config': config_flags.DEFINE_config_file(
          'config',
          str(demo_lib.REPO / 'configs' / 'demo.py'),
          'A configs/*.py file.',
          lock_config=False,
      ),
      'workdir': flags.DEFINE_string(
          'workdir', 'runs/ablation', 'One folder per variant under it.'
      ),
      'data_workdir': flags.DEFINE_string(
          'data_workdir', 'runs/demo', 'Where the demo data set is (or goes).'
      ),
      'variants': flags.DEFINE_string('variants', ','.join(VARIANTS), 'Comma-separated variants.'),
  }


def main(args: dict[str, flags.FlagHolder]) -> None:
  config_lib.check_or_exit(args['config'].value)
  run(
      args['config'].value,
      args['workdir'].value,
      args['data_workdir'].value,
      args['variants'].value,
  )


def console_main() -> None:
  """`python -m capture_jax.ablation [--config=...] [--workdir=...] [--variants=full,mlm,...]`."""
  args = define_flags()
  cli.run(lambda argv: main(args))


if __name__ == '__main__':
  console_main()
