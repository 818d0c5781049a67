"""On-disk formats of Product1M and of bottom-up-attention region features.

Everything that reads or writes the dataset goes through this module, so the
synthetic world, the TFDS builder and the baselines agree byte for byte with
what the real dataset and real feature extractors contain.

Annotation files (one sample per line, five fields)::

    item_id#####title#####image_url#####image_url_mirror#####label_1#;#label_2

Region features, per image: `features [N, F]`, `boxes [N, 4]` (x1, y1, x2, y2
in pixels), `image_w`, `image_h`, `num_boxes`, optionally `cls_prob [N, C]`;
stored either as one `.npz` per image or as rows of a base64 TSV
(`image_id, image_w, image_h, num_boxes, boxes, features`).

Bad input raises `BadInputError` naming the file and line or image id and
what was expected. Callers that prefer to skip bad samples pass a
`BadInputCounter` and count instead (the `skip_bad` mode).

Text files (annotations, instance sidecars, feature TSVs) are read as bytes
and decoded line by line (`decode_line`), so a byte that is not valid UTF-8
(ASCII for TSVs) is an error naming the file, line and column, not a bare
`UnicodeDecodeError`; a UTF-8 byte-order mark at the start of a file is
dropped (editors on Windows write one); blank (whitespace-only) lines are
skipped wherever they are. `read_annotations` is the one annotation reader:
the TFDS build, the tokenizer, the evaluator and the metrics tool all use it.
"""

from __future__ import annotations

import base64
import codecs
import collections
import dataclasses
import io
import json
import os
from typing import IO, Iterable, Iterator, Mapping, Sequence
import zipfile
import zlib

import numpy as np

from capture_jax import storage

FIELD_SEP = '#####'
LABEL_SEP = '#;#'
SPLITS = ('train', 'gallery', 'dev', 'test')
LABELLED_SPLITS = ('gallery', 'dev', 'test')
QUERY_SPLITS = ('dev', 'test')
TSV_FIELDS = ('image_id', 'image_w', 'image_h', 'num_boxes', 'boxes', 'features')
# Location of the global visual token: the whole image.
GLOBAL_LOC = (0.0, 0.0, 1.0, 1.0, 1.0)
# Boxes may overshoot the image by this many pixels (rounding in extractors
# that clip to [0, W - 1] or [0, W]); larger overshoots are errors.
BOX_TOLERANCE_PX = 1.0


def annotation_filename(split: str) -> str:
  """Official file name of a split, e.g. `product1m_dev_ossurl_v2.txt`."""
  if split not in SPLITS:
    raise ValueError(f'unknown split {split!r}; expected one of {SPLITS}')
  return f'product1m_{split}_ossurl_v2.txt'


def instances_filename(split: str) -> str:
  """Sidecar mapping item_id -> instances (label, region indices) of a split."""
  return f'instances_{split}.jsonl'


class BadInputError(ValueError):
  """Malformed input; the message names the file and line or image id."""

  def __init__(self, kind: str, message: str):
    super().__init__(message)
    self.kind = kind


@dataclasses.dataclass
class BadInputCounter:
  """Decides what happens to bad samples, and counts them.

  With `skip_bad=False` (the default) the first bad sample raises its
  `BadInputError`; with `skip_bad=True` bad samples are skipped and counted
  by kind, and `summary()` reports them at the end. `truncated` counts images
  with more regions than the maximum in both modes: they are kept, truncated
  to the first `max_regions` (the detector's most confident), so they are not
  bad, but nothing is silently changed either.
  """

  skip_bad: bool = False
  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  examples: dict = dataclasses.field(default_factory=dict)
  truncated: int = 0

  def handle(self, err: BadInputError) -> None:
    """Raises `err`, or counts it in skip_bad mode."""
    if not self.skip_bad:
      raise err
    self.counts[err.kind] += 1
    self.examples.setdefault(err.kind, str(err))

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def summary(self) -> str:
    """One line per kind with its count and the first message seen."""
    lines = [
        f'skipped {self.total} bad sample(s); {self.truncated} image(s) '
        'had more regions than the maximum and were truncated'
    ]
    for kind, n in sorted(self.counts.items()):
      lines.append(f'  {kind}: {n} (first: {self.examples[kind]})')
    return '\n'.join(lines)

  def as_dict(self) -> dict:
    return {'skipped': self.total, 'by_kind': dict(self.counts), 'truncated': self.truncated}


