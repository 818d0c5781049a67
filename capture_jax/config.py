"""The one place where every configuration field is defined, with its default.

`configs/*.py` start from `base_config()` and override sizes; the command-line
tools load those files with `ml_collections.config_flags` so any field can be
overridden (`--config.train.batch_size=128`). Library code reads fields only
from the `ConfigDict` it is given: no module keeps its own defaults.
"""

from __future__ import annotations

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
  # Architecture variants for ablations: 'hybrid' (the paper), 'single_stream'
  # (co-transformer only, no co-attention layers) or 'two_stream' (co-attention
  # only, no co-transformer).
  m.architecture = 'hybrid'
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
  m.attention_impl = 'xla'  # 'xla' (explicit einsums) or 'dot_product_attention' (jax.nn, cuDNN on GPU)
  m.remat = False  # rematerialise each layer in the backward pass
  m.scan_layers = False  # nn.scan over identical layers (faster compiles, stacked params)
  return m


def data_config() -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  d.data_dir = ''  # folder with the annotation files + region features
  d.tfds_dir = ''  # where the TFDS `product1m` builder writes its ArrayRecords
  d.vocab_file = ''  # WordPiece vocab.txt
  d.max_text_len = 36
  d.max_regions = 36
  d.mlm_probability = 0.15
  d.mrm_probability = 0.15
  d.mrm_zero_probability = 0.9
  d.shuffle_seed = 0
  d.num_workers = 0  # Grain worker processes (0 = in the main process)
  d.skip_bad = False
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
  return l


def base_config() -> ml_collections.ConfigDict:
  """Every field of a run; `configs/*.py` override from here."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = model_config()
  c.data = data_config()
  c.loss = loss_config()
  return c
