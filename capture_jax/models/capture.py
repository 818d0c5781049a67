"""CAPTURE: the hybrid-stream transformer of Product1M (ICCV 2021).

The forward pass follows `shared/reference/capture_architecture.md` step by step:

1. text embeddings (word + position + token type, LN, dropout);
2. visual embeddings (`Dense(feat) + Dense(loc)`, LN, dropout);
3. text stream and visual stream: post-LN BERT layers, each with its own
   layer count (the release swaps the two counts; we do not);
4. encoder poolers on the first token of each stream (for the contrastive loss);
5. co-attention layers between the streams;
6. the joint pre-LN co-transformer over `[text ; visual]` with learned positions;
7. per-modality `Dense(-> bi_hidden) + ReLU`, pooled = first token;
8. MLM head (decoder tied to the word embeddings) and MRM head.

Any of the stacks may have zero layers, which gives the ablation variants:
`co_num_layers=0` is a single-stream model (joint transformer only after the
streams), `cross_num_layers=0` a two-stream model (co-attention only).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from capture_jax import batch as batch_lib
from capture_jax.models import layers

Array = jax.Array


def compute_dtype(name: str):
  try:
    return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[name]
  except KeyError:
    raise ValueError(f"model.dtype must be 'float32' or 'bfloat16', got {name!r}") from None


class TextEmbeddings(nn.Module):
  """`[B, T]` ids -> `[B, T, W]`: word + position + token type, then LN and dropout."""

  cfg: ml_collections.ConfigDict
  train: bool

  @nn.compact
  def __call__(self, word_embeds: Array, segment_ids: Array) -> Array:
    cfg = self.cfg
    embed = functools.partial(
        nn.Embed, features=cfg.hidden_size, embedding_init=layers.dense_init(cfg.initializer_range)
    )
    t = word_embeds.shape[1]
    x = (
        word_embeds
        + embed(cfg.max_position_embeddings, name='position_embeddings')(jnp.arange(t))[None]
        + embed(cfg.type_vocab_size, name='token_type_embeddings')(segment_ids)
    )
    x = nn.LayerNorm(cfg.layer_norm_eps, name='layer_norm')(x)
    return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=not self.train)


class VisualEmbeddings(nn.Module):
  """`[B, R+1, F]` features and `[B, R+1, 5]` boxes -> `[B, R+1, Wv]`."""

  cfg: ml_collections.ConfigDict
  dtype: Any
  train: bool

  @nn.compact
  def __call__(self, feat: Array, loc: Array) -> Array:
    cfg = self.cfg
    dense = functools.partial(
        nn.Dense,
        cfg.v_hidden_size,
        dtype=self.dtype,
        kernel_init=layers.dense_init(cfg.initializer_range),
    )
    x = dense(name='image_embeddings')(feat) + dense(name='location_embeddings')(loc)
    x = nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name='layer_norm')(x)
    return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=not self.train)


class PredictionHead(nn.Module):
  """`Dense(bi -> W)`, then BERT's transform (Dense, GELU, LN) `[.., W]`."""

  width: int
  cfg: ml_collections.ConfigDict
  dtype: Any

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dense = functools.partial(
        nn.Dense,
        self.width,
        dtype=self.dtype,
        kernel_init=layers.dense_init(self.cfg.initializer_range),
    )
    x = dense(name='input_projection')(x)
    x = layers.gelu_exact(dense(name='transform')(x))
    return nn.LayerNorm(self.cfg.layer_norm_eps, dtype=self.dtype, name='layer_norm')(x)


