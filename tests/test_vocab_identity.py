"""One vocab per run: the initial BERT checkpoint's, the checkpoints', the proposer's and the
exports' vocab is `data.vocab_file`, by `tokenizer.vocab_fingerprint`; another is refused, naming
both files."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from capture_jax import convert
from capture_jax import instances
from capture_jax import train
from capture_jax.data import tokenizer as tokenizer_lib
from capture_jax.training import checkpoint as checkpoint_lib
from capture_jax.training import steps as steps_lib
from tests.helpers import REPO
from tests.helpers import run_module
from tests.helpers import tiny_config
from tests.helpers import tiny_hf_bert
from tests.helpers import trainer_config
from tests.helpers import write_config_module

pytest.importorskip('transformers')


def tokens_of(vocab_file) -> list[str]:
  return Path(vocab_file).read_text(encoding='utf-8').splitlines()


def write_tokens(path: Path, tokens: list[str]) -> Path:
  path.write_text('\n'.join(tokens) + '\n', encoding='utf-8')
  return path


def reordered(vocab_file, out: Path, i: int = 10) -> Path:
  """The same tokens with ids `i` and `i + 1` swapped (same size, another order)."""
  tokens = tokens_of(vocab_file)
  tokens[i], tokens[i + 1] = tokens[i + 1], tokens[i]
  return write_tokens(out, tokens)


@pytest.fixture(scope='module')
def dataset_config(tmp_path_factory):
  return trainer_config(tmp_path_factory.mktemp('data'))


def no_compiling(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError('the train step was built: the refusal came too late')

  monkeypatch.setattr(steps_lib, 'build_train_step', refuse)


# --------------------------------------------------------------------------
# train.init=bert: the run's vocab is the checkpoint's vocab.txt.


def test_init_bert_refuses_another_vocab_before_compiling(dataset_config, tmp_path, monkeypatch):
  cfg = dataset_config.copy_and_resolve_references()
  vocab = cfg.data.vocab_file
  tokens = tokens_of(vocab)
  bert = tiny_hf_bert(tmp_path / 'bert', cfg.model, reordered(vocab, tmp_path / 'reordered.txt'))
  cfg.train.update(init='bert', init_path=str(bert))
  no_compiling(monkeypatch)
  with pytest.raises(
      convert.ConversionError,
      match=re.escape(
          f'data.vocab_file={vocab} is not the vocab of train.init_path={bert} '
          f'({bert}/vocab.txt): first difference at id 10: {tokens[10]!r} in {vocab}, '
          f'{tokens[11]!r} in {bert}/vocab.txt'
      ),
  ):
    train.run(cfg, tmp_path / 'reordered')

  write_tokens(bert / 'vocab.txt', tokens[:-1])  # a smaller vocab, the first ids equal
  n = len(tokens) - 1
  with pytest.raises(
      convert.ConversionError,
      match=re.escape(
          f'first difference at id {n}: {tokens[n]!r} in {vocab}, none ({n} tokens) in'
      ),
  ):
    train.run(cfg, tmp_path / 'smaller')

  (bert / 'vocab.txt').unlink()
  with pytest.raises(convert.ConversionError, match=rf'{bert} has no vocab.txt'):
    train.run(cfg, tmp_path / 'none')

  # The same tokens (here without the final newline) are the same vocab.
  (bert / 'vocab.txt').write_text('\n'.join(tokens), encoding='utf-8')
  assert convert.check_init_vocab(cfg) is None
  cfg.data.vocab_file = ''
  with pytest.raises(convert.ConversionError, match='data.vocab_file is empty'):
    convert.check_init_vocab(cfg)


def test_a_release_with_a_vocab_beside_it_is_checked(dataset_config, tmp_path):
  cfg = dataset_config.copy_and_resolve_references()
  cfg.train.update(init='release', init_path=str(tmp_path / 'pytorch_model.bin'))
  assert convert.check_init_vocab(cfg) is None  # the CAPTURE release ships no vocab
  reordered(cfg.data.vocab_file, tmp_path / 'vocab.txt')
  with pytest.raises(convert.ConversionError, match='first difference at id 10'):
    convert.check_init_vocab(cfg)


# --------------------------------------------------------------------------
# Checkpoints carry the vocab: resume and the proposer refuse another.


@pytest.fixture(scope='module')
def trained(dataset_config, tmp_path_factory):
  """(config, workdir) of a 2-step run."""
  cfg = dataset_config.copy_and_resolve_references()
  cfg.train.num_steps = 2
  workdir = tmp_path_factory.mktemp('run')
  train.run(cfg, workdir)
  return cfg, workdir


def test_checkpoints_record_the_vocab_fingerprint(trained):
  cfg, workdir = trained
  manager = checkpoint_lib.make_manager(workdir, cfg.checkpoint)
  saved = checkpoint_lib.saved_config(manager, 2)
  manager.close()
  assert saved[checkpoint_lib.RUN_IDENTITY_KEY] == {
      'vocab_fingerprint': tokenizer_lib.vocab_fingerprint(cfg.data.vocab_file),
      'vocab_file': cfg.data.vocab_file,
  }


def test_resume_with_another_vocab_is_refused(trained, tmp_path, monkeypatch):
  cfg, workdir = trained
  other = cfg.copy_and_resolve_references()
  other.train.num_steps = 3
  other.data.vocab_file = str(reordered(cfg.data.vocab_file, tmp_path / 'other.txt'))
  ours = tokenizer_lib.vocab_fingerprint(cfg.data.vocab_file)[:16]
  theirs = tokenizer_lib.vocab_fingerprint(other.data.vocab_file)[:16]
  no_compiling(monkeypatch)
  with pytest.raises(
      checkpoint_lib.IncompatibleCheckpointError,
      match=re.escape(
          f'the vocab differs: trained with {cfg.data.vocab_file} (fingerprint {ours}), '
          f'config data.vocab_file={other.data.vocab_file} (fingerprint {theirs})'
      ),
  ):
    train.run(other, workdir)


def test_a_checkpoint_without_a_fingerprint_is_read_with_a_note(trained, capsys):
  cfg, _ = trained
  assert checkpoint_lib.vocab_problem({'model': {}}, cfg) is None
  assert 'records no vocab fingerprint' in capsys.readouterr().out


def test_the_proposer_refuses_to_resume_with_another_vocab(dataset_config, tmp_path):
  cfg = dataset_config.copy_and_resolve_references()
  cfg.instances.update(
      hidden_size=16, num_layers=1, num_heads=2, batch_size=4, num_steps=1, progress_bar=False
  )
  instances.train(cfg, tmp_path)
  cfg.instances.num_steps = 2
  other = cfg.copy_and_resolve_references()
  other.data.vocab_file = str(reordered(cfg.data.vocab_file, tmp_path / 'other.txt'))
  with pytest.raises(
      instances.IncompatibleProposerError,
      match=re.escape(f'another vocab: trained with {cfg.data.vocab_file} (fingerprint ')
      + '[0-9a-f]{16}',
  ):
    instances.train(other, tmp_path)
  assert instances.train(cfg, tmp_path).step == 2  # the run's own vocab resumes


# --------------------------------------------------------------------------
# The README's sequence, end to end: a tiny synthetic world in place of Product1M, a tiny BERT
# saved by transformers in place of bert-base-chinese, a tiny config in place of capture_paper.

README_SECTION = '## Pretraining on the real Product1M from bert-base-chinese'


def readme_commands() -> list[str]:
  """The shell lines of the README section's code block, `\\` continuations joined."""
  text = (REPO / 'README.md').read_text(encoding='utf-8')
  section = text.split(README_SECTION, 1)[1].split('\n## ', 1)[0]
  lines, pending = [], ''
  for line in section.splitlines():
    if not line.startswith('    '):
      continue
    line = pending + line.strip()
    pending = line[:-1] + ' ' if line.endswith('\\') else ''
    if not pending and line and not line.startswith('#'):
      lines.append(line)
  return lines


