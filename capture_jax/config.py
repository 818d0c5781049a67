"""The one place where every configuration field is defined, with its default.

`configs/*.py` start from `base_config()` and override sizes; the command-line
tools load those files with `ml_collections.config_flags` so any field can be
overridden (`--config.train.batch_size=128`). Library code reads fields only
from the `ConfigDict` it is given: no module keeps its own defaults.

The schema lives here too: right after each section's defaults, its `*_RULES`
table states every field's type and range (a field without one fails
tests/test_config.py), and `RELATIONS` what fields must satisfy together.
`validate(config)` raises `ConfigError` (one line, every problem); every
command calls it (`check_or_exit`: `error: ...`, exit status 1) before
anything compiles, and `capture_jax.cli` refuses an override of a field that
does not exist the same way, with the nearest field's name. What depends on
the devices (the batch split over the mesh) is checked by the trainer.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import os
import sys
from typing import Any, Callable

import ml_collections

# --------------------------------------------------------------------------
# The schema's vocabulary. Each section below states, right after its defaults, what every
# one of its fields may hold (`*_RULES`); `RELATIONS` states what fields must satisfy
# together. `validate` checks both before anything compiles.


class ConfigError(ValueError):
  """A configuration field is unknown, mistyped, out of range, or at odds with another field."""


@dataclasses.dataclass(frozen=True)
class Rule:
  """What one field may hold.

  kind: 'int', 'float', 'bool', 'str' (any string, e.g. a path), 'choice' (one of
    `choices`) or 'names' (a comma-separated list of `choices`).
  lo, hi: bounds of a number, inclusive unless `lo_open` / `hi_open`; None: unbounded.
  also: values allowed besides the range (e.g. -1 meaning 'the rest').
  """

  kind: str
  lo: float | None = None
  hi: float | None = None
  lo_open: bool = False
  hi_open: bool = False
  choices: tuple[str, ...] = ()
  also: tuple[Any, ...] = ()

  def allowed(self) -> str:
    """What is allowed, in words (the end of a refusal)."""
    if self.kind in ('choice', 'names'):
      names = ', '.join(repr(c) for c in self.choices)
      return f'one of {names}' if self.kind == 'choice' else f'comma-separated names among {names}'
    if self.kind in ('bool', 'str'):
      return {'bool': 'True or False', 'str': 'a string'}[self.kind]
    what = 'an integer' if self.kind == 'int' else 'a finite number'
    if self.lo is not None and self.hi is not None:
      what += f' in {"(" if self.lo_open else "["}{self.lo:g}, {self.hi:g}{")" if self.hi_open else "]"}'
    elif self.lo is not None:
      what += f' {">" if self.lo_open else ">="} {self.lo:g}'
    elif self.hi is not None:
      what += f' {"<" if self.hi_open else "<="} {self.hi:g}'
    return what + ''.join(f', or {a!r}' for a in self.also)

  def accepts(self, value: Any) -> bool:
    if value in self.also and type(value) is not bool:  # pylint: disable=unidiomatic-typecheck
      return True
    if self.kind == 'bool':
      return isinstance(value, bool)
    if self.kind == 'str':
      return isinstance(value, str)
    if self.kind == 'choice':
      return isinstance(value, str) and value in self.choices
    if self.kind == 'names':
      return isinstance(value, str) and all(
          n.strip() in self.choices for n in value.split(',') if n.strip()
      )
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      return False
    if self.kind == 'int' and not isinstance(value, int):
      return False
    if not math.isfinite(value):
      return False
    if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
      return False
    if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
      return False
    return True

  def bad_values(self) -> list[Any]:
    """Values this rule refuses (at least one of the wrong type): the schema's own test."""
    bad: list[Any] = [[1]]
    if self.kind == 'bool':
      return bad + ['yes', 1]
    if self.kind == 'str':
      return bad + [1]
    if self.kind in ('choice', 'names'):
      return bad + ['no-such-name', 1]
    bad.append('1')
    if self.kind == 'int':
      bad.append(1.5)
    else:
      bad += [math.nan, math.inf]
    if self.lo is not None:
      bad.append(self.lo if self.lo_open else self.lo - 1)
    if self.hi is not None:
      bad.append(self.hi if self.hi_open else self.hi + 1)
    return [b for b in bad if b not in self.also]


def Int(lo: float | None = None, hi: float | None = None, also: tuple[Any, ...] = ()) -> Rule:  # pylint: disable=invalid-name
  return Rule('int', lo, hi, also=also)


