"""A PyTorch peer of CAPTURE, for benchmarking only (not part of the library).

Written from `shared/reference/capture_architecture.md`, not copied from the
release. Its parameter names are the release's `state_dict` names, so it loads
a released checkpoint (or `release_fixture/state_dict.npz`) directly; it is
proven equal to the release by `tests/test_torch_peer.py`.

It is the model a PyTorch user would write today: `F.scaled_dot_product_attention`
(with dropout on the attention probabilities in training), the decoder tied to
the word embeddings, the per-sample co-transformer mask (not the release's mixed
one), and `torch.optim.AdamW(foreach=True)` in `make_train_step`. Like the
release it computes MLM logits at every text position.

Sizes come from our `model` config (`capture_jax.config.model_config`), so the
peer and our model are built from one config.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

BERT_MASK_VALUE = -10000.0
CLIP_MASK_VALUE = -1e6


def _linear(i: int, o: int, std: float, bias: bool = True) -> nn.Linear:
  layer = nn.Linear(i, o, bias=bias)
  nn.init.normal_(layer.weight, std=std)
  if bias:
    nn.init.zeros_(layer.bias)
  return layer


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
  """`[B, L, W]` -> `[B, H, L, W/H]`."""
  b, l, w = x.shape
  return x.view(b, l, num_heads, w // num_heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
  """`[B, H, L, D]` -> `[B, L, H*D]`."""
  b, h, l, d = x.shape
  return x.transpose(1, 2).reshape(b, l, h * d)


class _LN(nn.LayerNorm):

  def __init__(self, width: int, eps: float):
    super().__init__(width, eps=eps)


class _Dense(nn.Module):
  """A module holding `dense` (release names like `t_pooler.dense`)."""

  def __init__(self, i, o, std):
    super().__init__()
    self.dense = _linear(i, o, std)


class _SelfAttention(nn.Module):

  def __init__(self, width, std):
    super().__init__()
    self.query = _linear(width, width, std)
    self.key = _linear(width, width, std)
    self.value = _linear(width, width, std)


class _AttentionOutput(nn.Module):

  def __init__(self, width, std, eps):
    super().__init__()
    self.dense = _linear(width, width, std)
    self.LayerNorm = _LN(width, eps)  # pylint: disable=invalid-name


class _Attention(nn.Module):

  def __init__(self, width, std, eps):
    super().__init__()
    setattr(self, 'self', _SelfAttention(width, std))
    self.output = _AttentionOutput(width, std, eps)


class _Output(nn.Module):

  def __init__(self, i, o, std, eps):
    super().__init__()
    self.dense = _linear(i, o, std)
    self.LayerNorm = _LN(o, eps)  # pylint: disable=invalid-name


class BertLayer(nn.Module):
  """Post-LN BERT layer (text or visual stream)."""

  def __init__(self, width, heads, ffn, p_hidden, p_attn, std, eps):
    super().__init__()
    self.heads, self.p_hidden, self.p_attn = heads, p_hidden, p_attn
    self.attention = _Attention(width, std, eps)
    self.intermediate = _Dense(width, ffn, std)
    self.output = _Output(ffn, width, std, eps)

  def forward(self, x, bias):
    sa = getattr(self.attention, 'self')
    q, k, v = (_heads(m(x), self.heads) for m in (sa.query, sa.key, sa.value))
    ctx = F.scaled_dot_product_attention(
        q, k, v, attn_mask=bias, dropout_p=self.p_attn if self.training else 0.0
    )
    h = F.dropout(self.attention.output.dense(_merge(ctx)), self.p_hidden, self.training)
    x = self.attention.output.LayerNorm(x + h)
    h = self.output.dense(F.gelu(self.intermediate.dense(x)))
    return self.output.LayerNorm(x + F.dropout(h, self.p_hidden, self.training))


class _BiAttention(nn.Module):

  def __init__(self, wv, wt, bi, std):
    super().__init__()
    self.query1, self.key1, self.value1 = (_linear(wv, bi, std) for _ in range(3))
    self.query2, self.key2, self.value2 = (_linear(wt, bi, std) for _ in range(3))


class _BiOutput(nn.Module):

  def __init__(self, wv, wt, bi, std, eps):
    super().__init__()
    self.dense1 = _linear(bi, wv, std)
    self.LayerNorm1 = _LN(wv, eps)  # pylint: disable=invalid-name
    self.q_dense1 = _linear(bi, wv, std)  # in the checkpoint, unused
    self.dense2 = _linear(bi, wt, std)
    self.LayerNorm2 = _LN(wt, eps)  # pylint: disable=invalid-name
    self.q_dense2 = _linear(bi, wt, std)  # in the checkpoint, unused


class CoAttentionLayer(nn.Module):
  """ViLBERT co-attention on (visual, text), then each side's post-LN FFN."""

  def __init__(self, c, p_hidden, p_attn, std, eps):
    super().__init__()
    wv, wt, bi = c.v_hidden_size, c.hidden_size, c.bi_hidden_size
    self.heads, self.p_hidden, self.p_attn = c.bi_num_attention_heads, p_hidden, p_attn
    self.biattention = _BiAttention(wv, wt, bi, std)
    self.biOutput = _BiOutput(wv, wt, bi, std, eps)  # pylint: disable=invalid-name
    self.v_intermediate = _Dense(wv, c.v_intermediate_size, std)
    self.v_output = _Output(c.v_intermediate_size, wv, std, eps)
    self.t_intermediate = _Dense(wt, c.intermediate_size, std)
    self.t_output = _Output(c.intermediate_size, wt, std, eps)

  def forward(self, v, t, v_bias, t_bias):
    a, o = self.biattention, self.biOutput
    p = self.p_attn if self.training else 0.0
    h = lambda m, x: _heads(m(x), self.heads)
    text_ctx = F.scaled_dot_product_attention(
        h(a.query2, t), h(a.key1, v), h(a.value1, v), attn_mask=v_bias, dropout_p=p
    )
    visual_ctx = F.scaled_dot_product_attention(
        h(a.query1, v), h(a.key2, t), h(a.value2, t), attn_mask=t_bias, dropout_p=p
    )
    drop = lambda x: F.dropout(x, self.p_hidden, self.training)
    v = o.LayerNorm1(v + drop(o.dense1(_merge(visual_ctx))))
    t = o.LayerNorm2(t + drop(o.dense2(_merge(text_ctx))))
    hv = self.v_output.dense(F.gelu(self.v_intermediate.dense(v)))
    v = self.v_output.LayerNorm(v + drop(hv))
    ht = self.t_output.dense(F.gelu(self.t_intermediate.dense(t)))
    t = self.t_output.LayerNorm(t + drop(ht))
    return v, t