def decode_line(raw: bytes, *, path: str, lineno: int, encoding: str = 'utf-8') -> str:
  """Decodes one line of a text file read as bytes.

  Args:
    raw: the line as read (newline included or not).
    path, lineno: where it came from, for the error message.
    encoding: 'utf-8' for annotations, 'ascii' for feature TSVs.
  Returns:
    The text; on line 1 a UTF-8 byte-order mark is dropped (it would
    otherwise become part of the first item id).
  Raises:
    BadInputError('bad_encoding'): naming the file, line, column and byte.
  """
  if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
    raw = raw[len(codecs.BOM_UTF8) :]
  try:
    return raw.decode(encoding)
  except UnicodeDecodeError as err:
    raise BadInputError(
        'bad_encoding',
        f'{path}:{lineno}: byte 0x{raw[err.start]:02x} at column {err.start + 1} is not valid '
        f'{encoding}; expected {encoding} text',
    ) from None


# --------------------------------------------------------------------------
# Annotation files.


@dataclasses.dataclass(frozen=True)
class Annotation:
  """One line of an annotation file. `labels` keeps duplicates, in order."""

  item_id: str
  title: str
  url: str = ''
  url_mirror: str = ''
  labels: tuple[str, ...] = ()


def parse_annotation_line(
    line: str, *, path: str = '<string>', lineno: int = 0, require_labels: bool = False
) -> Annotation:
  """Parses one annotation line; raises `BadInputError` naming path:lineno."""
  where = f'{path}:{lineno}'
  line = line.rstrip('\r\n')
  fields = line.split(FIELD_SEP)
  if len(fields) != 5:
    raise BadInputError(
        'malformed_line',
        f'{where}: expected 5 fields separated by {FIELD_SEP!r} '
        f'(item_id, title, url, url, labels), found {len(fields)}: {line[:120]!r}',
    )
  item_id, title, url, url_mirror, label_field = (f.strip() for f in fields)
  # Not printable: a control character, or a byte-order mark in the middle of
  # a file (two files concatenated), which would silently change the id.
  if not item_id or not item_id.isprintable() or any(c.isspace() for c in item_id):
    raise BadInputError(
        'malformed_line',
        f'{where}: empty, blank-containing or unprintable item_id {item_id!r}',
    )
  if not title:
    raise BadInputError('empty_title', f'{where}: item {item_id} has an empty title')
  labels = tuple(l.strip() for l in label_field.split(LABEL_SEP)) if label_field else ()
  if any(not l for l in labels):
    raise BadInputError(
        'malformed_line', f'{where}: item {item_id} has an empty label in {label_field!r}'
    )
  if require_labels and not labels:
    raise BadInputError(
        'missing_labels',
        f'{where}: item {item_id} has no label (expected at least '
        f'one label joined by {LABEL_SEP!r} in field 5)',
    )
  return Annotation(item_id, title, url, url_mirror, labels)


