"""What identifies an export, and what an output folder holds already: complete, reusable, stale.

An export's identity (`export_format.IDENTITY_FIELDS`) is what was embedded,
with what, and how it was cut: the split and its rows, the embedding kind,
the weights (checkpoint step and save, or the random initialisation's seed),
the model config, a fingerprint of the inputs (`inputs_fingerprint`: the
built split's files, the vocab, the sidecar, the input sizes), the instance
rows' regions, and the shard size. Two exports with one identity hold the
same vectors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import zipfile
from pathlib import Path
from typing import Any

import ml_collections

from capture_jax import storage
from capture_jax.data import eval_input
from capture_jax.data import product1m_tfds
from capture_jax.data import tokenizer as tokenizer_lib
from capture_jax.retrieval import embedding as embedding_lib
from capture_jax.retrieval import export_format
from capture_jax.training import distributed


def _sha256_file(path: str | Path) -> str | None:
  if not path or not os.path.isfile(path):
    return None
  with open(path, 'rb') as f:
    return hashlib.file_digest(f, 'sha256').hexdigest()


def inputs_fingerprint(config: ml_collections.ConfigDict, split: str, rows: str) -> dict[str, Any]:
  """What an export embedded, besides the model: the fields that change its rows or vectors.

  The built split is identified by its ArrayRecord files' names, sizes and
  modification times (a rebuild rewrites them) and the hash of the build's
  `dataset_info.json`; hashing the files themselves would read the whole
  dataset (hundreds of GB of features at full scale) on every evaluation.
  The vocab is identified by `tokenizer.vocab_fingerprint` (its tokens in id
  order: the fingerprint a checkpoint and a built dataset record too); the
  instance sidecar is small: its SHA-256 is used.
  """
  d = config.data
  classes = config.model.mrm_target == 'class'
  built = Path(product1m_tfds.dataset_dir(d.tfds_dir, d.storage_dtype, classes))
  files = sorted(built.glob(f'*-{split}.array_record-*')) if built.is_dir() else []
  listing = '\n'.join(f'{p.name} {p.stat().st_size} {p.stat().st_mtime_ns}' for p in files)
  return {
      'max_text_len': d.max_text_len,
      'max_regions': d.max_regions,
      'storage_dtype': d.storage_dtype,
      'vocab_fingerprint': (
          tokenizer_lib.vocab_fingerprint(d.vocab_file) if os.path.isfile(d.vocab_file) else None
      ),
      'dataset_info_sha256': _sha256_file(built / 'dataset_info.json'),
      'split_files': hashlib.sha256(listing.encode()).hexdigest(),
      'sidecar_sha256': (
          _sha256_file(eval_input.sidecar_path(config, split)) if rows == 'instances' else None
      ),
  }


def instances_fingerprint(rows: eval_input.EvalRows) -> str | None:
  """SHA-256 of the instance rows' (item id, regions), None for sample rows: an export of
  instances grouped otherwise (a proposer's thresholds changed) is another export."""
  if rows.kind != 'instances':
    return None
  text = '\n'.join(f'{i} {" ".join(map(str, r))}' for i, r in zip(rows.item_id, rows.regions))
  return hashlib.sha256(text.encode()).hexdigest()


def shard_readable(path: storage.PathLike) -> bool:
  """Whether a shard file is there and opens as a whole `.npz` (a truncated zip has no central
  directory). Bytes flipped inside are caught by the zip CRC when the export is read."""
  path = storage.as_path(path)
  if storage.is_remote(path):
    # An object is uploaded whole (never a part of a shard), so one that is there is whole; a
    # read error raises (gcsfs's prefetching reader can hand zipfile a short read after an
    # error, which read as "not a shard": written again).
    return storage.is_file(path)
  try:
    with path.open('rb') as f, zipfile.ZipFile(f) as z:
      return 'embeddings.npy' in z.namelist()
  except (OSError, zipfile.BadZipFile):
    return False


@dataclasses.dataclass(frozen=True)
class ExportIdentity:
  """The identity of one export (`fields`, as its `metadata.json` records it)."""

  fields: dict[str, Any]

  @classmethod
  def of_rows(
      cls,
      config: ml_collections.ConfigDict,
      rows: eval_input.EvalRows,
      kind: str,
      checkpoint_step: int | None,
      checkpoint_id: str | None = None,
  ) -> ExportIdentity:
    """The identity of embedding `rows` as `kind` with a checkpoint's weights (`checkpoint_step`,
    and `checkpoint.checkpoint_fingerprint` of its save, which tells two saves of one step apart)
    or, with `checkpoint_step` None, the random initialisation."""
    b = config.data.eval_batch_size
    shard_rows = math.ceil(config.eval.shard_size / b) * b  # whole batches per shard
    count = len(rows)
    return cls(
        {
            'format_version': export_format.FORMAT_VERSION,
            'split': rows.split,
            'rows': rows.kind,
            'kind': kind,
            'text_weight': embedding_lib.text_weight(config, kind),
            'dimension': embedding_lib.embedding_dim(config.model, kind),
            'weights': 'random_init' if checkpoint_step is None else 'checkpoint',
            'checkpoint_step': checkpoint_step,
            'checkpoint_id': checkpoint_id,
            'seed': config.seed if checkpoint_step is None else None,
            'model': config.model.to_dict(),
            'inputs': inputs_fingerprint(config, rows.split, rows.kind),
            'count': count,
            'proposer': rows.proposer or None,  # None for sample rows
            'instances_sha256': instances_fingerprint(rows),
            'shard_rows': shard_rows,
            'num_shards': math.ceil(count / shard_rows),
        }
    )

  @property
  def num_shards(self) -> int:
    return self.fields['num_shards']

  @property
  def shard_rows(self) -> int:
    return self.fields['shard_rows']

  def completed(self, out_dir: storage.PathLike) -> dict[str, Any] | None:
    """The metadata of a complete export of this identity in `out_dir`, else None.

    How the rows were cut into shards does not matter once every shard is there.
    """
    meta = export_format.read_metadata(out_dir)
    if meta is None or not meta.get('complete'):
      return None
    ignore = {'shard_rows', 'num_shards'}
    fields = (k for k in export_format.IDENTITY_FIELDS if k not in ignore)
    if any(meta.get(k) != self.fields.get(k) for k in fields):
      return None
    shards = int(meta['num_shards'])
    out_dir = storage.as_path(out_dir)
    names = (export_format.shard_name(s, shards) for s in range(shards))
    return meta if all(shard_readable(out_dir / n) for n in names) else None

  def stale(self, out_dir: storage.PathLike) -> bool:
    """Whether `out_dir` holds an export of another identity (it is replaced)."""
    existing = export_format.read_metadata(out_dir)
    return existing is not None and bool(export_format.identity_diffs(existing, self.fields))

  def reusable(
      self, out_dir: storage.Path, overwrite: bool, replace_other: bool = False
  ) -> dict[str, Any] | None:
    """What to do with `out_dir` before embedding into it, decided before anything compiles.

    Returns the metadata of a complete export of this identity (nothing to
    compute), or None (compute the missing shards, or all when the folder is
    to be replaced). A folder holding another export is replaced with
    `overwrite` or `replace_other` (the default folder of this checkpoint,
    split and kind: ours, so what differs is the data or the checkpoint save,
    and the old vectors are stale), saying what differs; otherwise it is a
    ValueError naming the differences.
    """
    existing = export_format.read_metadata(out_dir)
    if existing is None or overwrite:
      return None
    done = self.completed(out_dir)
    if done is not None:
      return done
    diffs = export_format.identity_diffs(existing, self.fields)
    if diffs and not replace_other:
      raise ValueError(
          f'{out_dir} holds another export ({"; ".join(diffs)}; existing vs requested); '
          'pass --overwrite to replace it, or another --out'
      )
    if diffs and distributed.is_main_process():
      print(
          f'{out_dir} holds an export of something else ({"; ".join(diffs)}; existing vs now): '
          'exporting again',
          flush=True,
      )
    return None
