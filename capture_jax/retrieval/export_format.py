"""The on-disk export format: sharded `.npz` rows and `metadata.json`, written and read back.

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
import zipfile
from typing import Any, Mapping

import numpy as np

from capture_jax import storage

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
  if not storage.is_file(path):  # raises on a read error: an error is not "no export"
    return None
  return json.loads(storage.read_text(path))


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
    'vocab_fingerprint',
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


# What a shard that is there but cannot be parsed raises (in a bucket, an error of the bucket is
# a StorageError instead: `storage.read_bytes`).
_UNREADABLE = (OSError, ValueError, KeyError, zipfile.BadZipFile)


def _read_shard(path: storage.Path, out_dir: storage.Path, dim: int) -> dict[str, np.ndarray]:
  """One shard's arrays (embeddings as float32 [n, dim]); errors name the file and the fix."""
  if not storage.is_file(path):
    raise FileNotFoundError(
        f'{path} is missing from the export in {out_dir}; run the export again to rewrite it'
    )
  try:
    # The whole shard is read (it is, below), then parsed: a bucket's read error is then a
    # StorageError (gcsfs's prefetching reader can hand np.load a short read after an error).
    data = storage.read_bytes(path) if storage.is_remote(path) else None
    with (
        io.BytesIO(data) if data is not None else path.open('rb') as f,
        np.load(f, allow_pickle=False) as z,
    ):
      arrays = {k: z[k] for k in z.files}
      emb = arrays['embeddings']
      arrays['item_id'], arrays['row']  # pylint: disable=pointless-statement
  except _UNREADABLE as e:
    raise ValueError(
        f'{path} cannot be read ({type(e).__name__}: {e}); delete it and run the export '
        'again to rewrite it'
    ) from None
  if emb.ndim != 2 or emb.shape[1] != dim:
    raise ValueError(
        f'{path}: embeddings of shape {emb.shape}, but {METADATA_FILE} says dimension {dim}'
    )
  arrays['embeddings'] = emb.astype(np.float32, copy=False)
  return arrays


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
  num_shards = int(meta['num_shards'])
  for s in range(num_shards):
    shard = _read_shard(out_dir / shard_name(s, num_shards), out_dir, dim)
    vectors.append(shard['embeddings'])
    ids += [str(x) for x in shard['item_id']]
    rows.append(shard['row'])
    if 'instance_label' in shard:
      labels += [str(x) for x in shard['instance_label']]
      indices.append(shard['instance_index'])
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
