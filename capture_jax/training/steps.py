"""The one builder of the jitted, sharded train step, for every command that runs or compiles it.

`train.py` runs it, the benchmarks time it, and `python -m capture_jax.aot`
compiles it for a TPU or GPU topology from a CPU host: all three call
`build_train_step`, so training and ahead-of-time compilation cannot disagree
about the program (MaxText's `train_compile.py` shares its step the same way).
The embedding-export step has its builder beside its consumers
(`retrieval/embedding.build_export_step`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import jax
import ml_collections
import optax

from capture_jax import batch as batch_lib
from capture_jax.data import masking as masking_lib
from capture_jax.training import resident as resident_lib
from capture_jax.training import sharding
from capture_jax.training import state as state_lib
from capture_jax.training import train_step as train_step_lib


@dataclasses.dataclass(frozen=True)
class TrainStep:
  """The train step of one config on one mesh, not yet compiled.

  jitted: `(state, batch) -> (state, metrics)`, in and out shardings explicit, the state
    donated; `batch` is a host batch (`BatchLayout.host_keys`: the storage dtype, unmasked),
    each array `[data.batch_size, ...]` split over `('data', 'fsdp')`; the step turns it into
    the model batch first (`masking.model_batch`).
  model_batch: the jitted device stage alone, host batch -> the model's masked float32 batch
    (`TRAIN_KEYS`), the same function the step runs (for tests and for inspecting batches).
  masking: the recipe, token ids and seed of the device stage.
  init_state: `key -> TrainState` from scratch (jit it with `out_shardings=state_shardings`).
  abstract_state, abstract_batch: the step's arguments as `ShapeDtypeStruct`s with shardings,
    enough to lower and compile it without any array (and for devices this host lacks).
  abstract_tables: with `data.resident`, the resident split's tables (the step's third
    argument: `(state, index batch, tables)`, the batch gathered from them); else None.
  """

  mesh: Any
  optimizer: optax.GradientTransformation
  init_state: Callable[[jax.Array], Any]
  state_shardings: Any
  batch_sharding: jax.sharding.NamedSharding
  abstract_state: Any
  abstract_batch: dict[str, jax.ShapeDtypeStruct]
  jitted: Any
  model_batch: Any
  masking: masking_lib.MaskingSpec
  abstract_tables: dict[str, jax.ShapeDtypeStruct] | None = None

  def lower(self):
    tables = () if self.abstract_tables is None else (self.abstract_tables,)
    return self.jitted.lower(self.abstract_state, self.abstract_batch, *tables)

  def compile(self) -> tuple[Any, float]:
    """The compiled step and the seconds its compilation took."""
    start = time.perf_counter()
    compiled = self.lower().compile()
    return compiled, time.perf_counter() - start


def build_train_step(
    config: ml_collections.ConfigDict,
    mesh,
    masking: masking_lib.MaskingSpec | None = None,
    resident_records: int | None = None,
) -> TrainStep:
  """The train step of `config` (its `data.batch_size` is the global batch) on `mesh`.

  `mesh` may be of real devices or of a topology's compile-only devices. `masking` defaults
  to `MaskingSpec.from_config(config)` (the ids of `data.vocab_file`). With `data.resident`
  the step takes the index batch and the resident tables of a split of `resident_records`
  records, and gathers its host batch from them (`resident.gather_rows`).
  """
  masking = masking or masking_lib.MaskingSpec.from_config(config)
  optimizer, init_state, abstract_state, state_shardings = state_lib.train_state_layout(
      config, mesh
  )
  batch_sharding = sharding.batch_sharding(mesh)
  layout = batch_lib.BatchLayout.from_config(config)
  step = train_step_lib.make_train_step(config, mesh, optimizer, masking)
  if config.data.resident:
    if not resident_records:
      raise ValueError("data.resident: the step needs the resident split's record count")
    abstract_tables = resident_lib.abstract_tables(layout.row_shapes(), resident_records, mesh)
    shapes = layout.index_shapes(config.data.batch_size)
    table_shardings = {k: t.sharding for k, t in abstract_tables.items()}

    def resident_step(state, index_batch, tables):
      host = resident_lib.gather_rows(tables, index_batch['record_index'], mesh)
      return step(state, {**host, 'positions': index_batch['positions']})

    jitted = jax.jit(
        resident_step,
        in_shardings=(state_shardings, batch_sharding, table_shardings),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,),
    )
  else:
    abstract_tables = None
    shapes = layout.host_shapes(config.data.batch_size)
    jitted = jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,),
    )
  abstract_batch = batch_lib.abstract_of(shapes, batch_sharding)
  model_batch = jax.jit(
      functools.partial(masking_lib.model_batch, spec=masking),
      in_shardings=(batch_sharding,),
      out_shardings=batch_sharding,
  )
  return TrainStep(
      mesh=mesh,
      optimizer=optimizer,
      init_state=init_state,
      state_shardings=state_shardings,
      batch_sharding=batch_sharding,
      abstract_state=sharding.abstract_with_shardings(abstract_state, state_shardings),
      abstract_batch=abstract_batch,
      jitted=jitted,
      model_batch=model_batch,
      masking=masking,
      abstract_tables=abstract_tables,
  )
