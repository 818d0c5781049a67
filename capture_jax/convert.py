"""Weight import: released CAPTURE checkpoints and Hugging Face BERT into our parameter tree.

* `from_release_state_dict`: a PyTorch `state_dict` of the release (a file saved
  with `torch.save`, an `.npz`, or a mapping name -> array) -> our parameters.
  PyTorch `Linear` weights are `[out, in]` and Flax kernels `[in, out]`; the
  co-transformer's packed `in_proj` (q, k, v rows) is split; the MLM decoder is
  tied to the word embeddings. Tensors the release saves but never uses
  (`biOutput.q_dense1/2`, `cross_encoder.pooler`, the tied decoder copy) are
  reported and skipped; a missing tensor or a name the release never writes
  is an error that names it.
* `from_hf_bert`: a Hugging Face BERT directory (`config.json` plus
  `model.safetensors` or `pytorch_model.bin`) -> word/position/type embeddings,
  the first `num_hidden_layers` text-stream layers and the MLM transform. The
  names may carry the `bert.` prefix (`BertForPreTraining`/`BertForMaskedLM`)
  or not (`BertModel`), and LayerNorms may be `weight`/`bias` or the
  `gamma`/`beta` of Google-converted checkpoints.
* `check_init_vocab`: the run's `data.vocab_file` must be the initial
  checkpoint's own `vocab.txt`, token for token (each embedding row belongs to
  one token id).

Torch is imported lazily, only to read `.bin`/`.pt` files.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from capture_jax import batch as batch_lib
from capture_jax.data import tokenizer as tokenizer_lib
from capture_jax.param_paths import path_str
from capture_jax.models import capture

Params = dict[str, Any]
PathTuple = tuple[str, ...]

# Tensors the release saves but whose values never reach an output.
RELEASE_UNUSED = (
    re.compile(r'^bert\.encoder\.c_layer\.\d+\.biOutput\.q_dense[12]\.(weight|bias)$'),
    re.compile(r'^bert\.cross_encoder\.pooler\.'),
    re.compile(r'^cls\.predictions\.decoder\.weight$'),  # tied to the word embeddings
)


class ConversionError(ValueError):
  """A checkpoint does not fit the model config; the message names the tensors."""


@dataclasses.dataclass
class ImportReport:
  """What an import used, skipped and left at its initial value."""

  loaded: list[str]
  unused: list[str]
  not_loaded: list[str]  # our parameter paths that the checkpoint did not provide

  def summary(self) -> str:
    lines = [f'loaded {len(self.loaded)} tensors']
    if self.unused:
      lines.append(f'skipped {len(self.unused)} unused tensors: ' + ', '.join(self.unused))
    if self.not_loaded:
      lines.append(
          f'{len(self.not_loaded)} parameters keep their initial values: '
          + ', '.join(self.not_loaded)
      )
    return '\n'.join(lines)


# --------------------------------------------------------------------------
# Reading checkpoints.


def load_tensor_file(path: str | Path) -> dict[str, np.ndarray]:
  """name -> float32/int numpy array from `.npz`, `.safetensors`, or a torch file (`.bin`, `.pt`, `.pth`)."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f'checkpoint file {path} does not exist')
  if path.suffix == '.npz':
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  if path.suffix == '.safetensors':
    from safetensors.numpy import load_file

    return dict(load_file(str(path)))
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        f'reading {path} needs PyTorch (pip install torch==2.13.0), '
        'or convert it to .npz/.safetensors first'
    ) from e
  obj = torch.load(str(path), map_location='cpu', weights_only=True)
  for key in ('state_dict', 'model'):  # training checkpoints wrap the state_dict
    if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
      obj = obj[key]
  if not isinstance(obj, Mapping):
    raise ConversionError(
        f'{path} holds a {type(obj).__name__}, expected a state_dict (name -> tensor)'
    )
  return {
      k: v.detach().float().numpy() if v.is_floating_point() else v.numpy() for k, v in obj.items()
  }


