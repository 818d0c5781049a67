"""Training the learned proposer on copy-and-paste pseudo-labels, and loading it.

Layout: `{workdir}/instances/checkpoints/{step}/{params,opt_state,config}`
(Orbax). The saved config holds the `instances` block, the feature width
the proposer was trained for, and the run's vocab (`checkpoint.run_identity`:
the proposer reads no text, but a workdir is one run with one vocab, so
resuming it with another is refused). Starting in a workdir that has checkpoints
resumes from the latest one; batches are a pure function of (seed, step), so
a resumed run trains on the same batches as an uninterrupted one.

Integrity is the trainer's (`training/checkpoint.py`): every step gets its
`checksums.json`, a checkpoint that fails them or cannot be read is moved
aside to `checkpoints/corrupt-{step}-{time}` and the previous one restored,
and `checkpoint.restart_if_unreadable` decides when none is readable.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from capture_jax import progress as progress_lib
from capture_jax import storage
from capture_jax.instances import compose
from capture_jax.instances import model as model_lib
from capture_jax.instances import proposals as proposals_lib
from capture_jax.training import checkpoint as checkpoint_lib
from capture_jax.training import loop as loop_lib
from capture_jax.training import preemption as preemption_lib


class IncompatibleProposerError(ValueError):
  """A proposer checkpoint of another architecture or feature width than the config's."""


def proposer_dir(workdir: storage.PathLike) -> storage.Path:
  """Where a workdir keeps its learned proposer (and proposals files)."""
  return storage.as_path(workdir) / 'instances'


def checkpoint_dir(workdir: storage.PathLike) -> storage.Path:
  return proposer_dir(workdir) / 'checkpoints'


def _manager(workdir: storage.PathLike, config: ml_collections.ConfigDict | None = None):
  cfg = config.instances if config is not None else None
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=cfg.checkpoint_every if cfg else 1,
      max_to_keep=cfg.keep_last if cfg else None,
      enable_async_checkpointing=False,
      create=config is not None,
  )
  return ocp.CheckpointManager(
      storage.absolute(checkpoint_dir(workdir)),
      options=options,
      item_names=('params', 'opt_state', 'config'),
  )


def latest_proposer_step(workdir: storage.PathLike | None) -> int | None:
  """The step of the newest learned-proposer checkpoint in `workdir` (None: none), from the
  folder names (and, on GCS, Orbax's commit marker): nothing is restored."""
  if not workdir:
    return None
  d = checkpoint_dir(workdir)
  steps = (
      [
          int(p.name)
          for p in d.iterdir()
          if p.name.isdigit() and ocp.utils.is_checkpoint_finalized(p)
      ]
      if storage.is_dir(d)
      else []
  )
  return max(steps, default=None)


def has_trained_proposer(workdir: storage.PathLike | None) -> bool:
  """Whether `workdir` holds a learned proposer checkpoint (for `eval.instances`' default)."""
  return latest_proposer_step(workdir) is not None


