"""Retrieval embeddings: the jitted sharded embedding step and the on-disk export format.

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

An export is one folder::

    metadata.json                  what was embedded, with what, and how it was cut
    shard-00000-of-00004.npz       rows [0, S), S = shard_rows
    shard-00001-of-00004.npz       rows [S, 2S) ...

Each shard holds `embeddings [n, D] float32`, `item_id [n] str`, `row [n]
int64` (the row's position in the split, or in the list of instance rows),
and for instance rows `instance_label [n] str` and `instance_index [n] int32`
(the instance's place in the sample's sidecar entry). Shards and metadata are
written to a temporary file and renamed, so a shard file that exists is
complete: an interrupted export resumes by computing only the missing shards.
`metadata.json` is written first with `complete: false` and the plan (which
identifies the export: model config, weights, kind, split, row count, shard
size) and rewritten with `complete: true` once every shard is there.

Reading an export refuses a shard that does not read (truncated, or a zip
CRC error from flipped bytes) and non-finite vectors, naming the shard or
the split and how many rows; two exports searched against each other must
come from the same weights, checkpoint save, model and data build
(`pair_diffs`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
import zipfile
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from capture_jax import batch as batch_lib
from capture_jax import storage
from capture_jax.losses import l2_normalize
from capture_jax.models import CaptureModel, layers
from capture_jax.training import sharding
from capture_jax.training import state as state_lib

EMBEDDING_KINDS = ('fused', 'text', 'visual', 'encoder')
EQUAL_TEXT_WEIGHT = 0.5  # `eval.encoder_text_weight` of the plain `encoder` rows
ROW_KINDS = ('samples', 'instances')  # one row per sample, or one per product instance
METADATA_FILE = 'metadata.json'
FORMAT_VERSION = 1
# Metadata fields that must agree for existing shards to be reused.
IDENTITY_FIELDS = (
    'format_version',
    'split',
    'rows',
    'kind',
    'text_weight',  # eval.encoder_text_weight when not the equal one (None in older exports)
    'dimension',
    'weights',
    'checkpoint_step',
    'checkpoint_id',  # which save of that step (two runs, or a step saved again, differ)
    'seed',
    'model',
    'inputs',  # what was embedded: the built split's files, vocab, sidecar, input sizes
    'count',
    'proposer',
    'instances_sha256',  # the instance rows' regions (None for sample rows and older exports)
    'shard_rows',
    'num_shards',
)


# --------------------------------------------------------------------------
# The embedding step.


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


# --------------------------------------------------------------------------
# The export folder.


def shard_name(index: int, num_shards: int) -> str:
  return f'shard-{index:05d}-of-{num_shards:05d}.npz'


def write_shard(path: storage.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
  """One `.npz` shard, atomically (never a partial file under `path`, on disk or in a bucket)."""
  buffer = io.BytesIO()
  np.savez(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
  storage.write_bytes(path, buffer.getvalue())


def write_metadata(out_dir: storage.PathLike, metadata: Mapping[str, Any]) -> None:
  text = json.dumps(dict(metadata), indent=2, ensure_ascii=False, sort_keys=True) + '\n'
  storage.write_text(storage.as_path(out_dir) / METADATA_FILE, text)


def read_metadata(out_dir: storage.PathLike) -> dict[str, Any] | None:
  """The folder's metadata, or None when it has none."""
  path = storage.as_path(out_dir) / METADATA_FILE
  if not path.is_file():
    return None
  return json.loads(path.read_text(encoding='utf-8'))