def _as_numpy_dict(state_dict: Mapping[str, Any] | str | Path) -> dict[str, np.ndarray]:
  if isinstance(state_dict, (str, Path)):
    return load_tensor_file(state_dict)
  out = {}
  for k, v in state_dict.items():
    if hasattr(v, 'detach'):  # a torch tensor, without importing torch
      v = v.detach().cpu().float().numpy()
    out[k] = np.asarray(v)
  # `nn.DataParallel` checkpoints prefix every name with 'module.'.
  if out and all(k.startswith('module.') for k in out):
    out = {k[len('module.') :]: v for k, v in out.items()}
  return out


# --------------------------------------------------------------------------
# Name maps. Each entry: our path -> (source name, transform of the source array).

Transform = Callable[[np.ndarray], np.ndarray]
identity: Transform = lambda a: a
transpose: Transform = lambda a: a.T


def _linear(ours: PathTuple, theirs: str) -> dict[PathTuple, tuple[str, Transform]]:
  return {
      ours + ('kernel',): (theirs + '.weight', transpose),
      ours + ('bias',): (theirs + '.bias', identity),
  }


def _layer_norm(ours: PathTuple, theirs: str) -> dict[PathTuple, tuple[str, Transform]]:
  return {
      ours + ('scale',): (theirs + '.weight', identity),
      ours + ('bias',): (theirs + '.bias', identity),
  }


def _bert_layer(ours: PathTuple, theirs: str) -> dict[PathTuple, tuple[str, Transform]]:
  """A post-LN BERT layer (`PostLNLayer`) from HF/ViLBERT names."""
  m = {}
  for name in ('query', 'key', 'value'):
    m |= _linear(ours + (name, 'dense'), f'{theirs}.attention.self.{name}')
  m |= _linear(ours + ('attention_output',), f'{theirs}.attention.output.dense')
  m |= _layer_norm(ours + ('attention_layer_norm',), f'{theirs}.attention.output.LayerNorm')
  m |= _linear(ours + ('ffn', 'intermediate'), f'{theirs}.intermediate.dense')
  m |= _linear(ours + ('ffn', 'output'), f'{theirs}.output.dense')
  m |= _layer_norm(ours + ('ffn_layer_norm',), f'{theirs}.output.LayerNorm')
  return m


def _text_embeddings(prefix: str) -> dict[PathTuple, tuple[str, Transform]]:
  m = {('word_embeddings', 'embedding'): (f'{prefix}embeddings.word_embeddings.weight', identity)}
  for name in ('position_embeddings', 'token_type_embeddings'):
    m[('text_embeddings', name, 'embedding')] = (f'{prefix}embeddings.{name}.weight', identity)
  m |= _layer_norm(('text_embeddings', 'layer_norm'), f'{prefix}embeddings.LayerNorm')
  return m


def _packed_rows(index: int, width: int) -> Transform:
  """Rows `[index*width, (index+1)*width)` of a packed q/k/v `in_proj` tensor."""

  def take(a: np.ndarray) -> np.ndarray:
    rows = a[index * width : (index + 1) * width]
    return rows.T if rows.ndim == 2 else rows

  return take


