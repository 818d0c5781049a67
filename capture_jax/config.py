"""The one place where every configuration field is defined, with its default.

`configs/*.py` start from `base_config()` and override sizes; the command-line
tools load those files with `ml_collections.config_flags` so any field can be
overridden (`--config.train.batch_size=128`). Library code reads fields only
from the `ConfigDict` it is given: no module keeps its own defaults.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections


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
  m.attention_impl = (
      'xla'  # 'xla' (explicit einsums) or 'dot_product_attention' (jax.nn, cuDNN on GPU)
  )
  m.remat = False  # rematerialise each layer in the backward pass
  m.scan_layers = False  # nn.scan over identical layers (faster compiles, stacked params)
  return m


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
  # Synthetic world (`python -m capture_jax.data.synthetic`).
  d.synthetic_preset = 'demo'
  d.synthetic_seed = 0
  d.feature_format = 'tsv'  # 'tsv' (base64 rows) or 'npz' (one file per image)
  d.vocab_size = 2000  # WordPiece vocab trained on the captions (at most)
  return d


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
  # (as on GPU/TPU) instead of its rolled CPU loop. Measured alternating (docs/BENCHMARKS.md,
  # "Where the step's time goes"): the demo step 1.08-1.13x faster, capture_paper 0.89x
  # (slower), so off by default and on in configs/demo.py (training/rng_lowering.py).
  t.cpu_unrolled_threefry = False
  return t


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


def eval_config() -> ml_collections.ConfigDict:
  """Embedding export and retrieval evaluation (`capture_jax.export`, `capture_jax.evaluate`)."""
  e = ml_collections.ConfigDict()
  # 'fused' (L2-normalised [text ; visual] final pooled vectors), 'text', 'visual',
  # or 'encoder' (the encoder poolers, fused the same way).
  e.embedding = 'fused'
  # `encoder` only: the text poolers' share of the cosine (0.5: text and visual equally; see
  # evaluation/embeddings.py). Lower it for titles unlike the training captions.
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
  # 0.8 was chosen on the demo world's dev split (0.5 over-merges); see
  # docs in capture_jax/instances/__init__.py for the measured figures.
  i.affinity_threshold = 0.8
  i.propose_batch_size = 256  # samples scored together at inference
  return i


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