class _PackedAttention(nn.Module):
  """`nn.MultiheadAttention`'s parameter names, per-sample key mask."""

  def __init__(self, width, std):
    super().__init__()
    self.in_proj_weight = nn.Parameter(torch.randn(3 * width, width) * std)
    self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
    self.out_proj = _linear(width, width, std)


class _MLP(nn.Module):

  def __init__(self, width, hidden, std):
    super().__init__()
    self.c_fc = _linear(width, hidden, std)
    self.c_proj = _linear(hidden, width, std)


class ResBlock(nn.Module):
  """CLIP pre-LN block with QuickGELU."""

  def __init__(self, width, heads, mlp_ratio, std, eps):
    super().__init__()
    self.heads = heads
    self.attn = _PackedAttention(width, std)
    self.ln_1 = _LN(width, eps)
    self.mlp = _MLP(width, width * mlp_ratio, std)
    self.ln_2 = _LN(width, eps)

  def forward(self, x, bias):
    qkv = F.linear(self.ln_1(x), self.attn.in_proj_weight, self.attn.in_proj_bias)
    q, k, v = (_heads(y, self.heads) for y in qkv.chunk(3, dim=-1))
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    x = x + self.attn.out_proj(_merge(ctx))
    h = self.mlp.c_fc(self.ln_2(x))
    return x + self.mlp.c_proj(h * torch.sigmoid(1.702 * h))


class _Transform(nn.Module):

  def __init__(self, width, std, eps):
    super().__init__()
    self.dense = _linear(width, width, std)
    self.LayerNorm = _LN(width, eps)  # pylint: disable=invalid-name

  def forward(self, x):
    return self.LayerNorm(F.gelu(self.dense(x)))