def release_name_map(cfg: ml_collections.ConfigDict) -> dict[PathTuple, tuple[str, Transform]]:
  """Our unscanned parameter path -> (release tensor name, transform), for the `model` config."""
  m = _text_embeddings('bert.')
  m |= _linear(('visual_embeddings', 'image_embeddings'), 'bert.v_embeddings.image_embeddings')
  m |= _linear(
      ('visual_embeddings', 'location_embeddings'), 'bert.v_embeddings.image_location_embeddings'
  )
  m |= _layer_norm(('visual_embeddings', 'layer_norm'), 'bert.v_embeddings.LayerNorm')
  for i in range(cfg.num_hidden_layers):
    m |= _bert_layer(('text_stream', f'layer_{i}'), f'bert.encoder.layer.{i}')
  for i in range(cfg.v_num_hidden_layers):
    m |= _bert_layer(('visual_stream', f'layer_{i}'), f'bert.encoder.v_layer.{i}')
  m |= _linear(('text_encoder_pooler',), 'bert.encoder.t_pooler.dense')
  m |= _linear(('visual_encoder_pooler',), 'bert.encoder.v_pooler.dense')
  for i in range(cfg.co_num_layers):
    ours, theirs = ('coattention', f'layer_{i}'), f'bert.encoder.c_layer.{i}'
    for name in ('query1', 'key1', 'value1', 'query2', 'key2', 'value2'):
      m |= _linear(ours + (name, 'dense'), f'{theirs}.biattention.{name}')
    for j in ('1', '2'):
      m |= _linear(ours + (f'dense{j}',), f'{theirs}.biOutput.dense{j}')
      m |= _layer_norm(ours + (f'layer_norm{j}',), f'{theirs}.biOutput.LayerNorm{j}')
    for side in ('v', 't'):
      m |= _linear(ours + (f'{side}_ffn', 'intermediate'), f'{theirs}.{side}_intermediate.dense')
      m |= _linear(ours + (f'{side}_ffn', 'output'), f'{theirs}.{side}_output.dense')
      m |= _layer_norm(ours + (f'{side}_ffn_layer_norm',), f'{theirs}.{side}_output.LayerNorm')
  if cfg.cross_num_layers:
    m[('cross_position_embeddings', 'embedding')] = (
        'bert.cross_encoder.embeddings.position_embeddings.weight',
        identity,
    )
  width = cfg.cross_hidden_size
  for i in range(cfg.cross_num_layers):
    ours, theirs = ('co_transformer', f'layer_{i}'), f'bert.cross_encoder.transformer.resblocks.{i}'
    for j, name in enumerate(('query', 'key', 'value')):
      m[ours + (name, 'dense', 'kernel')] = (
          f'{theirs}.attn.in_proj_weight',
          _packed_rows(j, width),
      )
      m[ours + (name, 'dense', 'bias')] = (f'{theirs}.attn.in_proj_bias', _packed_rows(j, width))
    m |= _linear(ours + ('out_proj',), f'{theirs}.attn.out_proj')
    m |= _layer_norm(ours + ('ln_1',), f'{theirs}.ln_1')
    m |= _layer_norm(ours + ('ln_2',), f'{theirs}.ln_2')
    m |= _linear(ours + ('mlp', 'intermediate'), f'{theirs}.mlp.c_fc')
    m |= _linear(ours + ('mlp', 'output'), f'{theirs}.mlp.c_proj')
  m |= _linear(('text_projection',), 'bert.t_fc.dense')
  m |= _linear(('visual_projection',), 'bert.v_fc.dense')
  m |= _linear(('mlm_head', 'input_projection'), 'cls.t_fc')
  m |= _linear(('mlm_head', 'transform'), 'cls.predictions.transform.dense')
  m |= _layer_norm(('mlm_head', 'layer_norm'), 'cls.predictions.transform.LayerNorm')
  m[('mlm_bias',)] = ('cls.predictions.bias', identity)
  m |= _linear(('mrm_head', 'input_projection'), 'cls.v_fc')
  m |= _linear(('mrm_head', 'transform'), 'cls.imagePredictions.transform.dense')
  m |= _layer_norm(('mrm_head', 'layer_norm'), 'cls.imagePredictions.transform.LayerNorm')
  m |= _linear(('mrm_decoder',), 'cls.imagePredictions.decoder')
  return m


# --------------------------------------------------------------------------
# Parameter-tree helpers.


def param_shapes(cfg: ml_collections.ConfigDict) -> dict[PathTuple, tuple[int, ...]]:
  """Flat path -> shape of the *unscanned* parameters for `cfg` (no memory used)."""
  unscanned = cfg.copy_and_resolve_references()
  unscanned.scan_layers = False
  model = capture.CaptureModel(unscanned)
  batch = batch_lib.BatchLayout.for_model(unscanned, text_len=2, regions=1).dummy()
  tree = jax.eval_shape(lambda: capture.init_params(model, jax.random.key(0), batch))
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree).items()}