def saved_signature(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What a checkpoint records about the proposer: its architecture and input width."""
  sig = {k: int(config.instances[k]) for k in model_lib.ARCHITECTURE_FIELDS}
  sig['feature_dim'] = int(config.data.feature_dim)
  return sig


def _check_signature(saved: dict, ours: dict, where: storage.Path) -> None:
  diffs = [
      f'{k}: checkpoint {saved.get(k)!r}, config {v!r}'
      for k, v in ours.items()
      if saved.get(k) != v
  ]
  if diffs:
    raise IncompatibleProposerError(
        f'{where} holds a proposer of another configuration: '
        + '; '.join(diffs)
        + ' (instances.* fields / data.feature_dim). Use another --workdir or the matching config.'
    )


def _check_vocab(saved: dict, config: ml_collections.ConfigDict, where: storage.Path) -> None:
  """Refuses resuming a proposer saved with another vocab than `config.data.vocab_file` (a
  checkpoint saved before proposers recorded it passes)."""
  theirs = saved.get(checkpoint_lib.RUN_IDENTITY_KEY)
  ours = checkpoint_lib.run_identity(config)
  if theirs is None or theirs.get('vocab_fingerprint') == ours['vocab_fingerprint']:
    return
  short = lambda fp: fp[:16] if fp else 'none'
  raise IncompatibleProposerError(
      f'{where} holds a proposer of a run with another vocab: trained with '
      f'{theirs.get("vocab_file")} (fingerprint {short(theirs.get("vocab_fingerprint"))}), config '
      f'data.vocab_file={ours["vocab_file"]} (fingerprint {short(ours["vocab_fingerprint"])}). '
      'A workdir is one run: use its vocab, or another --workdir.'
  )


def load_donor_records(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  """The donor samples of `instances.donor_splits`, at most `instances.max_donors` (a seeded subset).

  Only regions, boxes and image sizes are used: labels are never read.
  """
  from capture_jax.data import source as source_lib  # pylint: disable=import-outside-toplevel

  cfg = config.instances
  splits = [s.strip() for s in cfg.donor_splits.split(',') if s.strip()]
  if not splits:
    raise ValueError('instances.donor_splits is empty; expected e.g. "gallery"')
  if 'train' in splits and not cfg.train_is_single_product:
    raise ValueError(
        "instances.donor_splits includes 'train', whose pairs carry no labels and mix single- and "
        'multi-product images; set instances.train_is_single_product=True only if every training '
        'image shows one product'
    )
  for s in splits:
    if s in ('dev', 'test'):
      raise ValueError(
          f'instances.donor_splits includes {s!r}: query splits are multi-product and must not '
          'be read to train a proposer; expected single-product splits such as "gallery"'
      )
  refs = []
  sources = {}
  for s in splits:
    sources[s] = source_lib.make_source(config, s)
    refs += [(s, i) for i in range(len(sources[s]))]
  if len(refs) > cfg.max_donors:
    pick = np.random.default_rng([config.seed, 0xD0]).choice(len(refs), cfg.max_donors, False)
    refs = [refs[i] for i in np.sort(pick)]
  records = []
  for s in splits:
    idx = [i for split, i in refs if split == s]
    for start in range(0, len(idx), 1024):
      for rec in sources[s].read_records(idx[start : start + 1024]):
        records.append({k: rec[k] for k in ('item_id', 'image_w', 'image_h', 'boxes', 'features')})
  return records


@dataclasses.dataclass
class TrainResult:
  params: Any
  step: int
  metrics: dict[str, float]


def _optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, cfg.learning_rate, max(cfg.warmup_steps, 1), max(cfg.num_steps, cfg.warmup_steps + 1)
  )
  return optax.chain(
      optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=cfg.weight_decay)
  )


def train(
    config: ml_collections.ConfigDict,
    workdir: storage.PathLike,
    pool: compose.DonorPool | None = None,
    stop_after: int | None = None,
) -> TrainResult:
  """Trains (or resumes training) the learned proposer; checkpoints in `workdir`.

  The stages of `capture_jax.train`, from `training/loop.py`: the lock, then
  restore or initialise, then the loop (step, log, checkpoint, stop request).

  Args:
    config: reads `instances.*`, `data.feature_dim`, `data.max_regions`,
      `seed`, and the data fields of `source.make_source` (unless `pool`).
    workdir: the run folder; the proposer goes to `{workdir}/instances/`.
    pool: donors (default: read from `instances.donor_splits`).
    stop_after: stop (and checkpoint) after this many steps of this call.
  Raises:
    IncompatibleProposerError: the workdir's checkpoint is of another
      architecture or feature width.
    ValueError: donors of another feature width than `data.feature_dim`.
    lock.LockedError: another command trains a proposer in this workdir.
  """
  with loop_lib.locked(workdir, proposer_dir(workdir), 'proposer training'):
    return _train_locked(config, workdir, pool, stop_after)


def _train_locked(
    config: ml_collections.ConfigDict,
    workdir: storage.PathLike,
    pool: compose.DonorPool | None,
    stop_after: int | None,
) -> TrainResult:
  """`train` once the workdir's proposer folder is locked."""
  manager = _manager(workdir, config)
  try:
    _check_resumable(manager, config, checkpoint_dir(workdir))  # before reading any data
    pool = _checked_pool(config, pool)
    loop = _restore_or_initialise(config, workdir, manager, pool)
    end = loop_lib.end_step(loop.step, config.instances.num_steps, stop_after)
    loop.end = end
    loop.bar = progress_lib.Progress(
        end - loop.step,
        'proposer',
        'step',
        enabled=config.instances.progress_bar and end > loop.step,
        log_every=config.instances.log_every,
    )
    message = 'finishing this step, saving the proposer, then exiting'
    with preemption_lib.Preemption(message) as stop:
      stop.reached(loop.step)
      loop.step, stopped = loop_lib.run_steps(loop, loop.step, end, stop)
    if stopped:
      print(
          f'\nstopped by a signal: proposer saved at step {loop.step}; rerun to resume', flush=True
      )
    loop.bar.close()
    manager.wait_until_finished()
  finally:
    manager.close()
  return TrainResult(loop.params, loop.step, loop.metrics)


def _check_resumable(
    manager: ocp.CheckpointManager, config: ml_collections.ConfigDict, where: storage.Path
) -> None:
  """Refuses a workdir whose proposer is of another configuration or vocab, before any data is
  read: the newest checkpoint that is intact (the restore moves the others aside) is checked.

  Raises:
    IncompatibleProposerError: naming the fields that differ.
  """
  for step in sorted(manager.all_steps(), reverse=True):
    if checkpoint_lib.checksum_problems(checkpoint_lib.step_dir(manager, step)):
      continue  # a corrupt config could read as another configuration
    try:
      saved = checkpoint_lib.saved_config(manager, step)
    except Exception:  # pylint: disable=broad-except  (unreadable: the restore reports it)
      continue
    _check_signature(saved['signature'], saved_signature(config), where)
    _check_vocab(saved, config, where)
    return


def _checked_pool(
    config: ml_collections.ConfigDict, pool: compose.DonorPool | None
) -> compose.DonorPool:
  """`pool`, or the donors of `instances.donor_splits`; of width `data.feature_dim`."""
  if pool is None:
    pool = compose.make_pool(load_donor_records(config), config)
  if pool.feature_dim != config.data.feature_dim:
    raise ValueError(
        f'donor features have width {pool.feature_dim}, expected data.feature_dim='
        f'{config.data.feature_dim}'
    )
  return pool


def _init_batch(max_regions: int, feature_dim: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """A batch of one sample to initialise the model with: features `[1, R, D]`, boxes
  `[1, R, 4]`, mask `[1, R]`."""
  return (
      jnp.zeros((1, max_regions, feature_dim)),
      jnp.tile(jnp.array([0.1, 0.1, 0.5, 0.5]), (1, max_regions, 1)),
      jnp.ones((1, max_regions), bool),
  )


@dataclasses.dataclass
class ProposerLoop:
  """What the proposer's loop needs, and the hooks `loop.run_steps` calls (`loop.LoopHooks`)."""

  config: ml_collections.ConfigDict
  manager: Any
  pool: compose.DonorPool
  train_step: Any  # (params, opt_state, batch) -> (params, opt_state, metrics), jitted
  params: Any
  opt_state: Any
  step: int
  saved_config: dict[str, Any]  # saved with every checkpoint (`LearnedProposer` reads it)
  end: int = 0
  bar: Any = None
  metrics: dict[str, float] = dataclasses.field(default_factory=dict)
  running: list[dict] = dataclasses.field(default_factory=list)  # on the devices until logged
  t0: float = dataclasses.field(default_factory=time.time)

  def dispatch(self, step: int) -> None:
    batch = compose.make_batch(self.pool, self.config.seed, step, self.config)
    self.params, self.opt_state, m = self.train_step(self.params, self.opt_state, batch)
    self.running.append(m)

  def save_due(self, step: int) -> bool:
    return step % self.config.instances.checkpoint_every == 0 or step == self.end

  def sync(self, step: int) -> None:
    cfg = self.config.instances
    if step % cfg.log_every == 0 or step == self.end:
      self.metrics = {
          k: float(np.mean([float(x[k]) for x in self.running])) for k in self.running[0]
      }
      self.running = []
      line = ' '.join(f'{k}={v:.4f}' for k, v in self.metrics.items())
      self.bar.set_postfix(
          loss=f'{self.metrics["loss"]:.3f}', pair_acc=f'{self.metrics["pair_accuracy"]:.3f}'
      )
      if not cfg.progress_bar:
        print(f'proposer step {step}: {line} ({time.time() - self.t0:.0f}s)', flush=True)
    self.bar.update(1)

  def save(self, step: int, stopping: bool) -> None:
    del stopping  # always forced: Orbax alone would also save the first step
    self.manager.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(self.params),
            opt_state=ocp.args.StandardSave(self.opt_state),
            config=ocp.args.JsonSave(self.saved_config),
        ),
        force=True,
    )
    checkpoint_lib.record_checksums(self.manager)  # saves are synchronous: every step is final


