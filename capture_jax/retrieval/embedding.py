"""The embedding step: a checkpoint's model -> L2-normalised retrieval rows, jitted and sharded.

Embedding kinds (`config.eval.embedding`), all L2-normalised rows:

| kind | vector | width |
| --- | --- | --- |
| `fused` | `l2n([l2n(pooled_text) ; l2n(pooled_visual)])` (the default) | 2 x bi |
| `text` | `l2n(pooled_text)` | bi |
| `visual` | `l2n(pooled_visual)` | bi |
| `encoder` | `l2n([l2n(enc_pooled_text) ; l2n(enc_pooled_visual)])` | 2 x bi |

(bi = `model.bi_hidden_size`.) Normalising each half before concatenating
gives the two modalities equal weight in the cosine whatever their scales.
`eval.encoder_text_weight` = w (default 0.5, the equal weight above) makes
the `encoder` rows `[sqrt(w) l2n(enc_pooled_text) ; sqrt(1 - w)
l2n(enc_pooled_visual)]`, whose cosine is w x the text poolers' cosine +
(1 - w) x the visual poolers'. It is for titles unlike the training captions
(real titles beside a synthetic training set), where the text pooler alone
retrieves far worse than the visual one (docs/BENCHMARKS.md, "Real titles
(issue 10)"). An export records a weight other than 0.5 in its identity.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from capture_jax import batch as batch_lib
from capture_jax.losses import l2_normalize
from capture_jax.models import CaptureModel, layers
from capture_jax.training import sharding
from capture_jax.training import state as state_lib

EMBEDDING_KINDS = ('fused', 'text', 'visual', 'encoder')  # config.py's eval.embedding choices
EQUAL_TEXT_WEIGHT = 0.5  # `eval.encoder_text_weight` of the plain `encoder` rows


def embedding_dim(model_cfg: ml_collections.ConfigDict, kind: str) -> int:
  """Width of the `kind` embedding of a model."""
  check_kind(kind)
  return model_cfg.bi_hidden_size * (2 if kind in ('fused', 'encoder') else 1)


def check_kind(kind: str) -> None:
  if kind not in EMBEDDING_KINDS:
    raise ValueError(f'eval.embedding must be one of {EMBEDDING_KINDS}, got {kind!r}')


def text_weight(config: ml_collections.ConfigDict, kind: str) -> float | None:
  """The text poolers' share of the cosine when it is not the equal one (`encoder` rows only),
  else None: what an export records in its identity."""
  w = float(config.eval.get('encoder_text_weight', EQUAL_TEXT_WEIGHT))
  if not 0.0 <= w <= 1.0:
    raise ValueError(f'eval.encoder_text_weight must be in [0, 1], got {w}')
  return None if kind != 'encoder' or w == EQUAL_TEXT_WEIGHT else w


def embed_outputs(
    outputs: Mapping[str, jax.Array], kind: str, text_weight: float | None = None
) -> jax.Array:
  """The model's output dict -> `[B, D]` float32 embeddings of `kind` (see the module docstring).

  `text_weight` (`encoder` only; None: the equal weight) is the text poolers' share of the cosine.
  """
  check_kind(kind)
  if kind == 'text':
    return l2_normalize(outputs['pooled_text'])
  if kind == 'visual':
    return l2_normalize(outputs['pooled_visual'])
  if kind == 'encoder' and text_weight is not None:
    w = text_weight
    return jnp.concatenate(
        [
            w**0.5 * l2_normalize(outputs['enc_pooled_text']),
            (1 - w) ** 0.5 * l2_normalize(outputs['enc_pooled_visual']),
        ],
        axis=-1,
    )
  prefix = 'enc_' if kind == 'encoder' else ''
  return l2_normalize(
      jnp.concatenate(
          [
              l2_normalize(outputs[f'{prefix}pooled_text']),
              l2_normalize(outputs[f'{prefix}pooled_visual']),
          ],
          axis=-1,
      )
  )


@dataclasses.dataclass
class Embedder:
  """A compiled inference step: `params['model']` and a global batch -> `[B, D]` embeddings.

  Built once by `make_embedder` and reused for every split and for any
  parameters of the same layout (a checkpoint's, or the random initialisation).
  """

  mesh: Any
  kind: str
  dimension: int
  batch_size: int  # global
  param_shardings: Any  # of params['model']
  abstract_params: Any  # params['model'] as ShapeDtypeStructs carrying those shardings
  step: Any  # compiled: (model_params, batch) -> [B, D] float32, batch-sharded
  compile_s: float

  def __call__(self, model_params: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
    return self.step(model_params, batch_lib.model_inputs(batch))


@dataclasses.dataclass(frozen=True)
class ExportStep:
  """The embedding-export step of one config on one mesh, not yet compiled.

  jitted: `(params['model'], batch) -> [B, D]` float32 embeddings, the batch (the model
    inputs, `[data.eval_batch_size, ...]`) and the rows split over `('data', 'fsdp')`.
  abstract_params, abstract_batch: its arguments as `ShapeDtypeStruct`s with shardings, enough
    to lower and compile it without any array (also for a topology's compile-only devices).
  """

  mesh: Any
  kind: str
  dimension: int
  batch_size: int  # global
  param_shardings: Any
  abstract_params: Any
  abstract_batch: dict[str, jax.ShapeDtypeStruct]
  jitted: Any

  def lower(self):
    return self.jitted.lower(self.abstract_params, self.abstract_batch)


def build_export_step(
    config: ml_collections.ConfigDict, mesh, kind: str | None = None
) -> ExportStep:
  """The one builder of the inference step (train=False: no dropout; inputs are unmasked), for
  the export and for `python -m capture_jax.aot`.

  Parameters keep the trainer's sharding rules on `mesh`; the batch is split
  over `('data', 'fsdp')` and so are the output rows.
  """
  kind = kind or config.eval.embedding
  check_kind(kind)
  weight = text_weight(config, kind)
  batch_size = config.data.eval_batch_size
  problems = sharding.batch_split_problems(batch_size, mesh, 'data.eval_batch_size')
  try:
    layers.check_attention_impl(
        config.model.attention_impl, config.model.dtype, sharding.mesh_platform(mesh)
    )
  except ValueError as e:
    problems.append(str(e))
  if problems:
    raise ValueError('; '.join(problems))
  abstract, shardings = state_lib.model_param_layout(config, mesh)
  model = CaptureModel(config.model)

  def step(model_params, batch):
    return embed_outputs(model.apply({'params': model_params}, batch, train=False), kind, weight)

  batch_sharding = sharding.batch_sharding(mesh)
  return ExportStep(
      mesh=mesh,
      kind=kind,
      dimension=embedding_dim(config.model, kind),
      batch_size=batch_size,
      param_shardings=shardings,
      abstract_params=sharding.abstract_with_shardings(abstract, shardings),
      abstract_batch=batch_lib.BatchLayout.from_config(config).abstract(
          batch_size, batch_lib.MODEL_INPUTS, sharding=batch_sharding
      ),
      jitted=jax.jit(step, in_shardings=(shardings, batch_sharding), out_shardings=batch_sharding),
  )


def make_embedder(config: ml_collections.ConfigDict, mesh, kind: str | None = None) -> Embedder:
  """Compiles `build_export_step`'s step into an `Embedder`."""
  built = build_export_step(config, mesh, kind)
  start = time.perf_counter()
  compiled = built.lower().compile()
  return Embedder(
      built.mesh,
      built.kind,
      built.dimension,
      built.batch_size,
      built.param_shardings,
      built.abstract_params,
      compiled,
      time.perf_counter() - start,
  )


def random_model_params(config: ml_collections.ConfigDict, embedder: Embedder) -> Any:
  """The untrained model (`state.initial_params(config, PRNGKey(config.seed))['model']`), created
  directly in its shardings."""
  init = jax.jit(
      lambda k: state_lib.initial_params(config, k)['model'], out_shardings=embedder.param_shardings
  )
  return init(jax.random.PRNGKey(config.seed))