class _Embeddings(nn.Module):

  def __init__(self, c, std, eps):
    super().__init__()
    self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
    self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
    self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
    for e in (self.word_embeddings, self.position_embeddings, self.token_type_embeddings):
      nn.init.normal_(e.weight, std=std)
    self.LayerNorm = _LN(c.hidden_size, eps)  # pylint: disable=invalid-name


class _VEmbeddings(nn.Module):

  def __init__(self, c, std, eps):
    super().__init__()
    self.image_embeddings = _linear(c.v_feature_size, c.v_hidden_size, std)
    self.image_location_embeddings = _linear(5, c.v_hidden_size, std)
    self.LayerNorm = _LN(c.v_hidden_size, eps)  # pylint: disable=invalid-name


class _Encoder(nn.Module):

  def __init__(self, c, std, eps):
    super().__init__()
    ph, pa = c.hidden_dropout_prob, c.attention_probs_dropout_prob
    self.layer = nn.ModuleList(
        BertLayer(c.hidden_size, c.num_attention_heads, c.intermediate_size, ph, pa, std, eps)
        for _ in range(c.num_hidden_layers)
    )
    self.v_layer = nn.ModuleList(
        BertLayer(c.v_hidden_size, c.v_num_attention_heads, c.v_intermediate_size, ph, pa, std, eps)
        for _ in range(c.v_num_hidden_layers)
    )
    self.c_layer = nn.ModuleList(
        CoAttentionLayer(c, ph, pa, std, eps) for _ in range(c.co_num_layers)
    )
    self.t_pooler = _Dense(c.hidden_size, c.bi_hidden_size, std)
    self.v_pooler = _Dense(c.v_hidden_size, c.bi_hidden_size, std)


class _CrossEmbeddings(nn.Module):

  def __init__(self, c, std):
    super().__init__()
    self.position_embeddings = nn.Embedding(c.cross_max_position_embeddings, c.cross_hidden_size)
    nn.init.normal_(self.position_embeddings.weight, std=std)


class _Resblocks(nn.Module):

  def __init__(self, c, std, eps):
    super().__init__()
    self.resblocks = nn.ModuleList(
        ResBlock(c.cross_hidden_size, c.cross_num_attention_heads, c.cross_mlp_ratio, std, eps)
        for _ in range(c.cross_num_layers)
    )


class _Pooler(nn.Module):
  """`cross_encoder.pooler`: in the checkpoint, its output unused."""

  def __init__(self, width, std, eps):
    super().__init__()
    self.ln_pool = _LN(width, eps)
    self.dense = _linear(width, width, std)


class _CrossEncoder(nn.Module):

  def __init__(self, c, std, eps):
    super().__init__()
    self.embeddings = _CrossEmbeddings(c, std)
    self.transformer = _Resblocks(c, std, eps)
    self.pooler = _Pooler(c.cross_hidden_size, std, eps)


class _Bert(nn.Module):

  def __init__(self, c, std, eps):
    super().__init__()
    self.embeddings = _Embeddings(c, std, eps)
    self.v_embeddings = _VEmbeddings(c, std, eps)
    self.encoder = _Encoder(c, std, eps)
    if c.cross_num_layers:
      self.cross_encoder = _CrossEncoder(c, std, eps)
    self.t_fc = _Dense(c.cross_hidden_size, c.bi_hidden_size, std)
    self.v_fc = _Dense(c.cross_hidden_size, c.bi_hidden_size, std)


class _Predictions(nn.Module):

  def __init__(self, c, std, eps, word_embeddings):
    super().__init__()
    self.transform = _Transform(c.hidden_size, std, eps)
    self.decoder = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
    self.decoder.weight = word_embeddings.weight  # tied
    self.bias = nn.Parameter(torch.zeros(c.vocab_size))


class _ImagePredictions(nn.Module):

  def __init__(self, c, std, eps):
    super().__init__()
    self.transform = _Transform(c.v_hidden_size, std, eps)
    self.decoder = _linear(c.v_hidden_size, c.v_target_size, std)


