"""Transformer building blocks of CAPTURE, as pure-functional Flax Linen modules.

Three layer kinds appear in the released model:

* `PostLNLayer`: a BERT layer (self-attention, `LN(x + h)`, FFN, `LN(x + h)`),
  used by the text and the visual stream.
* `CoAttentionLayer`: ViLBERT's co-attention ("cross-transformer") layer: each
  stream attends to the other, then runs its own post-LN FFN block.
* `PreLNBlock`: the CLIP-style residual block of the joint co-transformer
  (`x + MHA(LN(x))`, `x + MLP(LN(x))` with QuickGELU).

Every layer takes the additive key mask bias it needs (`[B, 1, 1, K]`); the
value used for masked keys is part of the released computation (-10000 in the
BERT-style layers, -1e6 in the co-transformer). A layer's `__call__` has the
`(carry, broadcast...) -> (carry, None)` form so it can be stacked with
`nn.scan` (see `LayerStack`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

# Mask values of the release: BERT-style layers use -10000, the CLIP-style
# co-transformer -1e6. Both underflow to an exact 0 after softmax in float32.
BERT_MASK_VALUE = -10000.0
CLIP_MASK_VALUE = -1e6


def dense_init(stddev: float) -> Callable[..., Array]:
  return nn.initializers.normal(stddev=stddev)


def additive_key_mask(mask: Array, mask_value: float) -> Array:
  """`[B, K]` 1/0 validity mask -> `[B, 1, 1, K]` additive float32 bias.

  Each sample is masked with its own mask (the release's co-transformer tiles
  the mask head-major and mixes samples up; we do not copy that defect).
  """
  return ((1.0 - mask.astype(jnp.float32)) * mask_value)[:, None, None, :]


def quick_gelu(x: Array) -> Array:
  return x * jax.nn.sigmoid(1.702 * x)


def gelu_exact(x: Array) -> Array:
  return nn.gelu(x, approximate=False)


# `model.attention_impl` -> `jax.nn.dot_product_attention(implementation=...)`; 'xla' is ours.
FUSED_ATTENTION = {'dot_product_attention': None, 'cudnn': 'cudnn'}
ATTENTION_IMPLS = ('xla',) + tuple(FUSED_ATTENTION)


def check_attention_impl(
    impl: str, dtype: str, platform: str, training_lengths: dict[str, int] | None = None
) -> None:
  """Raises ValueError where `model.attention_impl` cannot run: cuDNN's fused attention needs
  an NVIDIA GPU ('gpu'/'cuda' platform), a 16-bit compute dtype and, in training with a mask
  (ours: padding), even sequence lengths (jax 0.10.2's `check_is_flash_attention`);
  `training_lengths` names each attention's sequence length for that check."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f'model.attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}')
  if impl != 'cudnn':
    return
  if platform not in ('gpu', 'cuda'):
    raise ValueError(
        f"model.attention_impl='cudnn' runs only on NVIDIA GPUs, but the devices are {platform}; "
        "use 'xla' (or 'dot_product_attention')"
    )
  if dtype not in ('bfloat16', 'float16'):
    raise ValueError(
        f"model.attention_impl='cudnn' needs model.dtype='bfloat16' (cuDNN's fused attention "
        f'has no float32 kernel), got {dtype!r}'
    )
  odd = {k: n for k, n in (training_lengths or {}).items() if n % 2}
  if odd:
    raise ValueError(
        "model.attention_impl='cudnn' trains only on even sequence lengths (cuDNN's masked "
        f'fused attention at jax 0.10.2), but {odd} are odd; with 36 text tokens an odd '
        'data.max_regions (e.g. 35: 36 visual tokens, 72 joint) makes every length even'
    )