def Float(  # pylint: disable=invalid-name
    lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False
) -> Rule:
  return Rule('float', lo, hi, lo_open, hi_open)


def Choice(*choices: str) -> Rule:  # pylint: disable=invalid-name
  return Rule('choice', choices=choices)


def Names(*choices: str) -> Rule:  # pylint: disable=invalid-name
  return Rule('names', choices=choices)


BOOL = Rule('bool')
STR = Rule('str')  # any string: paths, '' for 'not set'
COUNT = Int(1)  # a count of at least one
SIZE = Int(1)  # a width, a length or a number of layers' elements
NON_NEGATIVE_INT = Int(0)
SEED = Int(0, 2**32 - 1)
PROBABILITY = Float(0, 1)
DROPOUT = Float(0, 1, hi_open=True)  # 1 would drop everything
RATE = Float(0, lo_open=True)  # a learning rate, a temperature, an epsilon: > 0
WEIGHT = Float(0)  # a loss weight or a decay: >= 0 (0 turns it off)


def model_config() -> ml_collections.ConfigDict:
  """Sizes of the hybrid-stream transformer; defaults are the released paper sizes."""
  m = ml_collections.ConfigDict()
  # Text stream (BERT, post-LN).
  m.vocab_size = 21128
  m.max_position_embeddings = 512
  m.type_vocab_size = 2
  m.hidden_size = 768
  m.num_attention_heads = 12
  m.intermediate_size = 3072
  m.num_hidden_layers = 4
  # Visual stream (post-LN) over region features + 5-d box encodings.
  m.v_feature_size = 2048
  m.v_hidden_size = 768
  m.v_num_attention_heads = 8
  m.v_intermediate_size = 1024
  m.v_num_hidden_layers = 4
  # Co-attention layers; their attention width is also the width of the
  # pooled outputs and of the encoder poolers (512 in the paper).
  m.bi_hidden_size = 512
  m.bi_num_attention_heads = 8
  m.co_num_layers = 4
  # Joint pre-LN co-transformer over [text ; visual] ("cross_encoder").
  m.cross_hidden_size = 768
  m.cross_num_attention_heads = 8
  m.cross_num_layers = 6
  m.cross_mlp_ratio = 4
  m.cross_max_position_embeddings = 512
  # Text slots of the co-transformer's positions: visual tokens take positions
  # max_text_len .. max_text_len + R. The release always pads text to this
  # length; fixing the offset keeps outputs independent of the padded length.
  m.max_text_len = 36
  # Ablation variants are layer counts: co_num_layers=0 is a single-stream
  # model (joint co-transformer only), cross_num_layers=0 a two-stream one
  # (co-attention only).
  # Masked region modelling head: 'feature' regression (target = v_feature_size)
  # or 'class' distribution of the detector (v_target_size classes).
  m.mrm_target = 'feature'
  m.v_target_size = 2048
  m.hidden_dropout_prob = 0.1
  m.attention_probs_dropout_prob = 0.1
  m.layer_norm_eps = 1e-12
  m.initializer_range = 0.02
  # Performance options; the defaults keep the released float32 numerics.
  m.dtype = 'float32'  # compute dtype: 'float32' or 'bfloat16' (params stay float32)
  # 'xla' (explicit einsums, the released numerics), 'dot_product_attention' (jax.nn with
  # implementation=None: XLA's composition on every platform at jax 0.10.2) or 'cudnn'
  # (cuDNN's fused attention, NVIDIA GPUs in bf16 only). README: "What each attention compiles to".
  m.attention_impl = 'xla'
  m.remat = False  # rematerialise each layer in the backward pass
  m.scan_layers = False  # nn.scan over identical layers (faster compiles, stacked params)
  return m


