"""A tiny CAPTURE of the same architecture that pretrains in minutes on a 2-core CPU (`make demo`)."""

from capture_jax import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  m = c.model
  m.vocab_size = 2000  # replaced by the size of the trained demo vocab
  m.max_position_embeddings = 64
  m.hidden_size = 128
  m.num_attention_heads = 4
  m.intermediate_size = 256
  m.num_hidden_layers = 2
  m.v_feature_size = 256
  m.v_target_size = 256
  m.v_hidden_size = 128
  m.v_num_attention_heads = 4
  m.v_intermediate_size = 256
  m.v_num_hidden_layers = 2
  m.bi_hidden_size = 128
  m.bi_num_attention_heads = 4
  m.co_num_layers = 2
  m.cross_hidden_size = 128
  m.cross_num_attention_heads = 4
  m.cross_num_layers = 2
  m.cross_max_position_embeddings = 64
  m.max_text_len = 24
  c.data.max_regions = 16
  c.data.feature_dim = 256  # the demo world's region features; = model.v_feature_size
  c.data.synthetic_preset = 'demo'  # ~280 products, 6,000 training pairs, 300 dev queries
  c.data.batch_size = 64
  # Trained from scratch (the release starts its text stream from BERT): a
  # random text stream gives every caption nearly the same first token, and the
  # released NT-Xent, whose intra-modal negatives then dominate, collapses all
  # vectors to one point (loss stuck at ln(2B-1)). The CLIP-style loss (no
  # intra-modal negatives) leaves that plateau. Measured: docs/BENCHMARKS.md, section
  # "Demo pretraining recipe", and `make ablation`.
  c.loss.contrastive = 'clip'
  # Retrieve with the vectors the contrastive loss trains (the encoder poolers): better than
  # the default `fused` (final pooled outputs) on the demo world's dev split, measured in
  # docs/BENCHMARKS.md, section "Instance proposals (`capture_jax.instances`) on the demo world".
  c.eval.embedding = 'encoder'
  # The text poolers get a quarter of the `encoder` cosine, not half (retrieval/embedding.py):
  # a text stream trained from scratch on a few thousand captions reads unseen titles badly,
  # and the visual pooler carries more of the match. Chosen on dev splits only: it helps on the
  # default world and on worlds built from real annotations, so `make demo` uses one recipe for
  # both (the 2,000-step real-titles recipe did worse on held-out real titles); the figures are
  # in docs/BENCHMARKS.md ("Held-out real titles").
  c.eval.encoder_text_weight = 0.25
  # Instance queries from the learned proposer (trained by the demo's stage 4), with the box
  # rule and the oracle sidecar (an upper bound) as extra rows of the report.
  c.eval.compare_proposers = True
  c.train.num_steps = 600
  c.train.learning_rate = 1e-3  # a tiny model trained briefly: 10x the paper's lr
  c.train.warmup_fraction = 0.05
  c.train.log_every = 10
  # Dropout masks from the unrolled threefry: the same bits, a faster demo step on CPU
  # (capture_jax/training/rng_lowering.py; measured in docs/BENCHMARKS.md, section "Where the
  # step's time goes").
  c.train.cpu_unrolled_threefry = True
  c.checkpoint.every_steps = 50
  return c