def attend(
    q: Array,
    k: Array,
    v: Array,
    bias: Array,
    *,
    impl: str,
    dropout: nn.Dropout | None = None,
    deterministic: bool = True,
) -> Array:
  """Scaled dot-product attention with an additive key bias.

  Args:
    q: `[B, Q, H, D]`, k and v: `[B, K, H, D]`.
    bias: `[B, 1, 1, K]` additive float32 bias (0 at valid keys).
    impl: one of `ATTENTION_IMPLS`. 'xla' computes softmax(q k^T / sqrt(D) + bias)
      explicitly, in float32, with dropout on the probabilities (the released numerics).
      'dot_product_attention' calls `jax.nn.dot_product_attention` with
      `implementation=None`, which at jax 0.10.2 is XLA's own composition on every platform
      (no cuDNN call in the compiled GPU program); 'cudnn' asks it for cuDNN's fused
      attention (NVIDIA GPUs, bf16/fp16 only: `check_attention_impl` refuses it elsewhere).
      The fused paths take no dropout, so attention-probability dropout is not applied there.
  Returns:
    `[B, Q, H, D]` in q's dtype.
  """
  depth = q.shape[-1]
  if impl in FUSED_ATTENTION:
    # Boolean key mask: the fused kernel's bias path adds a [B,H,Q,K] operand.
    key_valid = jnp.broadcast_to(
        bias > (BERT_MASK_VALUE / 2), (q.shape[0], 1, q.shape[1], k.shape[1])
    )
    return jax.nn.dot_product_attention(
        q, k, v, mask=key_valid, implementation=FUSED_ATTENTION[impl]
    )
  if impl != 'xla':
    raise ValueError(f'model.attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}')
  scores = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
  scores = scores / jnp.sqrt(jnp.float32(depth)) + bias
  probs = jax.nn.softmax(scores, axis=-1)
  if dropout is not None:
    probs = dropout(probs, deterministic=deterministic)
  return jnp.einsum('bhqk,bkhd->bqhd', probs.astype(v.dtype), v)


class MultiHeadProjection(nn.Module):
  """Dense `[..., in] -> [..., heads, width/heads]` (a split of one Dense)."""

  width: int
  num_heads: int
  dtype: Dtype
  init_std: float

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.width % self.num_heads:
      raise ValueError(f'attention width {self.width} is not divisible by {self.num_heads} heads')
    y = nn.Dense(self.width, dtype=self.dtype, kernel_init=dense_init(self.init_std), name='dense')(
        x
    )
    return y.reshape(y.shape[:-1] + (self.num_heads, self.width // self.num_heads))


class FeedForward(nn.Module):
  """`Dense(width -> hidden) -> act -> Dense(hidden -> width)`."""

  hidden: int
  activation: Callable[[Array], Array]
  dtype: Dtype
  init_std: float

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=dense_init(self.init_std))
    h = self.activation(dense(self.hidden, name='intermediate')(x))
    return dense(x.shape[-1], name='output')(h)


class LayerSettings(nn.Module):
  """The attributes every transformer layer of the model takes (`PostLNLayer`,
  `CoAttentionLayer`): dropout rates, LayerNorm epsilon, initialiser scale, compute dtype,
  attention implementation, and whether it trains (dropout on)."""

  hidden_dropout: float
  attention_dropout: float
  layer_norm_eps: float
  init_std: float
  dtype: Dtype
  attention_impl: str
  train: bool


class PostLNLayer(LayerSettings):
  """One BERT layer: `LN(x + Drop(Dense(Attn(x))))`, then `LN(x + Drop(FFN(x)))`.

  Carry: `[B, L, W]` hidden states; broadcast: `[B, 1, 1, L]` additive key bias.
  """

  num_heads: int
  intermediate_size: int

  @nn.compact
  def __call__(self, x: Array, bias: Array) -> tuple[Array, None]:
    width = x.shape[-1]
    heads = functools.partial(MultiHeadProjection, width, self.num_heads, self.dtype, self.init_std)
    ctx = attend(
        heads(name='query')(x),
        heads(name='key')(x),
        heads(name='value')(x),
        bias,
        impl=self.attention_impl,
        dropout=nn.Dropout(self.attention_dropout),
        deterministic=not self.train,
    )
    ctx = ctx.reshape(ctx.shape[:2] + (width,))
    h = nn.Dense(
        width, dtype=self.dtype, kernel_init=dense_init(self.init_std), name='attention_output'
    )(ctx)
    h = nn.Dropout(self.hidden_dropout)(h, deterministic=not self.train)
    x = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name='attention_layer_norm')(x + h)
    h = FeedForward(self.intermediate_size, gelu_exact, self.dtype, self.init_std, name='ffn')(x)
    h = nn.Dropout(self.hidden_dropout)(h, deterministic=not self.train)
    x = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name='ffn_layer_norm')(x + h)
    return x, None


