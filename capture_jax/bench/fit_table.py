r"""The fit table of a config on accelerator targets, by ahead-of-time compilation (`aot`).

    python -m capture_jax.bench.fit_table --config=configs/capture_paper.py \
        --targets=h100x8,h200x8,v5e-16,v5p-64 --dtypes=bfloat16,float32 --remat=False,True \
        --batches=256,1024,4096 --out=runs/fit_table.jsonl [--config.FIELD=value ...]

For every target x dtype x remat it compiles the train step at each global
batch (per-device bytes, FLOPs, projected step time at 50% MFU, compile
seconds) and predicts the largest batch that fits from the line through the
two largest batches that compiled (memory per device is affine in the batch:
`aot.find_max_batch` says why), then confirms the prediction with one more
compile. Rows are appended to `--out` as they finish (one JSON object per
line), and rows already there are not compiled again, so an interrupted run
continues; `--markdown` prints the table of the rows in `--out`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from capture_jax import accelerators, aot, cli

GiB = 2**30


def row_key(row: dict) -> tuple:
  return (row['target'], row['dtype'], row['remat'], row['batch'], row['kind'])


def read_rows(path: Path) -> list[dict]:
  if not path.exists():
    return []
  rows = []
  for number, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:  # a line cut by a kill: the row is compiled again
      print(f'{path}:{number}: skipping an unreadable row ({e})', file=sys.stderr)
  return rows


def compile_row(config, target, devices, dtype: str, remat: bool, batch: int, kind: str) -> dict:
  trial = config.copy_and_resolve_references()
  trial.model.update(dtype=dtype, remat=remat)
  trial.data.batch_size = batch
  fit = aot.compile_step('train', trial, target, devices)
  return {
      'target': target.name,
      'dtype': dtype,
      'remat': remat,
      'batch': batch,
      'kind': kind,
      **fit.as_dict(),
  }


def predicted_max(rows: list[dict], hbm: int, unit: int) -> int | None:
  """The largest multiple of `unit` whose line-predicted memory fits, from the two largest
  batches that compiled with a figure."""
  known = sorted((r['batch'], r['total_bytes']) for r in rows if not r['refused'])
  if len(known) < 2:
    return None
  (b0, m0), (b1, m1) = known[-2:]
  slope = (m1 - m0) / (b1 - b0)
  if slope <= 0:
    return None
  return max(unit, int((b0 + (hbm - m0) / slope) // unit * unit))


def markdown(rows: list[dict]) -> str:
  """One line per target x dtype x remat: memory at each batch, the largest batch, FLOPs."""
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault((r['target'], r['dtype'], r['remat']), []).append(r)
  batches = sorted({r['batch'] for r in rows if r['kind'] == 'grid'})
  head = (
      '| target | dtype | remat | '
      + ' | '.join(f'GiB/device at {b}' for b in batches)
      + ' | largest batch that fits | TFLOP/device at '
      + str(batches[0])
      + ' | step at 50% MFU | compile s |'
  )
  lines = [head, '|' + '---|' * (7 + len(batches) - 1)]
  for (target, dtype, remat), group in sorted(groups.items()):
    grid = {r['batch']: r for r in group if r['kind'] == 'grid'}
    cells = []
    for b in batches:
      r = grid.get(b)
      if r is None:
        cells.append('')
      elif r['refused']:
        cells.append('OOM (XLA)')
      else:
        cells.append(f'{r["total_bytes"] / GiB:.1f}' + ('' if r['fits'] else ' (over)'))
    confirmed = [r for r in group if r['kind'] == 'max']
    fits = [r['batch'] for r in group if r['fits']]
    best = max(fits, default=None)
    max_cell = f'{best}' if best else 'none'
    if confirmed and not confirmed[0]['fits']:
      max_cell += f' (prediction {confirmed[0]["batch"]} did not fit)'
    first = grid.get(batches[0], {})
    flops = first.get('flops_per_device')
    t50 = first.get('step_s_at_50pct')
    compile_s = first.get('compile_s')
    lines.append(
        f'| {target} | {dtype} | {"yes" if remat else "no"} | '
        + ' | '.join(cells)
        + f' | {max_cell} | {flops / 1e12:.2f} | {t50 * 1e3:.1f} ms |'
        + f' {compile_s:.0f} |'
        if flops and t50
        else f'| {target} | {dtype} | {"yes" if remat else "no"} | '
        + ' | '.join(cells)
        + f' | {max_cell} | | | |'
    )
  return '\n'.join(lines)


def define_flags() -> dict[str, flags.FlagHolder]:
  """The command's flags (defined when the command runs, not on import)."""
  return {
      'config': config_flags.DEFINE_config_file('config', None, 'A configs/*.py file.'),
      'targets': flags.DEFINE_list(
          'targets', ['h100x8', 'h200x8', 'v5e-16', 'v5p-64'], 'Targets (aot.py --target).'
      ),
      'dtypes': flags.DEFINE_list('dtypes', ['bfloat16', 'float32'], 'model.dtype values.'),
      'remat': flags.DEFINE_list('remat', ['False', 'True'], 'model.remat values.'),
      'batches': flags.DEFINE_list('batches', ['256', '1024', '4096'], 'Global batches.'),
      'out': flags.DEFINE_string('out', 'runs/fit_table.jsonl', 'Rows, one JSON per line.'),
      'markdown': flags.DEFINE_bool(
          'markdown', False, 'Only print the table of the rows in --out.'
      ),
  }


def main(args: dict[str, flags.FlagHolder]) -> None:
  out = Path(args['out'].value)
  if args['markdown'].value:
    print(markdown(read_rows(out)))
    return
  out.parent.mkdir(parents=True, exist_ok=True)
  done = {row_key(r) for r in read_rows(out)}
  config = args['config'].value
  for name in args['targets'].value:
    target = accelerators.target(name)
    devices = target.devices()
    for dtype in args['dtypes'].value:
      for remat in (v == 'True' for v in args['remat'].value):
        group = []
        for batch in map(int, args['batches'].value):
          key = (name, dtype, remat, batch, 'grid')
          if key in done:
            group += [r for r in read_rows(out) if row_key(r) == key]
            continue
          row = compile_row(config, target, devices, dtype, remat, batch, 'grid')
          group.append(row)
          with out.open('a') as f:
            f.write(json.dumps(row, sort_keys=True) + '\n')
          print(aot.describe(aot.Fit(**{k: row[k] for k in aot.FIT_FIELDS})), flush=True)
        unit = target.num_devices * config.train.microbatches
        guess = predicted_max(group, target.usable_bytes(), unit)
        if guess and not any(
            r['kind'] == 'max' for r in read_rows(out) if row_key(r)[:3] == (name, dtype, remat)
        ):
          row = compile_row(config, target, devices, dtype, remat, guess, 'max')
          with out.open('a') as f:
            f.write(json.dumps(row, sort_keys=True) + '\n')
          print(f'predicted largest batch {guess}: fits {row["fits"]}', flush=True)
  print(markdown(read_rows(out)))


def console_main() -> None:
  """`python -m capture_jax.bench.fit_table`."""
  args = define_flags()
  flags.mark_flags_as_required(['config'])
  cli.run(lambda argv: main(args))


if __name__ == '__main__':
  console_main()