def scan_layout(params: Params) -> Params:
  """Stacks `layer_0..layer_{n-1}` siblings into `scanned` (the `scan_layers=True` layout)."""

  def visit(node):
    if not isinstance(node, Mapping):
      return node
    keys = list(node)
    if keys and all(re.fullmatch(r'layer_\d+', k) for k in keys):
      layers = [visit(node[f'layer_{i}']) for i in range(len(keys))]
      return {'scanned': jax.tree.map(lambda *xs: np.stack(xs), *layers)}
    return {k: visit(v) for k, v in node.items()}

  return visit(params)


def unscan_layout(params: Params) -> Params:
  """Inverse of `scan_layout`."""

  def visit(node):
    if not isinstance(node, Mapping):
      return node
    if set(node) == {'scanned'}:
      n = jax.tree.leaves(node['scanned'])[0].shape[0]
      return {f'layer_{i}': jax.tree.map(lambda x, i=i: x[i], node['scanned']) for i in range(n)}
    return {k: visit(v) for k, v in node.items()}

  return visit(params)


def _convert(
    source: Mapping[str, np.ndarray],
    name_map: Mapping[PathTuple, tuple[str, Transform]],
    shapes: Mapping[PathTuple, tuple[int, ...]],
    what: str,
) -> dict[PathTuple, np.ndarray]:
  """Applies `name_map`, checking presence and shapes; returns flat path -> float32 array."""
  missing = sorted({src for src, _ in name_map.values() if src not in source})
  if missing:
    raise ConversionError(
        f'{what} lacks {len(missing)} tensors the model config needs: ' + ', '.join(missing)
    )
  out, wrong = {}, []
  for path, (src, fn) in name_map.items():
    value = np.asarray(fn(source[src]), dtype=np.float32)
    if value.shape != shapes[path]:
      wrong.append(f'{src} gives {value.shape} for {path_str(path)}, expected {shapes[path]}')
    out[path] = value
  if wrong:
    raise ConversionError(f'{what} does not fit the model config: ' + '; '.join(wrong))
  return out


def from_release_state_dict(
    state_dict: Mapping[str, Any] | str | Path, cfg: ml_collections.ConfigDict, strict: bool = True
) -> tuple[Params, ImportReport]:
  """Released CAPTURE weights -> our parameter tree (in the layout `cfg.scan_layers` asks for).

  Args:
    state_dict: a path (`.bin`/`.pt` via torch, `.npz`, `.safetensors`) or a mapping
      name -> array/tensor with the release's names.
    cfg: the `model` config; every size must match the checkpoint.
    strict: a tensor name the release never writes is an error when True,
      reported as unused when False.
  Returns:
    `(params, report)`; `report.unused` lists the skipped tensors.
  """
  source = _as_numpy_dict(state_dict)
  name_map = release_name_map(cfg)
  shapes = param_shapes(cfg)
  flat = _convert(source, name_map, shapes, 'the state_dict')
  used = {src for src, _ in name_map.values()}
  unknown = sorted(
      k for k in source if k not in used and not any(p.search(k) for p in RELEASE_UNUSED)
  )
  # Layers beyond the config's counts are real release tensors but unused here.
  if unknown and strict:
    raise ConversionError(
        f'the state_dict has {len(unknown)} tensors that the model config does not use '
        f'(unknown name, or more layers than configured): '
        + ', '.join(unknown)
        + '; pass strict=False to skip them'
    )
  decoder = source.get('cls.predictions.decoder.weight')
  if decoder is not None and not np.allclose(
      decoder, source['bert.embeddings.word_embeddings.weight']
  ):
    raise ConversionError(
        'cls.predictions.decoder.weight differs from bert.embeddings.word_embeddings.weight; '
        'CAPTURE ties the MLM decoder to the word embeddings'
    )
  unused = sorted(k for k in source if k not in used)
  not_loaded = sorted(path_str(p) for p in shapes if p not in flat)
  if not_loaded:
    raise ConversionError('no release tensor maps to: ' + ', '.join(not_loaded))
  params = traverse_util.unflatten_dict(flat)
  if cfg.scan_layers:
    params = scan_layout(params)
  return params, ImportReport(loaded=sorted(used), unused=unused, not_loaded=[])