MODEL_RULES = {
    'vocab_size': SIZE,
    'max_position_embeddings': SIZE,
    'type_vocab_size': SIZE,
    'hidden_size': SIZE,
    'num_attention_heads': COUNT,
    'intermediate_size': SIZE,
    'num_hidden_layers': NON_NEGATIVE_INT,
    'v_feature_size': SIZE,
    'v_hidden_size': SIZE,
    'v_num_attention_heads': COUNT,
    'v_intermediate_size': SIZE,
    'v_num_hidden_layers': NON_NEGATIVE_INT,
    'bi_hidden_size': SIZE,
    'bi_num_attention_heads': COUNT,
    'co_num_layers': NON_NEGATIVE_INT,
    'cross_hidden_size': SIZE,
    'cross_num_attention_heads': COUNT,
    'cross_num_layers': NON_NEGATIVE_INT,
    'cross_mlp_ratio': COUNT,
    'cross_max_position_embeddings': SIZE,
    'max_text_len': Int(3),  # [CLS], a token, [SEP]
    'mrm_target': Choice('feature', 'class'),
    'v_target_size': SIZE,
    'hidden_dropout_prob': DROPOUT,
    'attention_probs_dropout_prob': DROPOUT,
    'layer_norm_eps': RATE,
    'initializer_range': RATE,
    'dtype': Choice('float32', 'bfloat16'),
    'attention_impl': Choice('xla', 'dot_product_attention', 'cudnn'),
    'remat': BOOL,
    'scan_layers': BOOL,
}


def data_config() -> ml_collections.ConfigDict:
  """Input data: files, sizes, masking recipe and pipeline; all data defaults live here."""
  d = ml_collections.ConfigDict()
  # Files.
  d.data_dir = ''  # folder with product1m_{split}_ossurl_v2.txt + features/
  d.features = ''  # region-feature store (TSV/npz file or folder); '' = {data_dir}/features
  d.tfds_dir = ''  # where the TFDS `product1m` builder writes its ArrayRecords
  d.vocab_file = ''  # WordPiece vocab.txt
  d.storage_dtype = 'float16'  # region features on disk: 'float16' or 'float32'
  d.skip_bad = False  # skip and count bad samples instead of stopping
  # Sizes. feature_dim must equal model.v_feature_size.
  d.max_text_len = 36  # tokens incl. [CLS] and [SEP]
  d.max_regions = 36  # regions per image, without the global token
  d.feature_dim = 2048
  # Masking recipe of the reference (MLM and MRM).
  d.mlm_probability = 0.15
  d.mlm_mask_probability = 0.8  # a chosen token becomes [MASK] ...
  d.mlm_random_probability = 0.1  # ... or a random token (else it is kept)
  d.mrm_probability = 0.15
  d.mrm_zero_probability = 0.9
  # Pipeline.
  d.batch_size = 64  # global training batch, split evenly over processes
  d.eval_batch_size = 256  # global evaluation batch
  d.shuffle_seed = 0  # global shuffle order and masking draws
  d.num_epochs = 0  # 0 = repeat forever (the trainer counts steps)
  d.num_workers = 0  # Grain worker processes (0 = in the main process)
  d.read_threads = 2  # Grain reader threads per process
  d.prefetch_batches = 4  # batches produced ahead per process
  # Global batches put on the devices ahead of the step, by a thread (0: built when the step
  # needs it); checkpoints keep the position of the consumed batches.
  d.prefetch_to_device = 2
  # The training split resident in device memory (`training/resident.py`): its rows are loaded
  # once, sharded over every device, and each step gathers its batch by index inside the step;
  # the host hands over only the step's record indices and positions. Refused before compiling
  # when the split takes more than `resident_memory_fraction` of a device's memory.
  d.resident = False
  d.resident_memory_fraction = 0.5
  # Synthetic world (`python -m capture_jax.data.synthetic`).
  d.synthetic_preset = 'demo'
  d.synthetic_seed = 0
  d.feature_format = 'tsv'  # 'tsv' (base64 rows) or 'npz' (one file per image)
  d.vocab_size = 2000  # WordPiece vocab trained on the captions (at most)
  # Splits whose titles train the vocab: by default those a user has before any query
  # arrives (the training pairs and the gallery). Adding 'dev' or 'test' lets query titles
  # (text, not labels) shape the token ids: transductive, and no longer a held-out figure.
  d.vocab_splits = 'train,gallery'
  return d


DATA_RULES = {
    'data_dir': STR,
    'features': STR,
    'tfds_dir': STR,
    'vocab_file': STR,
    'storage_dtype': Choice('float16', 'float32'),
    'skip_bad': BOOL,
    'max_text_len': Int(3),
    'max_regions': SIZE,
    'feature_dim': SIZE,
    'mlm_probability': PROBABILITY,
    'mlm_mask_probability': PROBABILITY,
    'mlm_random_probability': PROBABILITY,
    'mrm_probability': PROBABILITY,
    'mrm_zero_probability': PROBABILITY,
    'batch_size': COUNT,
    'eval_batch_size': COUNT,
    'shuffle_seed': SEED,
    'num_epochs': NON_NEGATIVE_INT,
    'num_workers': NON_NEGATIVE_INT,
    'read_threads': COUNT,
    'prefetch_batches': NON_NEGATIVE_INT,
    'prefetch_to_device': NON_NEGATIVE_INT,
    'resident': BOOL,
    'resident_memory_fraction': PROBABILITY,
    'synthetic_preset': Choice('tiny', 'demo', 'small', 'large'),  # data/synthetic/world.py PRESETS
    'synthetic_seed': SEED,
    'feature_format': Choice('tsv', 'npz'),
    'vocab_size': Int(6),  # the five special tokens and a word
    'vocab_splits': Names('train', 'gallery', 'dev', 'test'),  # data/formats.py SPLITS
}


