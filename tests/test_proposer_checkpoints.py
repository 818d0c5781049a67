"""The learned proposer's checkpoints under the trainer's corrupt-checkpoint policy:
checksums, unreadable steps moved aside, `checkpoint.restart_if_unreadable`."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from capture_jax import instances
from capture_jax.instances import trainer
from capture_jax.training import checkpoint as checkpoint_lib
from tests.test_instances import _config
from tests.test_instances import _pool


def _steps(workdir: Path) -> list[int]:
  return sorted(int(p.name) for p in trainer.checkpoint_dir(workdir).iterdir() if p.name.isdigit())


def _flip_a_byte_of_the_largest_file(folder: Path) -> None:
  path = max((p for p in folder.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0xFF
  path.write_bytes(bytes(data))


@pytest.mark.slow  # ~20-40 s: four short proposer trainings
def test_a_corrupt_proposer_checkpoint_is_moved_aside_and_training_resumes(tmp_path, capfd):
  c = _config()
  c.instances.update(hidden_size=16, num_layers=1, num_heads=2, batch_size=4, num_steps=6)
  c.instances.checkpoint_every = 2
  pool, _ = _pool(c)
  workdir = tmp_path / 'a'
  instances.train(c, workdir, pool=pool, stop_after=4)
  ckpts = Path(trainer.checkpoint_dir(workdir))
  assert _steps(workdir) == [2, 4]
  for step in (2, 4):
    assert checkpoint_lib.checksum_problems(ckpts / str(step)) == []
  _flip_a_byte_of_the_largest_file(ckpts / '4' / 'params')
  # Another configuration is refused by the newest intact checkpoint's, before anything moves.
  other = c.copy_and_resolve_references()
  other.instances.hidden_size = 32
  with pytest.raises(instances.IncompatibleProposerError, match='hidden_size: checkpoint 16'):
    instances.train(other, workdir, pool=pool)
  assert _steps(workdir) == [2, 4] and checkpoint_lib.corrupt_in(ckpts) == []
  # Step 2 as saved before proposers wrote checksums: restored unverified, with a note.
  (ckpts / '2' / checkpoint_lib.CHECKSUMS_FILE).unlink()

  capfd.readouterr()
  resumed = instances.train(c, workdir, pool=pool)
  out = capfd.readouterr().out
  assert 'checkpoint 4 in' in out and 'checksums do not match' in out and 'moved aside' in out
  assert 'checkpoint 2 has no checksums.json' in out
  assert 'resuming the proposer from step 2' in out
  straight = instances.train(c, tmp_path / 'b', pool=pool)
  assert resumed.step == straight.step == 6
  for x, y in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(straight.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
  aside = checkpoint_lib.corrupt_in(ckpts)
  assert [p.name.split('-')[1] for p in aside] == ['4']
  assert _steps(workdir) == [4, 6] and trainer.latest_proposer_step(workdir) == 6
  assert instances.LearnedProposer(workdir, c).step == 6

  # Every checkpoint unreadable: refused without the flag, nothing trained.
  for step in _steps(workdir):
    _flip_a_byte_of_the_largest_file(ckpts / str(step) / 'params')
  # Proposals are not made with damaged weights: the latest step is refused, naming the command
  # that moves it aside.
  with pytest.raises(
      checkpoint_lib.CorruptCheckpointError,
      match=r'checkpoint 6 in .* does not match its checksums.json: params/.*'
      r'python -m capture_jax.instances train',
  ):
    instances.LearnedProposer(workdir, c)
  with pytest.raises(checkpoint_lib.UnreadableCheckpointsError, match='restart_if_unreadable'):
    instances.train(c, workdir, pool=pool)
  assert _steps(workdir) == [] and len(checkpoint_lib.corrupt_in(ckpts)) == 3
  assert trainer.latest_proposer_step(workdir) is None  # the corrupt-* folders are not steps
  assert not instances.has_trained_proposer(workdir)
  # With the flag: from step 0, the corrupt ones kept.
  again = c.copy_and_resolve_references()
  again.checkpoint.restart_if_unreadable = True
  assert instances.train(again, workdir, pool=pool, stop_after=2).step == 2
  assert _steps(workdir) == [2] and trainer.latest_proposer_step(workdir) == 2
  assert len(checkpoint_lib.corrupt_in(ckpts)) == 3