# --------------------------------------------------------------------------
# Hugging Face BERT.


def _read_hf_dir(directory: Path) -> tuple[dict, dict[str, np.ndarray]]:
  config_file = directory / 'config.json'
  if not config_file.exists():
    raise FileNotFoundError(f'{directory} has no config.json: not a Hugging Face model directory')
  hf_config = json.loads(config_file.read_text())
  for name in ('model.safetensors', 'pytorch_model.bin'):
    if (directory / name).exists():
      return hf_config, load_tensor_file(directory / name)
  raise FileNotFoundError(f'{directory} has neither model.safetensors nor pytorch_model.bin')


def modern_layer_norm_names(
    source: Mapping[str, np.ndarray], where: str | Path
) -> dict[str, np.ndarray]:
  """`source` with LayerNorm `gamma`/`beta` renamed `weight`/`bias`, as transformers does when
  loading a Google-converted checkpoint (older BERT checkpoints, e.g. bert-base-uncased's
  `pytorch_model.bin`, still carry the TensorFlow names).

  A LayerNorm that has both spellings is refused: which one the model would use is not known.
  """
  old = {'gamma': 'weight', 'beta': 'bias'}
  out = dict(source)
  for name in source:
    head, _, last = name.rpartition('.')
    if last not in old or 'LayerNorm' not in head:
      continue
    new = f'{head}.{old[last]}'
    if new in source:
      raise ConversionError(f'{where} holds both {name} and {new}: one LayerNorm, two values')
    out[new] = out.pop(name)
  return out


def _check_hf_sizes(hf: Mapping[str, Any], cfg: ml_collections.ConfigDict, directory: Path) -> None:
  expected = {
      'vocab_size': cfg.vocab_size,
      'hidden_size': cfg.hidden_size,
      'num_attention_heads': cfg.num_attention_heads,
      'intermediate_size': cfg.intermediate_size,
      'type_vocab_size': cfg.type_vocab_size,
  }
  wrong = [f'{k}={hf.get(k)} (model.{k}={v})' for k, v in expected.items() if hf.get(k) != v]
  if hf.get('num_hidden_layers', 0) < cfg.num_hidden_layers:
    wrong.append(
        f'num_hidden_layers={hf.get("num_hidden_layers")} < model.num_hidden_layers={cfg.num_hidden_layers}'
    )
  if hf.get('max_position_embeddings', 0) < cfg.max_position_embeddings:
    wrong.append(
        f'max_position_embeddings={hf.get("max_position_embeddings")} '
        f'< model.max_position_embeddings={cfg.max_position_embeddings}'
    )
  if hf.get('hidden_act', 'gelu') != 'gelu':
    wrong.append(f'hidden_act={hf.get("hidden_act")!r} (the text stream uses exact GELU)')
  if wrong:
    raise ConversionError(
        f'the BERT checkpoint in {directory} does not fit the model config: ' + '; '.join(wrong)
    )


def _crop_positions(name_map, cfg):
  """The checkpoint may have more positions than the config: keep the first ones."""
  path = ('text_embeddings', 'position_embeddings', 'embedding')
  src, _ = name_map[path]
  name_map[path] = (src, lambda a: a[: cfg.max_position_embeddings])