def read_annotations(
    path: str,
    *,
    require_labels: bool | None = None,
    counter: BadInputCounter | None = None,
) -> Iterator[tuple[int, Annotation]]:
  """Streams `(line_number, Annotation)` pairs of an annotation file.

  Args:
    path: annotation file.
    require_labels: every line must carry a label; default: True for the
      official gallery/dev/test file names.
    counter: decides whether bad lines raise (default) or are skipped and
      counted (`BadInputCounter(skip_bad=True)`).

  The one annotation reader of the code base (build, tokenizer, evaluator,
  metrics tool), so they all accept and refuse the same files:

  * a UTF-8 byte-order mark at the start of the file is dropped;
  * blank (whitespace-only) lines are skipped wherever they are, a trailing
    one included: they carry no sample, and line numbers stay those of the
    file;
  * a line that is not valid UTF-8 is a `bad_encoding` error naming the file,
    line and column (skipped and counted with `skip_bad`);
  * a repeated item_id is an error (the evaluator looks ids up in a dict, so
    a duplicate would silently shadow a sample).
  """
  if require_labels is None:
    require_labels = any(os.path.basename(path) == annotation_filename(s) for s in LABELLED_SPLITS)
  seen: set[str] = set()
  with storage.open_input(path) as f:
    for lineno, raw in enumerate(f, start=1):
      try:
        line = decode_line(raw, path=path, lineno=lineno)
        if not line.strip():
          continue
        ann = parse_annotation_line(line, path=path, lineno=lineno, require_labels=require_labels)
        if ann.item_id in seen:
          raise BadInputError(
              'duplicate_id', f'{path}:{lineno}: item_id {ann.item_id} appears twice'
          )
      except BadInputError as err:
        (counter or BadInputCounter()).handle(err)
        continue
      seen.add(ann.item_id)
      yield lineno, ann


def format_annotation(ann: Annotation) -> str:
  """The line (without newline) the official files hold for `ann`."""
  for field in (ann.item_id, ann.title, ann.url, ann.url_mirror, *ann.labels):
    if FIELD_SEP in field or '\n' in field:
      raise ValueError(f'item {ann.item_id}: field {field!r} contains a separator')
  for label in ann.labels:
    if LABEL_SEP in label:
      raise ValueError(f'item {ann.item_id}: label {label!r} contains {LABEL_SEP!r}')
  return FIELD_SEP.join(
      (ann.item_id, ann.title, ann.url, ann.url_mirror, LABEL_SEP.join(ann.labels))
  )


def write_annotations(path: str, anns: Iterable[Annotation]) -> int:
  """Writes annotations (streaming); returns the number of lines written."""
  n = 0
  with open(path, 'w', encoding='utf-8') as f:
    for ann in anns:
      f.write(format_annotation(ann) + '\n')
      n += 1
  return n


# --------------------------------------------------------------------------
# Region features.


@dataclasses.dataclass
class RegionFeatures:
  """Detector output of one image.

  Attributes:
    image_id: the item id the regions belong to.
    image_w, image_h: image size in pixels.
    boxes: [N, 4] float32, (x1, y1, x2, y2) in pixels.
    features: [N, F] float (float32 as written by extractors; float16 allowed
      in storage).
    cls_prob: optional [N, C] detector class distribution.
  """

  image_id: str
  image_w: int
  image_h: int
  boxes: np.ndarray
  features: np.ndarray
  cls_prob: np.ndarray | None = None

  @property
  def num_boxes(self) -> int:
    return int(self.boxes.shape[0])


def encode_boxes(
    boxes: np.ndarray, image_w: np.ndarray | float, image_h: np.ndarray | float
) -> np.ndarray:
  """Box encoding of the reference: `[x1/W, y1/H, x2/W, y2/H, area/(W*H)]`.

  Args:
    boxes: [..., 4] pixel boxes (x1, y1, x2, y2).
    image_w, image_h: scalars, or arrays broadcastable to `boxes[..., 0]`.
  Returns:
    [..., 5] float32.
  """
  boxes = np.asarray(boxes, np.float32)
  w = np.asarray(image_w, np.float32)[..., None]
  h = np.asarray(image_h, np.float32)[..., None]
  x1, y1, x2, y2 = (boxes[..., i] for i in range(4))
  area = (x2 - x1) * (y2 - y1) / (w[..., 0] * h[..., 0])
  return np.stack(
      [x1 / w[..., 0], y1 / h[..., 0], x2 / w[..., 0], y2 / h[..., 0], area], axis=-1
  ).astype(np.float32)