def loss_config() -> ml_collections.ConfigDict:
  l = ml_collections.ConfigDict()
  l.mlm_weight = 1.0
  l.mrm_weight = 1.0  # `img_weight` in the release
  l.contrastive_weight = 1.0
  # 'ntxent' (as released: 2B vectors, intra-modal negatives, fixed temperature),
  # 'clip' (symmetric InfoNCE, learnable temperature) or 'siglip' (sigmoid).
  l.contrastive = 'ntxent'
  l.temperature = 0.07  # NT-Xent temperature; initial temperature for 'clip'
  l.siglip_init_temperature = 0.1  # SigLIP: t' = log(10), b = -10
  l.siglip_init_bias = -10.0
  # Global-batch contrastive loss: chunk of the gathered embeddings processed at once.
  l.contrastive_chunk = 0  # 0 = one block per device (ring over devices)
  # Training decodes MLM logits only at labelled positions, gathered into a fixed budget of
  # ceil(this x B x T) rows per (micro-)batch; a batch with more labels than that is decoded
  # at every position instead (exact either way; see losses.mlm_loss_at_labels). 0 = every
  # position, as released. With the 15% masking recipe 0.25 overflows with p < 1e-5 at B x T = 288.
  l.mlm_prediction_budget = 0.25
  return l


LOSS_RULES = {
    'mlm_weight': WEIGHT,
    'mrm_weight': WEIGHT,
    'contrastive_weight': WEIGHT,
    'contrastive': Choice('ntxent', 'clip', 'siglip'),  # losses.CONTRASTIVE_KINDS
    'temperature': RATE,
    'siglip_init_temperature': RATE,
    'siglip_init_bias': Float(),
    'contrastive_chunk': NON_NEGATIVE_INT,
    'mlm_prediction_budget': PROBABILITY,
}


def train_config() -> ml_collections.ConfigDict:
  """Optimisation and the training loop (the global batch is `data.batch_size`)."""
  t = ml_collections.ConfigDict()
  t.num_steps = 1000
  # AdamW as BERT Adam: linear warm-up over warmup_fraction of the steps, then
  # linear decay to 0; no weight decay on biases and LayerNorm parameters.
  t.learning_rate = 1e-4
  t.warmup_fraction = 0.1
  t.weight_decay = 0.01
  t.adam_b1 = 0.9
  t.adam_b2 = 0.999
  t.adam_eps = 1e-6
  t.grad_clip_norm = 1.0
  # Parameters initialised from pretrained BERT train at this multiple of the lr.
  t.pretrained_lr_multiplier = 0.1
  t.microbatches = 1  # gradient accumulation: the global batch is split into this many
  # Initialisation: 'scratch', 'bert' (a Hugging Face BERT directory: text stream)
  # or 'release' (a released CAPTURE state_dict file).
  t.init = 'scratch'
  t.init_path = ''
  t.log_every = 10
  # Stop with an error after this many consecutive skipped (non-finite) updates: the run has
  # diverged. 0 = never stop. Checked from the metrics every min(log_every, this) steps.
  t.max_consecutive_skipped = 20
  t.progress_bar = True
  t.profile_start_step = (
      -1
  )  # capture a jax.profiler trace of steps [start, start + profile_num_steps)
  t.profile_num_steps = 5
  # CPU only, same random bits either way: draw dropout masks with JAX's unrolled threefry
  # (as on GPU/TPU) instead of its rolled CPU loop. It speeds the demo step up and slows
  # capture_paper's down (measured alternating: docs/BENCHMARKS.md, section "Where the step's
  # time goes"), so off by default and on in configs/demo.py (training/rng_lowering.py).
  t.cpu_unrolled_threefry = False
  return t