class _Heads(nn.Module):

  def __init__(self, c, std, eps, word_embeddings):
    super().__init__()
    self.t_fc = _linear(c.bi_hidden_size, c.hidden_size, std)
    self.v_fc = _linear(c.bi_hidden_size, c.v_hidden_size, std)
    self.predictions = _Predictions(c, std, eps, word_embeddings)
    self.imagePredictions = _ImagePredictions(c, std, eps)  # pylint: disable=invalid-name


class CapturePeer(nn.Module):
  """CAPTURE in PyTorch; `forward(batch)` returns the same dict as `CaptureModel`."""

  def __init__(self, c):
    super().__init__()
    self.c = c
    std, eps = c.initializer_range, c.layer_norm_eps
    self.bert = _Bert(c, std, eps)
    self.cls = _Heads(c, std, eps, self.bert.embeddings.word_embeddings)

  def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    c, bert, train = self.c, self.bert, self.training
    ids, input_mask, image_mask = batch['input_ids'], batch['input_mask'], batch['image_mask']
    # Additive key masks, [B, 1, 1, K] (broadcast over heads and queries).
    bias = lambda m, value: ((1.0 - m.float()) * value)[:, None, None, :]
    t_bias, v_bias = bias(input_mask, BERT_MASK_VALUE), bias(image_mask, BERT_MASK_VALUE)

    e = bert.embeddings
    t_len = ids.shape[1]
    pos = torch.arange(t_len, device=ids.device)
    t = e.word_embeddings(ids) + e.position_embeddings(pos)[None]
    t = t + e.token_type_embeddings(batch['segment_ids'])
    t = F.dropout(e.LayerNorm(t), c.hidden_dropout_prob, train)
    ve = bert.v_embeddings
    v = ve.image_embeddings(batch['image_feat']) + ve.image_location_embeddings(batch['image_loc'])
    v = F.dropout(ve.LayerNorm(v), c.hidden_dropout_prob, train)

    enc = bert.encoder
    for layer in enc.layer:
      t = layer(t, t_bias)
    for layer in enc.v_layer:
      v = layer(v, v_bias)
    enc_pooled_text = F.relu(enc.t_pooler.dense(t[:, 0]))
    enc_pooled_visual = F.relu(enc.v_pooler.dense(v[:, 0]))
    for layer in enc.c_layer:
      v, t = layer(v, t, v_bias, t_bias)
    text_after, visual_after = t, v

    if c.cross_num_layers:
      ce = bert.cross_encoder
      position_ids = torch.cat([pos, c.max_text_len + torch.arange(v.shape[1], device=v.device)])
      x = torch.cat([t, v], dim=1) + ce.embeddings.position_embeddings(position_ids)[None]
      x = F.dropout(x, c.hidden_dropout_prob, train)
      joint = bias(torch.cat([input_mask, image_mask], dim=1), CLIP_MASK_VALUE)
      for block in ce.transformer.resblocks:
        x = block(x, joint)
      t, v = x[:, :t_len], x[:, t_len:]

    sequence_text = F.relu(bert.t_fc.dense(t))
    sequence_visual = F.relu(bert.v_fc.dense(v))
    heads = self.cls
    h = heads.predictions.transform(heads.t_fc(sequence_text))
    mlm_logits = heads.predictions.decoder(h) + heads.predictions.bias
    ip = heads.imagePredictions
    mrm_pred = ip.decoder(ip.transform(heads.v_fc(sequence_visual[:, 1:])))
    return {
        'mlm_logits': mlm_logits,
        'mrm_pred': mrm_pred,
        'pooled_text': sequence_text[:, 0],
        'pooled_visual': sequence_visual[:, 0],
        'sequence_text': sequence_text,
        'sequence_visual': sequence_visual,
        'enc_pooled_text': enc_pooled_text,
        'enc_pooled_visual': enc_pooled_visual,
        'text_after_coattention': text_after,
        'visual_after_coattention': visual_after,
    }


