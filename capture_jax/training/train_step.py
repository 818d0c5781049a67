"""Train state and the jitted, sharded pretraining step.

One step: turn the host batch (storage dtype, unmasked) into the model's
masked float32 batch on the devices (`masking.model_batch`), split the global
batch into `train.microbatches` micro-batches, accumulate the gradients of
`MLM + MRM + contrastive` (the contrastive term over each whole global
micro-batch, across every device and host), clip, take an AdamW step, and skip
the update (keeping parameters and optimizer state) when the loss or the
gradients are not finite, counting it.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from capture_jax import losses
from capture_jax.data import masking as masking_lib
from capture_jax.models import CaptureModel
from capture_jax.training import contrastive as contrastive_lib
from capture_jax.training import optimizer as optimizer_lib
from capture_jax.training import rng_lowering
from capture_jax.training import sharding

Array = jax.Array
BATCH_AXES = sharding.BATCH_AXES


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the data position.

  step: int32 scalar, the number of steps taken (skipped ones included).
  params: `{'model': ..., 'loss': ...}` float32 trainable parameters.
  opt_state: the optax state.
  rng: uint32[2] base key; step `s` uses `fold_in(rng, s)`.
  skipped: int32 scalar, updates skipped because the loss or gradients were not finite.
  """

  step: Array
  params: Any
  opt_state: Any
  rng: Array
  skipped: Array


def init_train_state(params: Any, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=optimizer.init(params),
      rng=jax.random.PRNGKey(seed),
      skipped=jnp.zeros((), jnp.int32),
  )


def split_microbatches(batch: Mapping[str, Array], num: int, mesh: Mesh) -> dict[str, Array]:
  """`[GB, ...]` -> `[num, GB / num, ...]`, micro-batch m = rows `m, m + num, ...`.

  Strided so that every device keeps its own rows: a device's contiguous
  block of the global batch holds an equal share of every micro-batch.
  """

  def split(x):
    gb = x.shape[0]
    y = x.reshape((gb // num, num) + x.shape[1:])
    y = jnp.moveaxis(y, 1, 0)
    return jax.lax.with_sharding_constraint(y, NamedSharding(mesh, P(None, BATCH_AXES)))

  return {k: split(v) for k, v in batch.items()}


def make_gradients(config: ml_collections.ConfigDict, mesh: Mesh) -> Callable:
  """`(params, model batch, rng) -> (grads, loss terms)` of MLM + MRM + the global-batch
  contrastive loss, averaged over `train.microbatches` micro-batches (a scan)."""
  model = CaptureModel(config.model)
  num_micro = config.train.microbatches

  def loss_fn(params, batch, rng):
    out = model.apply(
        {'params': params['model']},
        batch,
        train=True,
        rngs={'dropout': rng},
        mlm_logits=not 0 < config.loss.mlm_prediction_budget < 1,
    )
    contrastive = contrastive_lib.global_contrastive_loss(
        out['enc_pooled_text'],
        out['enc_pooled_visual'],
        config.loss,
        params['loss'],
        mesh,
        batch_axes=BATCH_AXES,
    )
    terms = losses.pretraining_losses(out, batch, config, params['loss'], contrastive=contrastive)
    return terms['total'], terms

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def grads_and_terms(params, batch, rng):
    (_, terms), grads = grad_fn(params, batch, rng)
    return grads, terms

  def gradients(params, batch, rng):
    if num_micro == 1:
      return grads_and_terms(params, batch, rng)
    micro = split_microbatches(batch, num_micro, mesh)

    def accumulate(carry, xs):
      index, mb = xs
      return (
          jax.tree.map(jnp.add, carry, grads_and_terms(params, mb, jax.random.fold_in(rng, index))),
          None,
      )

    shapes = jax.eval_shape(grads_and_terms, params, jax.tree.map(lambda x: x[0], micro), rng)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (grads, terms), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(num_micro), micro))
    return jax.tree.map(lambda x: x / num_micro, (grads, terms))

  return gradients


def make_train_step(
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    optimizer: optax.GradientTransformation,
    masking: masking_lib.MaskingSpec,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """The (unjitted) train step `(state, host batch) -> (state, metrics)`; `jax.jit` it with the
  state and batch shardings. `masking`: the recipe, ids and seed of the device stage."""
  rng_lowering.set_cpu_threefry_unrolled(config.train.cpu_unrolled_threefry)
  schedule = optimizer_lib.learning_rate_schedule(config.train)
  gradients = make_gradients(config, mesh)

  def train_step(state: TrainState, host: dict[str, Array]) -> tuple[TrainState, dict[str, Array]]:
    batch = masking_lib.model_batch(host, masking)
    rng = jax.random.fold_in(state.rng, state.step)
    grads, terms = gradients(state.params, batch, rng)
    grad_norm = optimizer_lib.global_norm(grads)
    finite = jnp.isfinite(terms['total']) & jnp.isfinite(grad_norm)

    # Only the taken branch runs: no select over every parameter and moment.
    def update(_):
      updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
      return optax.apply_updates(state.params, updates), new_opt_state

    params, opt_state = jax.lax.cond(
        finite, update, lambda _: (state.params, state.opt_state), None
    )
    skipped = state.skipped + (~finite).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, skipped=skipped
    )
    metrics = {
        **{f'loss/{k}': v for k, v in terms.items()},
        'grad_norm': grad_norm,
        'learning_rate': schedule(state.step),
        'skipped_updates': skipped,
    }
    return new_state, metrics

  return train_step