TRAIN_RULES = {
    'num_steps': COUNT,
    'learning_rate': RATE,
    'warmup_fraction': PROBABILITY,
    'weight_decay': WEIGHT,
    'adam_b1': Float(0, 1, hi_open=True),
    'adam_b2': Float(0, 1, hi_open=True),
    'adam_eps': RATE,
    'grad_clip_norm': WEIGHT,  # 0: no clipping
    'pretrained_lr_multiplier': WEIGHT,
    'microbatches': COUNT,
    'init': Choice('scratch', 'bert', 'release'),  # training/state.py INIT_KINDS
    'init_path': STR,
    'log_every': COUNT,
    'max_consecutive_skipped': NON_NEGATIVE_INT,
    'progress_bar': BOOL,
    'profile_start_step': Int(-1),  # -1: no trace
    'profile_num_steps': COUNT,
    'cpu_unrolled_threefry': BOOL,
}


def checkpoint_config() -> ml_collections.ConfigDict:
  k = ml_collections.ConfigDict()
  k.every_steps = 500  # asynchronous save interval
  k.keep_last = 3  # keep the last K ...
  k.keep_every = 0  # ... plus every M-th step (0: none)
  k.async_save = True
  # When the workdir has checkpoints but none is readable (all moved aside to
  # checkpoints/corrupt-*), start from step 0 only if this is set.
  k.restart_if_unreadable = False
  return k


CHECKPOINT_RULES = {
    'every_steps': COUNT,
    'keep_last': COUNT,
    'keep_every': NON_NEGATIVE_INT,
    'async_save': BOOL,
    'restart_if_unreadable': BOOL,
}


def mesh_config() -> ml_collections.ConfigDict:
  """Device mesh (`data`, `fsdp`, `tensor`) and the rules that shard parameters over it."""
  s = ml_collections.ConfigDict()
  # Axis sizes; their product is the device count. -1 (at most one) fills
  # whatever the other axes leave. The batch is split over data x fsdp.
  s.data = -1
  s.fsdp = 1
  s.tensor = 1
  # Comma-separated parameter sharding rules ('replicated', 'fsdp', 'tensor';
  # see `training/sharding.py`). 'tensor' splits attention heads / FFN widths
  # Megatron-style; 'fsdp' shards the largest free divisible dimension of large
  # parameters. 'tensor' claims its dimensions first whatever the order.
  s.rules = 'fsdp,tensor'
  s.fsdp_min_size = 2**18  # parameters with fewer elements (per layer) stay replicated over fsdp
  return s


MESH_RULES = {
    'data': Int(1, also=(-1,)),
    'fsdp': Int(1, also=(-1,)),
    'tensor': Int(1, also=(-1,)),
    'rules': Names('replicated', 'fsdp', 'tensor'),  # training/sharding.py KNOWN_RULES
    'fsdp_min_size': NON_NEGATIVE_INT,
}


def eval_config() -> ml_collections.ConfigDict:
  """Embedding export and retrieval evaluation (`capture_jax.export`, `capture_jax.evaluate`)."""
  e = ml_collections.ConfigDict()
  # 'fused' (L2-normalised [text ; visual] final pooled vectors), 'text', 'visual',
  # or 'encoder' (the encoder poolers, fused the same way).
  e.embedding = 'fused'
  # `encoder` only: the text poolers' share of the cosine (0.5: text and visual equally; see
  # retrieval/embedding.py). Lower it for titles unlike the training captions.
  e.encoder_text_weight = 0.5
  # Ranked lists written to retrieval_id_list.txt: 'whole' (the whole-sample
  # query), 'instances' (one query per product instance, merged round-robin) or
  # 'both' (the instance lists, then the whole-sample list, in every round); all three are
  # reported.
  e.query_mode = 'both'
  # Where instance queries come from (`capture_jax.instances`): 'learned' (the proposer
  # trained on copy-and-paste pseudo-samples, `python -m capture_jax.instances train`),
  # 'boxes' (training-free box geometry) or 'oracle' (the synthetic world's sidecar: an
  # upper bound, never the default). '' = 'learned' when the workdir holds a trained
  # proposer, else 'boxes'.
  e.instances = ''
  # Also evaluate instance queries of the other available proposers (boxes; learned when
  # trained; oracle when a sidecar exists), as extra rows of the report.
  e.compare_proposers = False
  e.search = 'exact'  # 'exact' (chunked JAX) or 'faiss' (approximate; recall@100 against exact is reported)
  e.faiss_index = 'ivf'  # 'ivf' or 'hnsw'
  e.faiss_nlist = 0  # IVF lists; 0 = round(sqrt(gallery size))
  e.faiss_nprobe = 16
  e.faiss_hnsw_m = 32
  e.faiss_ef_search = 128
  e.query_chunk = 1024  # exact search: queries scored together
  e.gallery_chunk = 65536  # exact search: gallery rows sent to the devices at once
  e.shard_size = 8192  # rows per exported .npz shard (rounded up to whole evaluation batches)
  e.baselines = True  # TF-IDF, mean region feature and random-weights rows in the report
  e.tfidf_max_features = 8192
  e.num_listings = 3  # queries listed with their top-10 results in report.md
  e.progress_bar = True
  return e