def losses(out, batch, loss_cfg, log_inv_temperature=None) -> dict[str, torch.Tensor]:
  """MLM + MRM (feature regression) + contrastive ('ntxent' as released, or 'clip')."""
  logits = out['mlm_logits']
  mlm = F.cross_entropy(
      logits.reshape(-1, logits.shape[-1]), batch['lm_label_ids'].reshape(-1), ignore_index=-1
  )
  chosen = (batch['image_label'] == 1).float()[..., None]
  sq = (out['mrm_pred'] - batch['image_target']) ** 2
  mrm = (sq * chosen).sum() / torch.clamp(chosen.sum() * sq.shape[-1], min=1.0)
  t = F.normalize(out['enc_pooled_text'], dim=-1)
  v = F.normalize(out['enc_pooled_visual'], dim=-1)
  b = t.shape[0]
  if loss_cfg.contrastive == 'ntxent':
    z = torch.cat([v, t])
    logits = (z @ z.T) / loss_cfg.temperature
    logits = logits.masked_fill(torch.eye(2 * b, dtype=torch.bool), float('-inf'))
    positive = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)])
    clr = F.cross_entropy(logits, positive)
  elif loss_cfg.contrastive == 'clip':
    scale = torch.exp(torch.clamp(log_inv_temperature, max=math.log(100.0)))
    logits = scale * t @ v.T
    idx = torch.arange(b)
    clr = 0.5 * (F.cross_entropy(logits, idx) + F.cross_entropy(logits.T, idx))
  else:
    raise ValueError(f'the torch peer has no {loss_cfg.contrastive!r} contrastive loss')
  w = loss_cfg
  total = w.mlm_weight * mlm + w.mrm_weight * mrm + w.contrastive_weight * clr
  return {'mlm': mlm, 'mrm': mrm, 'contrastive': clr, 'total': total}


def load_release_state_dict(model: CapturePeer, tensors: Mapping[str, Any]) -> None:
  """Loads release-named tensors (numpy or torch) strictly; the tied decoder comes along."""
  state = {k: torch.as_tensor(np.asarray(v)) for k, v in tensors.items()}
  missing, unexpected = model.load_state_dict(state, strict=False)
  if unexpected or missing:
    raise ValueError(f'state_dict mismatch: missing {missing}, unexpected {unexpected}')


FLOAT_KEYS = ('image_feat', 'image_loc', 'image_target')


def to_torch_batch(batch: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
  """Numpy batch -> torch (float32 features and targets, int64 ids, masks and labels)."""
  return {
      k: torch.from_numpy(np.asarray(v).astype(np.float32 if k in FLOAT_KEYS else np.int64))
      for k, v in batch.items()
  }


def make_train_step(config, seed: int = 0):
  """A peer model and its training step: forward, losses, backward, clip, AdamW(foreach).

  Returns `(model, step)` where `step(batch) -> float loss` (loss fetched with
  `.item()`, which also waits for the step, as ours blocks on its outputs).
  Weight decay on weights and embeddings only, warm-up/decay schedule omitted
  (a constant lr costs the same).
  """
  torch.manual_seed(seed)
  model = CapturePeer(config.model)
  model.train()
  extra = []
  log_inv_temperature = None
  if config.loss.contrastive == 'clip':
    log_inv_temperature = nn.Parameter(torch.tensor(math.log(1.0 / config.loss.temperature)))
    extra = [log_inv_temperature]
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    (no_decay if name.endswith('bias') or 'LayerNorm' in name or 'ln_' in name else decay).append(p)
  t = config.train
  opt = torch.optim.AdamW(
      [
          {'params': decay, 'weight_decay': t.weight_decay},
          {'params': no_decay + extra, 'weight_decay': 0.0},
      ],
      lr=t.learning_rate,
      betas=(t.adam_b1, t.adam_b2),
      eps=t.adam_eps,
      foreach=True,
  )
  params = [p for g in opt.param_groups for p in g['params']]

  def step(batch):
    opt.zero_grad(set_to_none=True)
    out = model(batch)
    terms = losses(out, batch, config.loss, log_inv_temperature)
    terms['total'].backward()
    if t.grad_clip_norm > 0:
      torch.nn.utils.clip_grad_norm_(params, t.grad_clip_norm, foreach=True)
    opt.step()
    return terms['total'].item()

  return model, step
