"""Train-state construction: parameters, optimizer and their shardings, for every command.

The trainer, the export (random-weights baseline and checkpoint restore) and
the benchmarks build state here, so that all of them agree on the parameter
tree, its initialisation and its layout on a mesh:

- `initial_params`: `{'model', 'loss'}` from scratch (traceable, for sharded init);
- `pretrained_params` / `place_pretrained`: BERT or released weights over it;
- `model_param_layout`: abstract `params['model']` and its shardings;
- `train_state_layout`: optimizer, state initialiser, abstract state, shardings;
- `count_flops`: XLA's FLOP count of a compiled step (for MFU).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from capture_jax import batch as batch_lib
from capture_jax import convert, losses
from capture_jax.models import CaptureModel
from capture_jax.training import optimizer as optimizer_lib
from capture_jax.training import sharding
from capture_jax.training import train_step as train_step_lib

INIT_KINDS = ('scratch', 'bert', 'release')


def initial_params(config: ml_collections.ConfigDict, key: jax.Array) -> dict:
  """`{'model', 'loss'}` parameters from scratch (traceable: used under jit for sharded init)."""
  model = CaptureModel(config.model)
  inputs = batch_lib.BatchLayout.from_config(config).dummy(1)
  return {
      'model': model.init({'params': key}, inputs, train=False)['params'],
      'loss': losses.init_loss_params(config.loss),
  }


def pretrained_params(config: ml_collections.ConfigDict) -> dict:
  """Host arrays to place over the scratch initialisation (empty for `train.init='scratch'`)."""
  t = config.train
  convert.check_init_vocab(config)  # (also when a run restarts after unreadable checkpoints)
  if t.init == 'bert':
    params, report = convert.from_hf_bert(t.init_path, config.model)
    print(f'initialised the text stream from BERT {t.init_path}: {report.summary()}', flush=True)
    return params
  if t.init == 'release':
    params, report = convert.from_release_state_dict(t.init_path, config.model)
    print(f'initialised from the released checkpoint {t.init_path}: {report.summary()}', flush=True)
    return params
  return {}


def place_pretrained(params: dict, pretrained: dict, shardings: dict) -> dict:
  """Replaces leaves of the sharded `params['model']` with host arrays, each put in its sharding."""
  if not pretrained:
    return params
  flat_shardings = traverse_util.flatten_dict(shardings['model'])
  placed = {
      path: jax.device_put(np.asarray(value), flat_shardings[path])
      for path, value in traverse_util.flatten_dict(pretrained).items()
  }
  return {
      **params,
      'model': convert.merge_params(params['model'], traverse_util.unflatten_dict(placed)),
  }


def model_param_layout(config: ml_collections.ConfigDict, mesh) -> tuple[Any, Any]:
  """Abstract `params['model']` and its shardings on `mesh` (the trainer's rules, which
  depend only on each parameter's path and shape)."""
  abstract = jax.eval_shape(
      lambda k: initial_params(config, k)['model'], jax.random.PRNGKey(config.seed)
  )
  return abstract, sharding.param_shardings(abstract, mesh, config.mesh)


def train_state_layout(
    config: ml_collections.ConfigDict, mesh
) -> tuple[optax.GradientTransformation, Callable[[jax.Array], Any], Any, Any]:
  """The optimizer, the state initialiser, and the abstract train state with its shardings."""
  key = jax.random.PRNGKey(config.seed)
  abstract_params = jax.eval_shape(lambda k: initial_params(config, k), key)
  param_shardings = sharding.param_shardings(abstract_params, mesh, config.mesh)
  # BERT-initialised parameters keep their lr multiplier after a resume too.
  pretrained_patterns = optimizer_lib.BERT_INITIALISED if config.train.init == 'bert' else ()
  optimizer = optimizer_lib.make_optimizer(config.train, abstract_params, pretrained_patterns)

  def init_state(key):
    return train_step_lib.init_train_state(initial_params(config, key), optimizer, config.seed)

  abstract_state = jax.eval_shape(init_state, key)
  state_shardings = sharding.state_shardings_like(abstract_state, abstract_params, param_shardings)
  return optimizer, init_state, abstract_state, state_shardings


def count_flops(compiled) -> float | None:
  """FLOPs of one call of a compiled program, counted by XLA (for MFU); None if unavailable."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # backends without cost analysis
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float(analysis.get('flops', 0.0)) or None