EVAL_RULES = {
    'embedding': Choice('fused', 'text', 'visual', 'encoder'),  # embeddings.EMBEDDING_KINDS
    'encoder_text_weight': PROBABILITY,
    'query_mode': Choice('whole', 'instances', 'both'),  # instance_merge.MERGE_MODES
    'instances': Choice('', 'learned', 'boxes', 'oracle'),  # '' or proposals.METHODS
    'compare_proposers': BOOL,
    'search': Choice('exact', 'faiss'),
    'faiss_index': Choice('ivf', 'hnsw'),
    'faiss_nlist': NON_NEGATIVE_INT,
    'faiss_nprobe': COUNT,
    'faiss_hnsw_m': COUNT,
    'faiss_ef_search': COUNT,
    'query_chunk': COUNT,
    'gallery_chunk': COUNT,
    'shard_size': COUNT,
    'baselines': BOOL,
    'tfidf_max_features': COUNT,
    'num_listings': NON_NEGATIVE_INT,
    'progress_bar': BOOL,
}


def instances_config() -> ml_collections.ConfigDict:
  """Product-instance proposals (`capture_jax.instances`): the `boxes` rule and the
  `learned` proposer trained on copy-and-paste pseudo-labels."""
  i = ml_collections.ConfigDict()
  # Training-free `boxes` proposer (geometry.propose_boxes).
  i.boxes_iou = 0.5  # a box with this IoU with a group's anchor is a duplicate of it
  i.boxes_containment = 0.8  # a box this much inside an anchor is a part of it
  i.boxes_min_area = 0.005  # boxes smaller than this fraction of the image are specks ...
  i.boxes_max_area = 0.9  # ... larger ones the scene, not a product: both background
  # Pseudo-samples (compose.py): donors, products per canvas, clutter.
  i.donor_splits = 'gallery'  # comma-separated; single-product splits only
  i.train_is_single_product = False  # allow 'train' as a donor split (its pairs are mixed)
  i.max_donors = 20000  # donors read into memory, at most (a seeded subset)
  i.donor_outliers = 'background'  # 'background' or 'instance' (see compose.py)
  i.min_products = 2
  i.max_products = 7
  i.max_clutter = 3  # clutter regions per pseudo-sample, at most
  i.hard_fraction = 0.9  # other donors drawn among the first's look-alikes ...
  i.hard_neighbours = 10  # ... its nearest donors in mean region feature
  # Model (model.ProposerModel).
  i.hidden_size = 128
  i.num_layers = 2
  i.num_heads = 4
  # Training (`python -m capture_jax.instances train`).
  i.batch_size = 32
  i.num_steps = 400
  i.learning_rate = 2e-3
  i.warmup_steps = 50
  i.weight_decay = 1e-4
  i.checkpoint_every = 200
  i.keep_last = 2
  i.log_every = 50
  i.progress_bar = True
  # Grouping rule of the learned proposer (model.group_regions).
  i.objectness_threshold = 0.5
  # Pasted instances come from different photos and so also differ in lighting,
  # which real instances of one photo share: affinities learned on pseudo-samples
  # are over-confident on real ones, so groups merge only on confident affinity.
  # 0.8 was chosen on the demo world's dev split (0.5 over-merges); measured in
  # docs/BENCHMARKS.md, section "Instance proposals (`capture_jax.instances`) on the demo world".
  i.affinity_threshold = 0.8
  i.propose_batch_size = 256  # samples scored together at inference
  return i