class CaptureModel(nn.Module):
  """The hybrid-stream transformer with its MLM and MRM heads.

  `apply({'params': p}, batch, train=False)` takes the batch dict
  (`input_ids, input_mask, segment_ids [B, T]`, `image_feat [B, R+1, F]`,
  `image_loc [B, R+1, 5]`, `image_mask [B, R+1]`; row 0 of the visual inputs is
  the global token) and returns a dict:

  | key | shape |
  | --- | --- |
  | `mlm_logits` | `[B, T, vocab]` float32 |
  | `mrm_pred` | `[B, R, v_target_size]` float32 (global token dropped) |
  | `pooled_text`, `pooled_visual` | `[B, bi]` first token of the sequences below |
  | `sequence_text`, `sequence_visual` | `[B, T, bi]`, `[B, R+1, bi]` final outputs |
  | `enc_pooled_text`, `enc_pooled_visual` | `[B, bi]` encoder poolers (contrastive loss) |
  | `text_after_coattention`, `visual_after_coattention` | `[B, T, W]`, `[B, R+1, Wv]` |

  With `mlm_logits=False` the `[B, T, vocab]` logits are not computed; instead
  the MLM head's input to its decoder and the tied decoder itself come out, so
  that a loss can decode only the positions that carry a label
  (`losses.mlm_loss_at_labels`):

  | key | shape |
  | --- | --- |
  | `mlm_hidden` | `[B, T, W]` float32, the head's transform output |
  | `mlm_decoder` | `[vocab, W]`, the word embedding matrix (tied decoder) |
  | `mlm_decoder_bias` | `[vocab]` |
  """

  config: ml_collections.ConfigDict  # the `model` section

  @nn.compact
  def __call__(
      self, batch: Mapping[str, Array], train: bool = False, mlm_logits: bool = True
  ) -> dict[str, Array]:
    cfg = self.config
    batch_lib.validate_model_inputs(batch, cfg)
    dtype = compute_dtype(cfg.dtype)
    init_std = cfg.initializer_range
    stack = functools.partial(layers.LayerStack, scan=cfg.scan_layers, remat=cfg.remat)
    common = dict(
        layer_norm_eps=cfg.layer_norm_eps,
        init_std=init_std,
        dtype=dtype,
        attention_impl=cfg.attention_impl,
        train=train,
    )
    dropout = dict(
        hidden_dropout=cfg.hidden_dropout_prob, attention_dropout=cfg.attention_probs_dropout_prob
    )

    input_mask = batch['input_mask']
    image_mask = batch['image_mask']
    t_bias = layers.additive_key_mask(input_mask, layers.BERT_MASK_VALUE)
    v_bias = layers.additive_key_mask(image_mask, layers.BERT_MASK_VALUE)

    # 1-2. Embeddings. The word embedding matrix is shared with the MLM decoder.
    word_embeddings = nn.Embed(
        cfg.vocab_size,
        cfg.hidden_size,
        name='word_embeddings',
        embedding_init=layers.dense_init(init_std),
    )
    t = TextEmbeddings(cfg, train, name='text_embeddings')(
        word_embeddings(batch['input_ids']), batch['segment_ids']
    ).astype(dtype)
    v = VisualEmbeddings(cfg, dtype, train, name='visual_embeddings')(
        batch['image_feat'].astype(dtype), batch['image_loc'].astype(dtype)
    )

    # 3. The two streams, each with its own layer count.
    def stream(num_layers: int, num_heads: int, intermediate_size: int, name: str):
      settings = dict(num_heads=num_heads, intermediate_size=intermediate_size, **dropout, **common)
      return stack(layers.PostLNLayer, num_layers, settings, name=name)

    t = stream(
        cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size, 'text_stream'
    )(t, t_bias)
    v = stream(
        cfg.v_num_hidden_layers, cfg.v_num_attention_heads, cfg.v_intermediate_size, 'visual_stream'
    )(v, v_bias)

    # 4. Encoder poolers: first token of each stream -> Dense -> ReLU.
    pooler = functools.partial(
        nn.Dense, cfg.bi_hidden_size, dtype=dtype, kernel_init=layers.dense_init(init_std)
    )
    enc_pooled_text = nn.relu(pooler(name='text_encoder_pooler')(t[:, 0]))
    enc_pooled_visual = nn.relu(pooler(name='visual_encoder_pooler')(v[:, 0]))

    # 5. Co-attention between the streams.
    v, t = stack(
        layers.CoAttentionLayer,
        cfg.co_num_layers,
        dict(
            bi_hidden_size=cfg.bi_hidden_size,
            num_heads=cfg.bi_num_attention_heads,
            v_intermediate_size=cfg.v_intermediate_size,
            t_intermediate_size=cfg.intermediate_size,
            **dropout,
            **common,
        ),
        name='coattention',
    )((v, t), v_bias, t_bias)
    text_after_coattention, visual_after_coattention = t, v

    # 6. Joint co-transformer over [text ; visual].
    num_text = t.shape[1]
    if cfg.cross_num_layers:
      if cfg.hidden_size != cfg.v_hidden_size or cfg.hidden_size != cfg.cross_hidden_size:
        raise ValueError(
            'the co-transformer concatenates the streams: hidden_size, v_hidden_size and '
            f'cross_hidden_size must be equal, got {cfg.hidden_size}, {cfg.v_hidden_size}, '
            f'{cfg.cross_hidden_size}'
        )
      x = jnp.concatenate([t, v], axis=1)
      # Visual tokens start at position max_text_len whatever the padded text
      # length (equal to the release, which always pads text to max_text_len).
      position_ids = jnp.concatenate(
          [jnp.arange(num_text), cfg.max_text_len + jnp.arange(v.shape[1])]
      )
      positions = nn.Embed(
          cfg.cross_max_position_embeddings,
          cfg.cross_hidden_size,
          embedding_init=layers.dense_init(init_std),
          name='cross_position_embeddings',
      )(position_ids)
      x = nn.Dropout(cfg.hidden_dropout_prob)(
          x + positions[None].astype(dtype), deterministic=not train
      )
      joint_mask = jnp.concatenate([input_mask, image_mask], axis=1)
      x = stack(
          layers.PreLNBlock,
          cfg.cross_num_layers,
          dict(num_heads=cfg.cross_num_attention_heads, mlp_ratio=cfg.cross_mlp_ratio, **common),
          name='co_transformer',
      )(x, layers.additive_key_mask(joint_mask, layers.CLIP_MASK_VALUE))
      t, v = x[:, :num_text], x[:, num_text:]

    # 7. Per-modality projections; pooled output = first token.
    proj = functools.partial(
        nn.Dense, cfg.bi_hidden_size, dtype=dtype, kernel_init=layers.dense_init(init_std)
    )
    sequence_text = nn.relu(proj(name='text_projection')(t))
    sequence_visual = nn.relu(proj(name='visual_projection')(v))

    # 8. Heads. MLM decoder tied to the word embeddings, plus its own bias.
    h = PredictionHead(cfg.hidden_size, cfg, dtype, name='mlm_head')(sequence_text)
    mlm_bias = self.param('mlm_bias', nn.initializers.zeros, (cfg.vocab_size,))
    if mlm_logits:
      mlm_out = {'mlm_logits': word_embeddings.attend(h.astype(jnp.float32)) + mlm_bias}
    else:
      mlm_out = {
          'mlm_hidden': h.astype(jnp.float32),
          'mlm_decoder': word_embeddings.embedding,
          'mlm_decoder_bias': mlm_bias,
      }
    h = PredictionHead(cfg.v_hidden_size, cfg, dtype, name='mrm_head')(sequence_visual[:, 1:])
    mrm_pred = nn.Dense(
        cfg.v_target_size, dtype=dtype, kernel_init=layers.dense_init(init_std), name='mrm_decoder'
    )(h)

    f32 = lambda a: a.astype(jnp.float32)
    return {
        **mlm_out,
        'mrm_pred': f32(mrm_pred),
        'pooled_text': f32(sequence_text[:, 0]),
        'pooled_visual': f32(sequence_visual[:, 0]),
        'sequence_text': f32(sequence_text),
        'sequence_visual': f32(sequence_visual),
        'enc_pooled_text': f32(enc_pooled_text),
        'enc_pooled_visual': f32(enc_pooled_visual),
        'text_after_coattention': f32(text_after_coattention),
        'visual_after_coattention': f32(visual_after_coattention),
    }


def init_params(model: CaptureModel, rng: jax.Array, batch: Mapping[str, Array]):
  """Parameters of `model` for inputs shaped like `batch` (float32)."""
  return model.init({'params': rng}, batch, train=False)['params']