def add_global_token(
    feat: np.ndarray, loc: np.ndarray, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Prepends the global visual token to padded regions.

  The global feature is the mean of the *valid* region features as given
  (callers pass features after MRM masking, as the reference does), its
  location the whole image `[0, 0, 1, 1, 1]`, its mask 1.

  Args:
    feat: [..., R, F] region features, zero at padding.
    loc: [..., R, 5] box encodings.
    mask: [..., R] 1 for valid regions.
  Returns:
    feat [..., R+1, F] float32, loc [..., R+1, 5] float32, mask [..., R+1] int32.
  """
  lead, r = mask.shape[:-1], mask.shape[-1]
  m = mask.astype(np.float32)
  count = np.maximum(m.sum(axis=-1), 1.0)[..., None]  # [..., 1]
  out_feat = np.empty(lead + (r + 1, feat.shape[-1]), np.float32)
  out_feat[..., 1:, :] = feat
  out_feat[..., 0, :] = (m[..., None, :] @ feat)[..., 0, :] / count
  out_loc = np.empty(lead + (r + 1, 5), np.float32)
  out_loc[..., 1:, :] = loc
  out_loc[..., 0, :] = GLOBAL_LOC
  out_mask = np.empty(lead + (r + 1,), np.int32)
  out_mask[..., 1:] = mask
  out_mask[..., 0] = 1
  return out_feat, out_loc, out_mask


def validate_regions(
    rf: RegionFeatures, *, feature_dim: int | None, max_regions: int, source: str
) -> tuple[RegionFeatures, bool]:
  """Checks one image's regions and truncates to `max_regions`.

  Args:
    rf: the regions as read.
    feature_dim: expected feature width (None: any width).
    max_regions: keep at most this many regions (the first ones: extractors
      write them by decreasing detector confidence).
    source: where `rf` came from, for error messages (file and id).
  Returns:
    (validated regions, whether they were truncated).
  Raises:
    BadInputError: wrong width, NaN/inf, zero-area or out-of-image boxes,
      non-positive image size, no regions, inconsistent array shapes.
  """
  where = f'{source}: image {rf.image_id}'
  feats, boxes = np.asarray(rf.features), np.asarray(rf.boxes)
  if feats.ndim != 2:
    raise BadInputError(
        'bad_shape',
        f'{where}: features have shape {feats.shape}, expected [num_boxes, feature_dim]',
    )
  if feature_dim is not None and feats.shape[1] != feature_dim:
    raise BadInputError(
        'wrong_width', f'{where}: features have width {feats.shape[1]}, expected {feature_dim}'
    )
  if boxes.ndim != 2 or boxes.shape[1] != 4 or boxes.shape[0] != feats.shape[0]:
    raise BadInputError(
        'bad_shape',
        f'{where}: boxes have shape {boxes.shape}, '
        f'expected [{feats.shape[0]}, 4] to match the features',
    )
  if feats.shape[0] == 0:
    raise BadInputError('no_regions', f'{where}: has no regions, expected at least 1')
  if not (rf.image_w > 0 and rf.image_h > 0):
    raise BadInputError(
        'bad_image_size',
        f'{where}: image size {rf.image_w}x{rf.image_h}, expected positive width and height',
    )
  if not np.isfinite(feats).all():
    bad = int((~np.isfinite(feats)).any(axis=1).argmax())
    raise BadInputError(
        'nonfinite_features',
        f'{where}: features contain NaN or inf (first in region {bad}), expected finite values',
    )
  if not np.isfinite(boxes).all():
    raise BadInputError('nonfinite_boxes', f'{where}: boxes contain NaN or inf')
  x1, y1, x2, y2 = boxes.T
  flat = (x2 <= x1) | (y2 <= y1)
  if flat.any():
    i = int(flat.argmax())
    raise BadInputError(
        'zero_area_box',
        f'{where}: box {i} {boxes[i].tolist()} has zero '
        'or negative area, expected x2 > x1 and y2 > y1',
    )
  tol = BOX_TOLERANCE_PX
  outside = (x1 < -tol) | (y1 < -tol) | (x2 > rf.image_w + tol) | (y2 > rf.image_h + tol)
  if outside.any():
    i = int(outside.argmax())
    raise BadInputError(
        'box_outside_image',
        f'{where}: box {i} {boxes[i].tolist()} lies outside the {rf.image_w}x{rf.image_h} image',
    )
  truncated = feats.shape[0] > max_regions
  boxes = np.clip(
      boxes[:max_regions].astype(np.float32), 0.0, [rf.image_w, rf.image_h, rf.image_w, rf.image_h]
  )
  cls_prob = None if rf.cls_prob is None else np.asarray(rf.cls_prob)[:max_regions]
  return (
      RegionFeatures(
          rf.image_id, int(rf.image_w), int(rf.image_h), boxes, feats[:max_regions], cls_prob
      ),
      truncated,
  )


# npz: key aliases written by common bottom-up-attention extractors
# (`x`/`bbox`/`num_bbox` by the detectron2 port).
_NPZ_ALIASES = {
    'features': ('features', 'x'),
    'boxes': ('boxes', 'bbox'),
    'num_boxes': ('num_boxes', 'num_bbox'),
}


def _npz_get(data: Mapping[str, np.ndarray], key: str, path: str) -> np.ndarray:
  for name in _NPZ_ALIASES.get(key, (key,)):
    if name in data:
      return data[name]
  raise BadInputError(
      'malformed_features', f'{path}: missing array {key!r} (have {sorted(data.keys())})'
  )


# What numpy and zipfile raise on a truncated or corrupted npz: a missing
# zip directory (BadZipFile), an empty file (EOFError), a bad CRC
# (BadZipFile), a damaged deflate stream (zlib.error), a bad array header
# (ValueError), an array of the wrong kind (TypeError), an unreadable file
# (OSError).
_NPZ_ERRORS = (OSError, ValueError, TypeError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


def read_npz(path: str, image_id: str | None = None) -> RegionFeatures:
  """Reads one image's `.npz` (image id = file stem unless given).

  Raises:
    BadInputError: `malformed_features` naming the file and image id when the
      file is truncated or corrupted or lacks an array.
  """
  image_id = image_id or os.path.splitext(os.path.basename(path))[0]
  try:
    # Every array is read inside the try: np.load is lazy, and a corrupted
    # member only fails when it is decompressed. In a bucket: the object's bytes, one request.
    data = np.load(
        io.BytesIO(storage.read_bytes(path)) if storage.is_remote(path) else path,
        allow_pickle=False,
    )
    if not isinstance(data, np.lib.npyio.NpzFile):
      raise BadInputError(
          'malformed_features',
          f'{path}: image {image_id}: holds one bare array, expected an npz archive',
      )
    with data:
      feats = np.asarray(_npz_get(data, 'features', path))
      boxes = np.asarray(_npz_get(data, 'boxes', path))
      num = int(_npz_get(data, 'num_boxes', path))
      w, h = int(_npz_get(data, 'image_w', path)), int(_npz_get(data, 'image_h', path))
      cls_prob = np.asarray(data['cls_prob']) if 'cls_prob' in data else None
  except BadInputError:
    raise
  except _NPZ_ERRORS as err:
    raise BadInputError(
        'malformed_features',
        f'{path}: image {image_id}: cannot read npz, truncated or corrupted? '
        f'({type(err).__name__}: {err})',
    ) from err
  if num != feats.shape[0]:
    raise BadInputError(
        'bad_shape',
        f'{path}: image {image_id} has num_boxes={num} but {feats.shape[0]} feature rows',
    )
  return RegionFeatures(image_id, w, h, boxes.reshape(-1, 4), feats, cls_prob)


def write_npz(path: str, rf: RegionFeatures) -> None:
  """Writes one image as the bottom-up-attention npz (float32 features)."""
  arrays = dict(
      features=np.asarray(rf.features, np.float32),
      boxes=np.asarray(rf.boxes, np.float32),
      image_w=np.int64(rf.image_w),
      image_h=np.int64(rf.image_h),
      num_boxes=np.int64(rf.num_boxes),
  )
  if rf.cls_prob is not None:
    arrays['cls_prob'] = np.asarray(rf.cls_prob, np.float32)
  with open(path, 'wb') as f:  # np.savez would append '.npz' to a bare name
    np.savez(f, **arrays)


def format_tsv_row(rf: RegionFeatures) -> str:
  """One TSV line (without newline): boxes and features as base64 float32."""
  b64 = lambda a: base64.b64encode(np.ascontiguousarray(a, np.float32).tobytes()).decode('ascii')
  return '\t'.join(
      (
          rf.image_id,
          str(int(rf.image_w)),
          str(int(rf.image_h)),
          str(rf.num_boxes),
          b64(rf.boxes),
          b64(rf.features),
      )
  )


def parse_tsv_row(line: str, *, path: str = '<string>', lineno: int = 0) -> RegionFeatures:
  """Parses one base64 TSV row; the feature width is inferred from num_boxes."""
  where = f'{path}:{lineno}'
  cols = line.rstrip('\r\n').split('\t')
  if len(cols) != len(TSV_FIELDS):
    raise BadInputError(
        'malformed_features',
        f'{where}: expected {len(TSV_FIELDS)} tab-separated columns {TSV_FIELDS}, found {len(cols)}',
    )
  image_id = cols[0]
  try:
    w, h, n = int(float(cols[1])), int(float(cols[2])), int(cols[3])
    # validate=True: a corrupted character is an error, not silently dropped
    # (which would shift every later float by a few bytes).
    boxes = np.frombuffer(base64.b64decode(cols[4], validate=True), np.float32)
    feats = np.frombuffer(base64.b64decode(cols[5], validate=True), np.float32)
  except ValueError as err:  # includes binascii.Error
    raise BadInputError(
        'malformed_features', f'{where}: image {image_id}: cannot decode row: {err}'
    ) from err
  if n <= 0:
    raise BadInputError(
        'no_regions', f'{where}: image {image_id} has num_boxes={n}, expected at least 1'
    )
  if boxes.size != 4 * n or feats.size % n:
    raise BadInputError(
        'bad_shape',
        f'{where}: image {image_id}: num_boxes={n} does not '
        f'match {boxes.size} box values and {feats.size} feature values',
    )
  return RegionFeatures(image_id, w, h, boxes.reshape(n, 4), feats.reshape(n, -1))


def iter_tsv(path: str) -> Iterator[tuple[int, RegionFeatures]]:
  """Streams `(line_number, RegionFeatures)` of a feature TSV (ASCII)."""
  with storage.open_input(path) as f:
    for lineno, raw in enumerate(f, start=1):
      line = decode_line(raw, path=path, lineno=lineno, encoding='ascii')
      if line.strip():
        yield lineno, parse_tsv_row(line, path=path, lineno=lineno)


def feature_files(path: str) -> tuple[list[str], list[str]]:
  """(TSVs, npz files) of a feature store `path`: a `.tsv` or `.npz` file, or a folder (local or
  `gs://`) searched recursively (hidden files and folders left out, as `glob` does)."""
  if not storage.exists(path):
    raise FileNotFoundError(f'feature store {path} does not exist')
  if storage.is_dir(path):
    found = [
        p
        for p in storage.find_inputs(path, ('.tsv', '.npz'))
        if not any(part.startswith('.') for part in p[len(path) :].split('/'))
    ]
    return [p for p in found if p.endswith('.tsv')], [p for p in found if p.endswith('.npz')]
  return ([path] if path.endswith('.tsv') else []), ([path] if path.endswith('.npz') else [])


@dataclasses.dataclass(frozen=True)
class TsvIndex:
  """Where each image's row is in a set of feature TSVs, sorted by id (numpy, tens of MB for a
  million images). Arrays [N]: `ids` (bytes), `file` (int32, into `files`), `offset`, `length`
  (bytes of the row, newline included) and `line` (int64)."""

  files: tuple[str, ...]
  ids: np.ndarray
  file: np.ndarray
  offset: np.ndarray
  length: np.ndarray
  line: np.ndarray

  def to_bytes(self) -> bytes:
    buf = io.BytesIO()
    fields = {k: getattr(self, k) for k in ('ids', 'offset', 'length', 'line')}
    # `file` is np.savez's own first argument: saved as `file_index`.
    np.savez(buf, files=np.array(self.files, dtype=str), file_index=self.file, **fields)
    return buf.getvalue()

  @classmethod
  def from_bytes(cls, data: bytes, where: str) -> 'TsvIndex':
    """Raises ValueError (damaged, or written by an older build without row lengths)."""
    try:
      with np.load(io.BytesIO(data), allow_pickle=False) as saved:
        return cls(
            tuple(str(p) for p in saved['files']),
            *(saved[k] for k in ('ids', 'file_index', 'offset', 'length', 'line')),
        )
    except _NPZ_ERRORS as err:
      raise ValueError(f'feature index {where} does not read back: {err}') from err


def index_tsv(path: str) -> TsvIndex:
  """The index of one TSV (rows in file order): one sequential read, no row decoded. The unit of
  the parallel index (one task per file, `merge_tsv_indexes` joins them)."""
  ids, offsets, lengths, lines = [], [], [], []
  offset = 0
  with storage.open_input(path) as f:
    for lineno, line in enumerate(f, start=1):
      # Line 1 may start with a byte-order mark, which `decode_line` drops.
      start = len(codecs.BOM_UTF8) if lineno == 1 and line.startswith(codecs.BOM_UTF8) else 0
      tab = line.find(b'\t')
      if tab > start:
        ids.append(line[start:tab])
        offsets.append(offset)
        lengths.append(len(line))
        lines.append(lineno)
      offset += len(line)
  n = len(ids)
  return TsvIndex(
      (path,),
      np.array(ids) if n else np.zeros(0, 'S1'),
      np.zeros(n, np.int32),
      np.array(offsets, np.int64),
      np.array(lengths, np.int64),
      np.array(lines, np.int64),
  )


def merge_tsv_indexes(parts: Sequence[TsvIndex]) -> TsvIndex:
  """One index over the files of `parts` (in that order), sorted by id (stable: on a repeated id
  the row of the earlier file and line wins, as a single scan of all files gives)."""
  files = tuple(f for p in parts for f in p.files)
  if not parts or not sum(len(p.ids) for p in parts):
    z64 = np.zeros(0, np.int64)
    return TsvIndex(files, np.zeros(0, 'S1'), np.zeros(0, np.int32), z64, z64, z64)
  base = np.cumsum([0] + [len(p.files) for p in parts])[:-1]
  ids = np.concatenate([p.ids for p in parts])
  order = np.argsort(ids, kind='stable')
  cat = lambda k: np.concatenate([getattr(p, k) for p in parts])[order]
  file = np.concatenate([p.file + b for p, b in zip(parts, base)]).astype(np.int32)[order]
  return TsvIndex(files, ids[order], file, cat('offset'), cat('length'), cat('line'))


class FeatureStore:
  """Random access to region features by image id, over TSVs or npz files, on disk or `gs://`.

  `path` is a `.tsv` file, an `.npz` file, or a folder holding either kind
  (searched recursively). TSVs are indexed once (`TsvIndex`: image id -> file,
  byte offset, row length and line), so a million images cost tens of MB, not
  a dict of Python objects per image; in a bucket each row is one range read
  of exactly its bytes. Errors name the TSV and its line.
  """

  def __init__(self, path: str, index: str | None = None):
    """`index`: a file written by `save_index` for this `path` (local or `gs://`), read instead of
    scanning the TSVs again (the parallel build indexes once, its workers load it)."""
    self.path = path
    tsvs, npzs = feature_files(path)
    if not tsvs and not npzs:
      raise FileNotFoundError(f'no .tsv or .npz region features under {path}')
    self._npz = {os.path.splitext(os.path.basename(p))[0]: p for p in npzs}
    if index is None:
      self.index = merge_tsv_indexes([index_tsv(p) for p in tsvs])
    else:
      self.index = TsvIndex.from_bytes(storage.read_bytes(index), index)
      if list(self.index.files) != tsvs:
        raise ValueError(f'feature index {index} was made for other TSVs than those of {path}')
    self._tsv_files = list(self.index.files)
    self._tsv_ids = self.index.ids
    self._handles: dict[int, IO[bytes]] = {}

  def save_index(self, index: str) -> None:
    """Writes the TSV index for `FeatureStore(path, index)` (local or `gs://`)."""
    storage.write_bytes(index, self.index.to_bytes())

  def _tsv_pos(self, image_id: str) -> int:
    key = image_id.encode()
    i = int(np.searchsorted(self._tsv_ids, key))
    return i if i < len(self._tsv_ids) and self._tsv_ids[i] == key else -1

  def __contains__(self, image_id: str) -> bool:
    return image_id in self._npz or self._tsv_pos(image_id) >= 0

  def __len__(self) -> int:
    return len(self._npz) + len(self._tsv_ids)

  def get(self, image_id: str) -> tuple[RegionFeatures, str]:
    """Returns (regions, source description) or raises BadInputError."""
    if image_id in self._npz:
      p = self._npz[image_id]
      return read_npz(p, image_id), p
    i = self._tsv_pos(image_id)
    if i < 0:
      raise BadInputError(
          'missing_features', f'image {image_id} has no region features in {self.path}'
      )
    fi, offset = int(self.index.file[i]), int(self.index.offset[i])
    path, lineno = self._tsv_files[fi], int(self.index.line[i])
    f = self._handles.get(fi)
    if f is None:
      # In a bucket: no read-ahead, each row one range request (rows are read in annotation
      # order, not file order).
      f = self._handles[fi] = storage.open_input(path, cache=False)
    f.seek(offset)
    raw = f.read(int(self.index.length[i]))
    line = decode_line(raw, path=path, lineno=lineno, encoding='ascii')
    return parse_tsv_row(line, path=path, lineno=lineno), f'{path}:{lineno}'

  def close(self) -> None:
    for f in self._handles.values():
      f.close()
    self._handles.clear()

  def __enter__(self) -> 'FeatureStore':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# --------------------------------------------------------------------------
# Instance sidecar: which regions of a sample belong to which product instance.


@dataclasses.dataclass(frozen=True)
class Instance:
  """One product instance of a sample: its label and its region indices."""

  label: str
  regions: tuple[int, ...]


def format_instances(item_id: str, instances: Sequence[Instance]) -> str:
  return json.dumps(
      {
          'item_id': item_id,
          'instances': [{'label': i.label, 'regions': list(i.regions)} for i in instances],
      },
      ensure_ascii=False,
  )


def read_instances(path: str) -> dict[str, list[Instance]]:
  """Reads an `instances_{split}.jsonl` sidecar into item_id -> instances."""
  out: dict[str, list[Instance]] = {}
  with open(path, 'rb') as f:
    for lineno, raw in enumerate(f, start=1):
      line = decode_line(raw, path=path, lineno=lineno)
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
        out[rec['item_id']] = [
            Instance(str(i['label']), tuple(int(r) for r in i['regions'])) for i in rec['instances']
        ]
      except (ValueError, KeyError, TypeError) as err:
        raise BadInputError(
            'malformed_line',
            f'{path}:{lineno}: expected '
            '{"item_id": ..., "instances": [{"label": ..., "regions": '
            f'[...]}}]}}: {err}',
        ) from err
  return out