def _restore_or_initialise(
    config: ml_collections.ConfigDict,
    workdir: storage.PathLike,
    manager: ocp.CheckpointManager,
    pool: compose.DonorPool,
) -> ProposerLoop:
  """The newest readable checkpoint's parameters and optimizer state, else new ones; and the step.

  The trainer's corrupt-checkpoint policy (`checkpoint.restore_readable`,
  `loop.require_readable`): an unreadable checkpoint (or one that fails its
  checksums) is moved aside and the previous one restored; when there were
  checkpoints and none is readable, training from step 0 needs
  `checkpoint.restart_if_unreadable` (the same flag as the trainer's).
  """
  cfg = config.instances
  model = model_lib.make_model(cfg)
  tx = _optimizer(cfg)
  r = int(config.data.max_regions)
  # Jitted: eager Flax init compiles every op separately (seconds on CPU).
  init_batch = _init_batch(r, config.data.feature_dim)
  params = jax.jit(model.init)(jax.random.PRNGKey(config.seed), *init_batch)['params']
  opt_state = tx.init(params)
  params, opt_state, step = _restore(config, workdir, manager, params, opt_state)

  @jax.jit
  def train_step(params, opt_state, batch):
    grads, metrics = jax.grad(lambda p: model_lib.loss_fn(model, p, batch), has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  saved_config = {
      'signature': saved_signature(config),
      'instances': cfg.to_dict(),
      'max_regions': r,
      checkpoint_lib.RUN_IDENTITY_KEY: checkpoint_lib.run_identity(config),
  }
  return ProposerLoop(config, manager, pool, train_step, params, opt_state, step, saved_config)


def _restore(
    config: ml_collections.ConfigDict,
    workdir: storage.PathLike,
    manager: ocp.CheckpointManager,
    params: Any,
    opt_state: Any,
) -> tuple[Any, Any, int]:
  """`(params, opt_state, step)` of the newest readable checkpoint (restored onto the shapes of
  the given ones), else the given ones at step 0. See `_restore_or_initialise`."""
  had_checkpoints = bool(manager.all_steps())
  items = {
      'params': ocp.args.StandardRestore(params),
      'opt_state': ocp.args.StandardRestore(opt_state),
  }
  restored = checkpoint_lib.restore_readable(manager, items, move_unreadable=True)
  where = checkpoint_dir(workdir)
  loop_lib.require_readable(
      restored is not None,
      had_checkpoints,
      checkpoint_lib.corrupt_in(where),
      config.checkpoint.restart_if_unreadable,
      where,
  )
  if restored is None:
    return params, opt_state, 0
  items, step = restored
  print(f'resuming the proposer from step {step} ({where})', flush=True)
  return items['params'], items['opt_state'], step


class LearnedProposer:
  """A trained proposer, restored from a workdir: `propose(records)`.

  Attributes:
    feature_dim: the feature width it was trained for.
    step: the checkpoint step.
  """

  def __init__(self, workdir: storage.PathLike, config: ml_collections.ConfigDict | None = None):
    """Restores the latest checkpoint of `{workdir}/instances/checkpoints`.

    Args:
      workdir: the run folder the proposer was trained in.
      config: if given, its architecture and `data.feature_dim` must match the
        checkpoint's (else `IncompatibleProposerError`); its grouping
        thresholds and `propose_batch_size` are used (default: the saved ones).
    Raises:
      FileNotFoundError: no checkpoint in the workdir.
    """
    if not has_trained_proposer(workdir):
      raise FileNotFoundError(
          f'no trained proposer in {checkpoint_dir(workdir)}; train one with `python -m '
          f'capture_jax.instances train --config=... --workdir={workdir}`'
      )
    manager = _manager(workdir)
    step = manager.latest_step()
    try:
      checkpoint_lib.check_intact(
          manager, step, trainer='python -m capture_jax.instances train', step_flag=None
      )
    except checkpoint_lib.CorruptCheckpointError:
      manager.close()
      raise
    saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
    if config is not None:
      _check_signature(saved['signature'], saved_signature(config), checkpoint_dir(workdir))
      cfg = config.instances
    else:
      cfg = ml_collections.ConfigDict(saved['instances'])
    self.feature_dim = int(saved['signature']['feature_dim'])
    self.step = int(step)
    self.objectness_threshold = float(cfg.objectness_threshold)
    self.affinity_threshold = float(cfg.affinity_threshold)
    self.batch_size = int(cfg.propose_batch_size)
    self._model = model_lib.make_model(saved['signature'])
    r = int(saved['max_regions'])
    abstract = jax.eval_shape(
        self._model.init,
        jax.random.PRNGKey(0),
        *_init_batch(r, self.feature_dim),
    )['params']
    self.params = manager.restore(
        step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract))
    )['params']
    manager.close()
    self._apply = jax.jit(
        lambda p, f, b, m: jax.tree.map(jax.nn.sigmoid, self._model.apply({'params': p}, f, b, m))
    )

  def scores(self, records: Sequence[dict[str, Any]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per record, ([n, n] affinity probabilities, [n] objectness probabilities).

    Raises:
      ValueError: a record with no regions or features of another width than
        the proposer's (naming the item and the expected width).
    """
    out = []
    for start in range(0, len(records), self.batch_size):
      chunk = records[start : start + self.batch_size]
      checked = [proposals_lib.check_record(r, self.feature_dim) for r in chunk]
      # Pad to a multiple of 8 regions: few shapes, few compilations.
      r = max(len(c['boxes']) for c in checked)
      r = -(-r // 8) * 8
      batch = compose.pad_samples(
          [
              (c['features'], c['boxes'], rec['image_w'], rec['image_h'])
              for c, rec in zip(checked, chunk)
          ],
          r,
      )
      aff, obj = self._apply(self.params, batch['features'], batch['boxes'], batch['mask'])
      aff, obj = np.asarray(aff), np.asarray(obj)
      for i, c in enumerate(checked):
        n = len(c['boxes'])
        out.append((aff[i, :n, :n], obj[i, :n]))
    return out

  def propose(self, records: Sequence[dict[str, Any]]) -> list[list[proposals_lib.Proposal]]:
    """Proposals of each record (see `model.group_regions` for the rule)."""
    return [
        model_lib.group_regions(a, o, self.objectness_threshold, self.affinity_threshold)
        for a, o in self.scores(records)
    ]