def identity_diffs(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
  """Readable differences between the identities of two metadata dicts."""
  diffs = []
  for k in IDENTITY_FIELDS:
    if a.get(k) != b.get(k):
      if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
        keys = sorted(set(a[k]) | set(b[k]))
        diffs += [
            f'{k}.{kk}: {a[k].get(kk)!r} vs {b[k].get(kk)!r}'
            for kk in keys
            if a[k].get(kk) != b[k].get(kk)
        ]
      else:
        diffs.append(f'{k}: {a.get(k)!r} vs {b.get(k)!r}')
  return diffs


# Fields two exports searched against each other must share (the split-specific
# `inputs` fields, its files and sidecar, naturally differ).
PAIR_FIELDS = ('weights', 'checkpoint_step', 'checkpoint_id', 'seed', 'model', 'text_weight')
PAIR_INPUT_FIELDS = (
    'max_text_len',
    'max_regions',
    'storage_dtype',
    'vocab_sha256',
    'dataset_info_sha256',
)


def pair_diffs(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
  """Why two exports' vectors are not comparable (other weights, save, model or data build)."""
  keep = lambda m: {
      **{k: m.get(k) for k in PAIR_FIELDS},
      'inputs': {k: (m.get('inputs') or {}).get(k) for k in PAIR_INPUT_FIELDS},
  }
  ka, kb = keep(a), keep(b)
  diffs = []
  for k in ka:
    if isinstance(ka[k], dict) and isinstance(kb[k], dict):
      diffs += [
          f'{k}.{kk}: {ka[k].get(kk)!r} vs {kb[k].get(kk)!r}'
          for kk in sorted(set(ka[k]) | set(kb[k]))
          if ka[k].get(kk) != kb[k].get(kk)
      ]
    elif ka[k] != kb[k]:
      diffs.append(f'{k}: {ka[k]!r} vs {kb[k]!r}')
  return diffs


@dataclasses.dataclass
class Embeddings:
  """An export read back: `vectors [N, D]` float32 with per-row ids, in row order."""

  vectors: np.ndarray
  item_id: list[str]
  row: np.ndarray
  instance_label: list[str] | None
  instance_index: np.ndarray | None
  metadata: dict[str, Any]
  path: storage.Path

  @property
  def dimension(self) -> int:
    return int(self.vectors.shape[1])

  @property
  def kind(self) -> str:
    return self.metadata['kind']

  def __len__(self) -> int:
    return int(self.vectors.shape[0])


def read_embeddings(out_dir: storage.PathLike) -> Embeddings:
  """Reads a complete export; raises ValueError/FileNotFoundError saying what is wrong with it."""
  out_dir = storage.as_path(out_dir)
  meta = read_metadata(out_dir)
  if meta is None:
    raise FileNotFoundError(
        f'{out_dir} holds no exported embeddings ({METADATA_FILE} is missing); '
        'run `python -m capture_jax.export` first'
    )
  if not meta.get('complete'):
    raise ValueError(
        f'the export in {out_dir} is incomplete; run the same export command again to finish it'
    )
  dim, count = int(meta['dimension']), int(meta['count'])
  vectors, ids, rows, labels, indices = [], [], [], [], []
  for s in range(int(meta['num_shards'])):
    path = out_dir / shard_name(s, int(meta['num_shards']))
    if not path.is_file():
      raise FileNotFoundError(
          f'{path} is missing from the export in {out_dir}; run the export again to rewrite it'
      )
    try:
      with path.open('rb') as f, np.load(f, allow_pickle=False) as z:
        emb = z['embeddings']
        shard_ids = [str(x) for x in z['item_id']]
        shard_rows = z['row']
        if 'instance_label' in z:
          labels += [str(x) for x in z['instance_label']]
          indices.append(z['instance_index'])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
      raise ValueError(
          f'{path} cannot be read ({type(e).__name__}: {e}); delete it and run the export '
          'again to rewrite it'
      ) from None
    if emb.ndim != 2 or emb.shape[1] != dim:
      raise ValueError(
          f'{path}: embeddings of shape {emb.shape}, but {METADATA_FILE} says dimension {dim}'
      )
    vectors.append(emb.astype(np.float32, copy=False))
    ids += shard_ids
    rows.append(shard_rows)
  vectors = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)
  if len(vectors) != count:
    raise ValueError(
        f'the export in {out_dir} has {len(vectors)} rows, but {METADATA_FILE} says {count}'
    )
  bad = int(np.count_nonzero(~np.isfinite(vectors).all(axis=1))) if len(vectors) else 0
  if bad:
    raise ValueError(
        f'the export in {out_dir} (split {meta.get("split")!r}, {meta.get("rows")}) has {bad} of '
        f'{count} rows with non-finite (NaN or inf) embeddings; its weights are not usable'
    )
  instances = meta.get('rows') == 'instances'
  return Embeddings(
      vectors,
      ids,
      np.concatenate(rows) if rows else np.zeros(0, np.int64),
      labels if instances else None,
      (np.concatenate(indices) if indices else np.zeros(0, np.int32)) if instances else None,
      meta,
      out_dir,
  )
