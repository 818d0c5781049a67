"""From scratch, the same command and seed give the same figures, bit for bit on CPU (issue #16).

The end-to-end test runs the demo's stages (synthetic data, vocab, TFDS, a
few training steps, export, evaluation) twice, in two fresh folders, and
compares everything a reader or a later stage consumes; then the first
folder's demo resumes with more steps and is run again, as `make demo` is. What legitimately
differs is excluded by name: wall-clock times and throughputs, the absolute
paths of the two folders, and bytes that are not content (see
`_tfds_examples` and `_restored_state`). docs/REPRODUCIBILITY.md lists the
sources of difference that were checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from capture_jax.data import formats
from capture_jax.data import synthetic
from tests.test_demo import REDUCED_DEMO
from tests.test_demo import REPO
from tests.test_demo import assert_every_stage_ran
from tests.test_demo import assert_resumes_then_reuses
from tests.test_demo import run_demo

STEPS = 4

# Keys whose values are measurements of the machine, not results.
TIMING_KEYS = (
    'time',
    'step_time_s',
    'samples_per_s',
    'search_seconds',
    'stage_seconds',
    'export_samples_per_s',
)


def test_vocab_command_writes_the_same_file_in_any_process(tmp_path):
  """Two processes with different Python hash seeds (and Rust's per-process hash keys) agree."""
  data = tmp_path / 'data'
  synthetic.generate(str(data), 'tiny', seed=0, progress=False)
  outs = []
  for hash_seed in ('1', '2'):
    out = tmp_path / f'vocab_{hash_seed}.txt'
    proc = subprocess.run(
        [sys.executable, '-m', 'capture_jax.data.tokenizer', 'train', '--data_dir', str(data)]
        + ['--vocab_size', '250', '--min_frequency', '1', '--out', str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, 'PYTHONPATH': str(REPO), 'PYTHONHASHSEED': hash_seed},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    outs.append(out.read_bytes())
  assert outs[0] == outs[1]
  assert len(outs[0].splitlines()) == 250  # cut among merges, where ties decide


def _files(root: Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file()}


def _tfds_examples(tfds_dir: Path) -> dict[str, list[bytes]]:
  """split file -> its examples, re-serialised with sorted feature keys.

  TFDS serialises each `tf.train.Example` with protobuf's default map order,
  which upb randomises per process: the ArrayRecord files of two builds differ
  byte for byte while every parsed example is equal.
  """
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=import-outside-toplevel

  out = {}
  for path in sorted(tfds_dir.rglob('*.array_record-*')):
    reader = array_record_module.ArrayRecordReader(str(path))
    examples = []
    for record in reader.read_all():
      example = tf_example_pb2.Example()
      example.ParseFromString(record)
      examples.append(example.SerializeToString(deterministic=True))
    reader.close()
    out[str(path.relative_to(tfds_dir))] = examples
  return out


def _restored_state(workdir: Path, step: int) -> dict[str, bytes]:
  """Every leaf of the checkpointed train state (params, optimizer, rng, step) as bytes.

  The Orbax files themselves hold random file names and timestamps, so the
  restored arrays are compared, not the files.
  """
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  state = ocp.StandardCheckpointer().restore(workdir / 'checkpoints' / str(step) / 'state')
  return {
      jax.tree_util.keystr(path): np.asarray(leaf).tobytes()
      for path, leaf in jax.tree_util.tree_leaves_with_path(state)
  }


def _without(d: dict, keys) -> dict:
  return {k: v for k, v in d.items() if k not in keys}


def _report_table(stdout: str) -> str:
  """The printed report (stage 6) from its heading to the best-mode line."""
  start = stdout.index('== stage 6')
  return stdout[start : stdout.index('best CAPTURE query mode', start)]


@pytest.mark.slow
def test_demo_from_scratch_twice_gives_identical_results_then_resumes_and_reuses(tmp_path):
  config_file = tmp_path / 'reduced_demo.py'
  config_file.write_text(REDUCED_DEMO.format(demo=str(REPO / 'configs' / 'demo.py')))
  a, b = tmp_path / 'a', tmp_path / 'b'
  # Each compiles its own programs: neither reads the other's, nor another test's (a's cache is
  # its own and starts empty; its later runs read it, as `make demo` run again does).
  cache_a = tmp_path / 'compile_cache_a'
  out_a = run_demo(config_file, a, STEPS, compile_cache=cache_a)
  out_b = run_demo(config_file, b, STEPS, compile_cache=False)
  assert_every_stage_ran(out_a, a, STEPS)

  # Stage 1: the synthetic world, its vocab and the vocab's manifest, byte for byte.
  data_a, data_b = _files(a / 'data'), _files(b / 'data')
  assert 'vocab.txt' in data_a and 'synthetic_world.json' in data_a
  assert data_a.keys() == data_b.keys()
  assert [k for k in data_a if data_a[k] != data_b[k]] == []

  # Stage 2: the same examples in the same order in every split.
  examples_a = _tfds_examples(a / 'tfds')
  assert len(examples_a) == len(formats.SPLITS)
  assert examples_a == _tfds_examples(b / 'tfds')

  # Stage 3: the same losses at every logged step, and the same final state, bit for bit.
  logs = [
      [_without(json.loads(line), TIMING_KEYS) for line in (w / 'metrics.jsonl').open()]
      for w in (a, b)
  ]
  assert logs[0] and logs[0] == logs[1]
  state_a, state_b = _restored_state(a, STEPS), _restored_state(b, STEPS)
  assert len(state_a) > 100 and state_a.keys() == state_b.keys()
  assert [k for k in state_a if state_a[k] != state_b[k]] == []

  # Stage 4: the same embeddings, rankings and metrics.
  for sub in ('embeddings', 'eval_dev'):
    files_a, files_b = _files(a / sub), _files(b / sub)
    assert files_a.keys() == files_b.keys()
    # metadata.json (export) and evaluation.json (evaluation) record paths and timings.
    same = [k for k in files_a if not k.endswith(('metadata.json', 'evaluation.json', '.md'))]
    assert [k for k in same if files_a[k] != files_b[k]] == []
  assert any(k.endswith('.npz') for k in _files(a / 'embeddings'))
  ev_a, ev_b = (
      _without(json.loads((w / 'eval_dev' / 'evaluation.json').read_text()), TIMING_KEYS)
      for w in (a, b)
  )
  assert ev_a.pop('workdir') == str(a) and ev_b.pop('workdir') == str(b)
  assert ev_a.pop('exports') == {
      k: v.replace(str(b), str(a)) for k, v in ev_b.pop('exports').items()
  }
  assert ev_a == ev_b

  # Stage 5: the printed table, every digit.
  assert _report_table(out_a) == _report_table(out_b)

  assert_resumes_then_reuses(config_file, a, STEPS, compile_cache=cache_a)