class CoAttentionLayer(LayerSettings):
  """ViLBERT co-attention layer on (visual, text).

  Carry: `(v [B, R+1, Wv], t [B, T, Wt])`; broadcast: the visual and text
  additive key biases. Queries, keys and values are projected to
  `bi_hidden_size`; the text side attends to visual keys and vice versa.
  """

  bi_hidden_size: int
  num_heads: int
  v_intermediate_size: int
  t_intermediate_size: int

  @nn.compact
  def __call__(
      self, carry: tuple[Array, Array], v_bias: Array, t_bias: Array
  ) -> tuple[tuple[Array, Array], None]:
    v, t = carry
    det = not self.train
    heads = functools.partial(
        MultiHeadProjection, self.bi_hidden_size, self.num_heads, self.dtype, self.init_std
    )
    q1, k1, v1 = heads(name='query1')(v), heads(name='key1')(v), heads(name='value1')(v)
    q2, k2, v2 = heads(name='query2')(t), heads(name='key2')(t), heads(name='value2')(t)
    drop = nn.Dropout(self.attention_dropout)
    text_ctx = attend(q2, k1, v1, v_bias, impl=self.attention_impl, dropout=drop, deterministic=det)
    visual_ctx = attend(
        q1, k2, v2, t_bias, impl=self.attention_impl, dropout=drop, deterministic=det
    )
    text_ctx = text_ctx.reshape(text_ctx.shape[:2] + (self.bi_hidden_size,))
    visual_ctx = visual_ctx.reshape(visual_ctx.shape[:2] + (self.bi_hidden_size,))

    dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=dense_init(self.init_std))
    norm = functools.partial(nn.LayerNorm, self.layer_norm_eps, dtype=self.dtype)
    hidden_drop = nn.Dropout(self.hidden_dropout)
    v = norm(name='layer_norm1')(
        v + hidden_drop(dense(v.shape[-1], name='dense1')(visual_ctx), deterministic=det)
    )
    t = norm(name='layer_norm2')(
        t + hidden_drop(dense(t.shape[-1], name='dense2')(text_ctx), deterministic=det)
    )

    hv = FeedForward(self.v_intermediate_size, gelu_exact, self.dtype, self.init_std, name='v_ffn')(
        v
    )
    v = norm(name='v_ffn_layer_norm')(v + hidden_drop(hv, deterministic=det))
    ht = FeedForward(self.t_intermediate_size, gelu_exact, self.dtype, self.init_std, name='t_ffn')(
        t
    )
    t = norm(name='t_ffn_layer_norm')(t + hidden_drop(ht, deterministic=det))
    return (v, t), None


class PreLNBlock(nn.Module):
  """CLIP residual block: `x + MHA(LN_1(x))`, then `x + c_proj(QuickGELU(c_fc(LN_2(x))))`.

  Carry: `[B, L, W]`; broadcast: `[B, 1, 1, L]` additive key bias (-1e6 at padding).
  """

  num_heads: int
  mlp_ratio: int
  layer_norm_eps: float
  init_std: float
  dtype: Dtype
  attention_impl: str
  train: bool

  @nn.compact
  def __call__(self, x: Array, bias: Array) -> tuple[Array, None]:
    width = x.shape[-1]
    norm = functools.partial(nn.LayerNorm, self.layer_norm_eps, dtype=self.dtype)
    h = norm(name='ln_1')(x)
    heads = functools.partial(MultiHeadProjection, width, self.num_heads, self.dtype, self.init_std)
    ctx = attend(
        heads(name='query')(h),
        heads(name='key')(h),
        heads(name='value')(h),
        bias,
        impl=self.attention_impl,
    )
    ctx = ctx.reshape(ctx.shape[:2] + (width,))
    x = x + nn.Dense(
        width, dtype=self.dtype, kernel_init=dense_init(self.init_std), name='out_proj'
    )(ctx)
    h = FeedForward(width * self.mlp_ratio, quick_gelu, self.dtype, self.init_std, name='mlp')(
        norm(name='ln_2')(x)
    )
    return x + h, None


class LayerStack(nn.Module):
  """`num_layers` copies of `layer` applied in sequence.

  With `scan=False`, layers are named `layer_0 .. layer_{n-1}`; with
  `scan=True` one `nn.scan` over a module named `scanned` holds every
  parameter with a leading `[num_layers]` axis (one compiled layer body,
  faster compiles). `remat=True` rematerialises each layer's activations in
  the backward pass. `layer_kwargs` are the layer's attributes; the call
  arguments are `(carry, *broadcast)`.
  """

  layer: type[nn.Module]
  num_layers: int
  layer_kwargs: dict
  scan: bool = False
  remat: bool = False

  @nn.compact
  def __call__(self, carry, *broadcast):
    if self.num_layers == 0:
      return carry
    layer_cls = nn.remat(self.layer, prevent_cse=not self.scan) if self.remat else self.layer
    if self.scan:
      scanned = nn.scan(
          layer_cls,
          variable_axes={'params': 0},
          split_rngs={'params': True, 'dropout': True},
          in_axes=(nn.broadcast,) * len(broadcast),
          length=self.num_layers,
      )
      carry, _ = scanned(**self.layer_kwargs, name='scanned')(carry, *broadcast)
      return carry
    for i in range(self.num_layers):
      carry, _ = layer_cls(**self.layer_kwargs, name=f'layer_{i}')(carry, *broadcast)
    return carry