def from_hf_bert(
    directory: str | Path, cfg: ml_collections.ConfigDict
) -> tuple[Params, ImportReport]:
  """Text-stream weights from a Hugging Face BERT directory.

  Returns a *partial* tree (embeddings, the first `num_hidden_layers` text
  layers, and the MLM transform and bias when the checkpoint has an MLM head),
  in the layout `cfg.scan_layers` asks for; merge it into initialised
  parameters with `merge_params`. `report.loaded` lists the imported paths
  (the trainer gives them the pretrained-BERT learning-rate multiplier).
  """
  directory = Path(directory)
  hf_config, source = _read_hf_dir(directory)
  source = modern_layer_norm_names(source, directory)
  _check_hf_sizes(hf_config, cfg, directory)
  # `BertForPreTraining` prefixes the encoder with 'bert.'; `BertModel` does not.
  prefix = 'bert.' if 'bert.embeddings.word_embeddings.weight' in source else ''
  name_map = _text_embeddings(prefix)
  _crop_positions(name_map, cfg)
  for i in range(cfg.num_hidden_layers):
    name_map |= _bert_layer(('text_stream', f'layer_{i}'), f'{prefix}encoder.layer.{i}')
  if 'cls.predictions.transform.dense.weight' in source:
    name_map |= _linear(('mlm_head', 'transform'), 'cls.predictions.transform.dense')
    name_map |= _layer_norm(('mlm_head', 'layer_norm'), 'cls.predictions.transform.LayerNorm')
    name_map[('mlm_bias',)] = ('cls.predictions.bias', identity)
  shapes = param_shapes(cfg)
  flat = _convert(source, name_map, shapes, f'the BERT checkpoint in {directory}')
  used = {src for src, _ in name_map.values()}
  params = traverse_util.unflatten_dict(flat)
  report = ImportReport(
      loaded=sorted(path_str(p) for p in flat),
      unused=sorted(k for k in source if k not in used),
      not_loaded=sorted(path_str(p) for p in shapes if p not in flat),
  )
  if cfg.scan_layers:
    params = scan_layout(params)
  return params, report


# --------------------------------------------------------------------------
# The initial checkpoint's vocab.


def init_vocab_file(train: ml_collections.ConfigDict) -> Path | None:
  """The `vocab.txt` whose token ids `train.init_path`'s embedding rows belong to.

  A BERT directory's own `vocab.txt` (required: without it the ids cannot be
  checked); for a released checkpoint, a `vocab.txt` beside the state_dict file
  where the release ships one (the CAPTURE release ships none: its rows are
  bert-base-chinese's ids). None for `init='scratch'` or a release without one.
  """
  if train.init == 'bert':
    vocab = Path(train.init_path) / 'vocab.txt'
    if not vocab.is_file():
      raise ConversionError(
          f'{train.init_path} has no vocab.txt: the token ids of its embedding rows cannot be '
          "checked against data.vocab_file; put the checkpoint's own vocab.txt there "
          '(bert-base-chinese ships one)'
      )
    return vocab
  if train.init == 'release':
    vocab = Path(train.init_path).parent / 'vocab.txt'
    return vocab if vocab.is_file() else None
  return None


def first_vocab_difference(ours: str | Path, theirs: str | Path) -> str | None:
  """None when two vocab files hold the same tokens in the same order (equal
  `tokenizer.vocab_fingerprint`), else where they first differ: `id N: 'a' in ours, 'b' in theirs`
  (a missing id reads `none`, the file being shorter)."""
  if tokenizer_lib.vocab_fingerprint(str(ours)) == tokenizer_lib.vocab_fingerprint(str(theirs)):
    return None
  a, b = tokenizer_lib.read_vocab(str(ours)), tokenizer_lib.read_vocab(str(theirs))
  a_tokens, b_tokens = sorted(a, key=a.__getitem__), sorted(b, key=b.__getitem__)
  i = next(
      (i for i, (x, y) in enumerate(zip(a_tokens, b_tokens)) if x != y),
      min(len(a_tokens), len(b_tokens)),
  )
  tok = lambda tokens: repr(tokens[i]) if i < len(tokens) else f'none ({len(tokens)} tokens)'
  return f'first difference at id {i}: {tok(a_tokens)} in {ours}, {tok(b_tokens)} in {theirs}'