INSTANCES_RULES = {
    'boxes_iou': PROBABILITY,
    'boxes_containment': PROBABILITY,
    'boxes_min_area': PROBABILITY,
    'boxes_max_area': PROBABILITY,
    'donor_splits': Names('train', 'gallery'),  # single-product splits (see instances/trainer.py)
    'train_is_single_product': BOOL,
    'max_donors': COUNT,
    'donor_outliers': Choice('background', 'instance'),
    'min_products': COUNT,
    'max_products': COUNT,
    'max_clutter': NON_NEGATIVE_INT,
    'hard_fraction': PROBABILITY,
    'hard_neighbours': COUNT,
    'hidden_size': SIZE,
    'num_layers': COUNT,
    'num_heads': COUNT,
    'batch_size': COUNT,
    'num_steps': COUNT,
    'learning_rate': RATE,
    'warmup_steps': NON_NEGATIVE_INT,
    'weight_decay': WEIGHT,
    'checkpoint_every': COUNT,
    'keep_last': COUNT,
    'log_every': COUNT,
    'progress_bar': BOOL,
    'objectness_threshold': PROBABILITY,
    'affinity_threshold': PROBABILITY,
    'propose_batch_size': COUNT,
}


def base_config() -> ml_collections.ConfigDict:
  """Every field of a run; `configs/*.py` override from here."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = model_config()
  c.data = data_config()
  c.loss = loss_config()
  c.mesh = mesh_config()
  c.train = train_config()
  c.checkpoint = checkpoint_config()
  c.eval = eval_config()
  c.instances = instances_config()
  # One source of truth for the text length: the pipeline pads to the model's.
  c.data.max_text_len = c.model.get_ref('max_text_len')
  c.data.feature_dim = c.model.get_ref('v_feature_size')
  return c


# --------------------------------------------------------------------------
# The schema and its check.

# Field path -> its rule; one table per section, stated beside that section's defaults.
SCHEMA: dict[str, Rule] = {
    'seed': SEED,
    **{
        f'{section}.{name}': rule
        for section, rules in (
            ('model', MODEL_RULES),
            ('data', DATA_RULES),
            ('loss', LOSS_RULES),
            ('mesh', MESH_RULES),
            ('train', TRAIN_RULES),
            ('checkpoint', CHECKPOINT_RULES),
            ('eval', EVAL_RULES),
            ('instances', INSTANCES_RULES),
        )
        for name, rule in rules.items()
    },
}


def _heads_divide(width: str, heads: str) -> Callable[[dict[str, Any]], str | None]:
  def check(f: dict[str, Any]) -> str | None:
    if f[width] % f[heads]:
      return f'{width}={f[width]} is not a multiple of {heads}={f[heads]}'
    return None

  return check


def _at_most(
    small: str, large: str, strict: bool = False
) -> Callable[[dict[str, Any]], str | None]:
  def check(f: dict[str, Any]) -> str | None:
    if f[small] > f[large] or (strict and f[small] == f[large]):
      return f'{small}={f[small]} must be {"<" if strict else "<="} {large}={f[large]}'
    return None

  return check


def _visual_positions(f: dict[str, Any]) -> str | None:
  # The co-transformer puts the R + 1 visual tokens (global token first) at positions
  # max_text_len .. max_text_len + R; a position past the table would be clamped, silently.
  need = f['model.max_text_len'] + f['data.max_regions'] + 1
  if need > f['model.cross_max_position_embeddings']:
    return (
        f'model.max_text_len={f["model.max_text_len"]} + data.max_regions={f["data.max_regions"]}'
        f' + 1 = {need} positions exceed model.cross_max_position_embeddings='
        f'{f["model.cross_max_position_embeddings"]}'
    )
  return None


def _equal(a: str, b: str, why: str) -> Callable[[dict[str, Any]], str | None]:
  def check(f: dict[str, Any]) -> str | None:
    return f'{a}={f[a]} differs from {b}={f[b]} ({why})' if f[a] != f[b] else None

  return check


def _mask_recipe(f: dict[str, Any]) -> str | None:
  mask, rand = f['data.mlm_mask_probability'], f['data.mlm_random_probability']
  if mask + rand > 1:
    return (
        f'data.mlm_mask_probability={mask} + data.mlm_random_probability={rand} exceed 1 '
        '(they share the chosen tokens)'
    )
  return None


def _init_path(f: dict[str, Any]) -> str | None:
  if f['train.init'] != 'scratch' and not f['train.init_path']:
    return f'train.init={f["train.init"]!r} needs train.init_path'
  return None


def _one_fill_axis(f: dict[str, Any]) -> str | None:
  axes = {a: f[f'mesh.{a}'] for a in ('data', 'fsdp', 'tensor')}
  if list(axes.values()).count(-1) > 1:
    return f'at most one mesh axis may be -1 (fill the rest), got {axes}'
  return None


def _feature_dim(f: dict[str, Any]) -> str | None:
  if f['data.feature_dim'] != f['model.v_feature_size']:
    return (
        f'data.feature_dim={f["data.feature_dim"]} differs from model.v_feature_size='
        f'{f["model.v_feature_size"]}'
    )
  return None


def _vocab_splits(f: dict[str, Any]) -> str | None:
  if not any(s.strip() for s in f['data.vocab_splits'].split(',')):
    return "data.vocab_splits names no split: the vocab needs some titles (e.g. 'train,gallery')"
  return None


# What fields must satisfy together (each: the flat fields -> a problem, or None).
RELATIONS: tuple[Callable[[dict[str, Any]], str | None], ...] = (
    _heads_divide('model.hidden_size', 'model.num_attention_heads'),
    _heads_divide('model.v_hidden_size', 'model.v_num_attention_heads'),
    _heads_divide('model.bi_hidden_size', 'model.bi_num_attention_heads'),
    _heads_divide('model.cross_hidden_size', 'model.cross_num_attention_heads'),
    _heads_divide('instances.hidden_size', 'instances.num_heads'),
    _at_most('model.max_text_len', 'model.max_position_embeddings'),
    _visual_positions,
    _equal('data.max_text_len', 'model.max_text_len', 'the pipeline pads to the model length'),
    _feature_dim,
    _vocab_splits,
    _mask_recipe,
    _init_path,
    _one_fill_axis,
    _at_most('instances.min_products', 'instances.max_products'),
    _at_most('instances.boxes_min_area', 'instances.boxes_max_area', strict=True),
    _at_most('instances.warmup_steps', 'instances.num_steps'),
)


def flatten(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
  """Dotted field path -> value (sections are ConfigDicts or dicts; references resolved)."""
  out = {}

  def walk(node, prefix):
    for key, value in node.items():
      path = f'{prefix}{key}'
      if isinstance(value, (ml_collections.ConfigDict, dict)):
        walk(value, path + '.')
      else:
        out[path] = value

  walk(config, '')
  return out


def suggestion(path: str) -> str:
  """' (did you mean X?)' for an unknown field path, or ''."""
  close = difflib.get_close_matches(path, SCHEMA, n=1, cutoff=0.6)
  return f' (did you mean {close[0]}?)' if close else ''


def problems(config: ml_collections.ConfigDict | dict) -> list[str]:
  """Every way `config` breaks the schema: unknown, missing, mistyped or out-of-range fields,
  then the relations between fields (only when every field is valid). One line each."""
  fields = flatten(config)
  found = []
  for path, value in fields.items():
    rule = SCHEMA.get(path)
    if rule is None:
      found.append(f'unknown config field {path}{suggestion(path)}')
    elif not rule.accepts(value):
      found.append(f'config.{path}={value!r} is not allowed: expected {rule.allowed()}')
  found += [f'config.{path} is missing' for path in SCHEMA if path not in fields]
  if not found:
    found = [p for p in (relation(fields) for relation in RELATIONS) if p]
  return found


def validate(config: ml_collections.ConfigDict | dict) -> None:
  """Raises ConfigError (one line, every problem) unless `config` satisfies the schema: call it
  before anything compiles. The checks that depend on the devices (the batch split over the
  mesh) are the trainer's."""
  found = problems(config)
  if found:
    raise ConfigError('bad configuration: ' + '; '.join(found))


def check_or_exit(config: ml_collections.ConfigDict | dict) -> None:
  """`validate` for a command: a refusal prints one `error: ...` line and exits with status 1."""
  try:
    validate(config)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(1)


def unknown_override(arg: str) -> str | None:
  """The refusal of a command-line override `--config.PATH=V` whose PATH is no field, or None."""
  name = arg.lstrip('-').split('=', 1)[0]
  if '.' not in name:
    return None
  path = name.split('.', 1)[1]
  if path in SCHEMA:
    return None
  return f'unknown config field {path} in {arg}{suggestion(path)}'


def load_config_file(path: str | os.PathLike) -> ml_collections.ConfigDict:
  """`get_config()` of a config file such as `configs/demo.py` (for code that takes a config
  path; commands take `--config` through `ml_collections.config_flags`, which loads the same)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no config file {path}')
  spec = importlib.util.spec_from_file_location('_capture_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ValueError(f'{path} defines no get_config()')
  return module.get_config()