def expand(line: str, variables: dict[str, str]) -> str:
  for name in sorted(variables, key=len, reverse=True):
    line = line.replace(f'${name}', variables[name])
  return line


def bert_like_vocab(titles_vocab: Path, out: Path) -> Path:
  """bert-base-chinese's layout ([PAD] 0, [unused*], [UNK] 100, [CLS], [SEP], [MASK]) over
  the tokens of a vocab trained on the world's titles."""
  specials = ['[UNK]', '[CLS]', '[SEP]', '[MASK]']
  words = [t for t in tokens_of(titles_vocab) if t not in specials and t != '[PAD]']
  unused = [f'[unused{i}]' for i in range(1, 100)]
  return write_tokens(out, ['[PAD]'] + unused + specials + words)


@pytest.mark.slow  # ~3 minutes on 2 cores: five commands, each compiling its own program
def test_the_readme_sequence_from_bert_runs_end_to_end(tmp_path):
  from capture_jax.data import synthetic  # pylint: disable=import-outside-toplevel

  data, bert = tmp_path / 'data', tmp_path / 'bert'
  preset = synthetic.PRESETS['tiny']
  synthetic.generate(str(data), 'tiny', seed=0, progress=False)  # annotation files + features
  tokenizer_lib.train_vocab(tokenizer_lib.iter_titles(str(data)), 300, str(tmp_path / 'v.txt'))
  vocab = bert_like_vocab(tmp_path / 'v.txt', tmp_path / 'bert_vocab.txt')

  cfg = tiny_config(num_hidden_layers=1, v_num_hidden_layers=1, co_num_layers=1, cross_num_layers=1)
  cfg.model.update(
      vocab_size=len(tokens_of(vocab)),
      v_feature_size=preset.feature_dim,
      v_target_size=preset.feature_dim,
      max_text_len=16,
  )
  cfg.data.update(max_regions=preset.max_regions, batch_size=8, eval_batch_size=8)
  cfg.train.update(num_steps=2, log_every=1, progress_bar=False)
  cfg.checkpoint.update(every_steps=2)
  cfg.instances.update(
      hidden_size=16, num_layers=1, num_heads=2, batch_size=4, num_steps=2, warmup_steps=1
  )
  cfg.instances.progress_bar = False
  cfg.eval.update(progress_bar=False)
  config = write_config_module(tmp_path / 'tiny_paper.py', cfg)
  tiny_hf_bert(bert, cfg.model, vocab)

  variables = {'DATA': str(data), 'BERT': str(bert), 'TFDS': str(tmp_path / 'tfds')}
  variables['RUN'] = str(tmp_path / 'run')
  commands = readme_commands()
  assert [c.split()[2] for c in commands if c.startswith('python')] == [
      'capture_jax.data.product1m_tfds',
      'capture_jax.train',
      'capture_jax.instances',
      'capture_jax.export',
      'capture_jax.evaluate',
  ]
  outputs = []
  for line in commands:
    name, eq, value = line.partition('=')
    if eq and name.isidentifier() and not line.startswith('python'):
      if name not in variables:  # FLAGS: built from the others
        variables[name] = shlex.split(expand(value.split('  #')[0].strip(), variables))[0]
      continue
    line = expand(line, variables).replace('configs/capture_paper.py', str(config))
    args = shlex.split(line)
    assert args[:2] == ['python', '-m'], line
    result = run_module(args[2], *args[3:], timeout=600)
    assert result.returncode == 0, (line, result.stdout[-3000:], result.stderr[-3000:])
    outputs.append(result.stdout + result.stderr)

  assert f'initialised the text stream from BERT {bert}' in outputs[1]
  assert 'proposer at step 2' in outputs[2]
  assert (tmp_path / 'run' / 'eval_dev' / 'report.md').is_file(), outputs[4][-2000:]