def check_init_vocab(config: ml_collections.ConfigDict) -> None:
  """Raises ConversionError, before anything compiles, when the run's `data.vocab_file` is not
  the vocab of the checkpoint `train.init` starts from.

  Each imported embedding row (and MLM bias) belongs to one token id: with
  another vocab, of the same size in another order or a smaller one, every
  row would belong to another token, and training would run without a word.
  """
  theirs = init_vocab_file(config.train)
  if theirs is None:
    return
  ours = config.data.vocab_file
  if not ours:
    raise ConversionError(
        f'data.vocab_file is empty; train.init={config.train.init!r} needs the vocab of '
        f'{config.train.init_path}: pass --config.data.vocab_file={theirs}'
    )
  difference = first_vocab_difference(ours, theirs)
  if difference:
    raise ConversionError(
        f'data.vocab_file={ours} is not the vocab of train.init_path={config.train.init_path} '
        f'({theirs}): {difference}. The imported embedding rows belong to its token ids: '
        f'pass --config.data.vocab_file={theirs}'
    )


def merge_params(base: Params, update: Params) -> Params:
  """`base` with every leaf present in `update` replaced (shapes must agree)."""
  flat = traverse_util.flatten_dict(base)
  for path, value in traverse_util.flatten_dict(update).items():
    if path not in flat:
      raise ConversionError(f'{path_str(path)} is not a parameter of the model')
    if tuple(np.shape(value)) != tuple(np.shape(flat[path])):
      raise ConversionError(
          f'{path_str(path)}: imported shape {np.shape(value)}, model shape {np.shape(flat[path])}'
      )
    flat[path] = value
  return traverse_util.unflatten_dict(flat)


def model_config_from_release(
    release: Mapping[str, Any],
    cross_encoder: Mapping[str, Any] | None = None,
    mlp_ratio: int = 4,
    state_dict: Mapping[str, Any] | None = None,
    max_text_len: int = 36,
) -> ml_collections.ConfigDict:
  """Our `model` config from a release-format config (ViLBERT `bert_config` JSON keys).

  `cross_encoder` gives the co-transformer's `hidden_size`, `num_attention_heads`,
  `max_position_embeddings` and optionally `num_layers` (the release hard-codes
  them next to the BERT config); with `state_dict`, the number of co-transformer
  blocks is read from its tensor names. `max_text_len` is the length the
  release padded captions to (36 in the paper).
  """
  from capture_jax import config as config_lib  # pylint: disable=import-outside-toplevel

  m = config_lib.model_config()
  for key in (
      'vocab_size',
      'max_position_embeddings',
      'type_vocab_size',
      'hidden_size',
      'num_attention_heads',
      'intermediate_size',
      'num_hidden_layers',
      'v_feature_size',
      'v_target_size',
      'v_hidden_size',
      'v_num_attention_heads',
      'v_intermediate_size',
      'v_num_hidden_layers',
      'bi_hidden_size',
      'bi_num_attention_heads',
      'initializer_range',
  ):
    if key in release:
      m[key] = release[key]
  m.hidden_dropout_prob = release.get('hidden_dropout_prob', m.hidden_dropout_prob)
  m.attention_probs_dropout_prob = release.get(
      'attention_probs_dropout_prob', m.attention_probs_dropout_prob
  )
  m.co_num_layers = release.get(
      'co_num_layers', len(release.get('v_biattention_id', [])) or m.co_num_layers
  )
  m.mrm_target = 'feature' if release.get('predict_feature', True) else 'class'
  if cross_encoder:
    m.cross_hidden_size = cross_encoder.get('hidden_size', m.cross_hidden_size)
    m.cross_num_attention_heads = cross_encoder.get(
        'num_attention_heads', m.cross_num_attention_heads
    )
    m.cross_max_position_embeddings = cross_encoder.get(
        'max_position_embeddings', m.cross_max_position_embeddings
    )
    m.cross_num_layers = cross_encoder.get('num_layers', m.cross_num_layers)
  if state_dict is not None:
    blocks = {
        int(mt.group(1))
        for k in state_dict
        if (mt := re.match(r'^bert\.cross_encoder\.transformer\.resblocks\.(\d+)\.', k))
    }
    m.cross_num_layers = len(blocks)
  m.cross_mlp_ratio = mlp_ratio
  m.max_text_len = max_text_len
  return m
