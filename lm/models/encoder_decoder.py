"""The encoder-decoder Transformer (Vaswani et al. 2017) from the same layers as the Decoder
and the Encoder (lm/models/transformer.py).

    source ─► embed ─► [Block] x num_layers (both ways, padding masked) ─► memory
    target ─► embed ─► [DecoderBlock] x num_layers ─► logits
    DecoderBlock: causal self-attention, cross-attention to the memory, MLP (pre- or post-norm)

One token embedding serves the source, the target and (model.tie_embeddings) the output
layer: the vocabulary is shared, as a SentencePiece model trained on both languages gives.
Cross-attention sees the memory's non-padding positions only (source segment id > 0).

    model.apply(v, source_BxS, source_segment_ids_BxS, tokens_BxL)  # teacher-forced logits
    memory = model.apply(v, source_BxS, source_segment_ids_BxS, method="encode")
    logits = model.apply(v, memory, source_segment_ids_BxS, tokens_BxL, method="decode")
"""

import flax.linen as nn
import jax.numpy as jnp

from lm.models.layers import Attention, Dense, Mlp, ModelConfig, attention_mask, constrain
from lm.models.layers import lp, make_norm
from lm.models.transformer import Block, layer_stack, padding_mask


class DecoderBlock(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, mask, deterministic, cache=None, cache_index=None,
               memory_BxSxD=None, memory_mask=None):
    cfg = self.cfg
    dropout = nn.Dropout(cfg.dropout)
    drop = lambda h: dropout(h, deterministic=deterministic)
    attn, cross = Attention(cfg, name="attn"), Attention(cfg, name="cross_attn")
    mlp = Mlp(cfg, name="mlp")
    ln_1, ln_2, ln_3 = (make_norm(cfg, f"ln_{i}") for i in (1, 2, 3))
    cross_attend = lambda h: cross(h, None, memory_mask, deterministic,
                                   context_BxSxD=memory_BxSxD)[0]
    if cfg.norm_position == "post":
      h_BxLxD, cache = attn(x_BxLxD, positions_BxL, mask, deterministic, cache, cache_index)
      x_BxLxD = ln_1(x_BxLxD + drop(h_BxLxD))
      x_BxLxD = ln_2(x_BxLxD + drop(cross_attend(x_BxLxD)))
      x_BxLxD = ln_3(x_BxLxD + drop(mlp(x_BxLxD)))
    else:
      h_BxLxD, cache = attn(ln_1(x_BxLxD), positions_BxL, mask, deterministic, cache,
                            cache_index)
      x_BxLxD = x_BxLxD + drop(h_BxLxD)
      x_BxLxD = x_BxLxD + drop(cross_attend(ln_2(x_BxLxD)))
      x_BxLxD = x_BxLxD + drop(mlp(ln_3(x_BxLxD)))
    return constrain(x_BxLxD, ("batch", "length", "embed")), cache


class _Side(nn.Module):
  """One side's stack: (post-norm: the embeddings' norm), dropout, the blocks, (pre-norm:
  the final norm)."""

  cfg: ModelConfig
  block: type = Block

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, mask, deterministic, context=()):
    cfg = self.cfg
    if cfg.norm_position == "post":
      x_BxLxD = make_norm(cfg, "ln_embed")(x_BxLxD)
    x_BxLxD = nn.Dropout(cfg.dropout)(x_BxLxD, deterministic=deterministic)
    x_BxLxD, _ = layer_stack(self, cfg, x_BxLxD, positions_BxL, mask, deterministic,
                             block=self.block, context=context)
    if cfg.norm_position == "pre":
      x_BxLxD = make_norm(cfg, "ln_f")(x_BxLxD)
    return x_BxLxD


class EncoderDecoder(nn.Module):
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype,
                          param_dtype=cfg.weight_dtype,
                          embedding_init=lp(nn.initializers.normal(0.02), ("vocab", "embed")))
    if cfg.positions == "learned":
      self.pos_embed = nn.Embed(cfg.max_len, cfg.d_model, dtype=cfg.compute_dtype,
                                param_dtype=cfg.weight_dtype,
                                embedding_init=lp(nn.initializers.normal(0.02),
                                                  (None, "embed")))
    self.encoder = _Side(cfg, Block)
    self.decoder = _Side(cfg, DecoderBlock)
    if not cfg.tie_embeddings:
      self.lm_head = Dense((cfg.vocab_size,), ("embed", "vocab"), cfg)

  def _embed(self, tokens_BxL, positions_BxL):
    x_BxLxD = self.embed(tokens_BxL)
    if self.cfg.positions == "learned":
      x_BxLxD = x_BxLxD + self.pos_embed(positions_BxL)
    return constrain(x_BxLxD, ("batch", "length", "embed"))

  def encode(self, source_BxS, source_segment_ids_BxS, deterministic=True):
    """The memory [B, S, D]: the encoder's output over the source (segment id 0: padding)."""
    positions_BxS = _positions(source_BxS)
    return self.encoder(self._embed(source_BxS, positions_BxS), positions_BxS,
                        padding_mask(source_segment_ids_BxS), deterministic)

  def decode(self, memory_BxSxD, source_segment_ids_BxS, tokens_BxL, segment_ids_BxL=None,
             deterministic=True):
    """Logits [B, L, V] (float32) of the next target token at every target position."""
    positions_BxL = _positions(tokens_BxL)
    memory_mask = (source_segment_ids_BxS > 0)[:, None, None, None, :]  # [B, 1, 1, 1, S]
    x_BxLxD = self.decoder(self._embed(tokens_BxL, positions_BxL), positions_BxL,
                           attention_mask(tokens_BxL.shape[1], segment_ids_BxL),
                           deterministic, (memory_BxSxD, memory_mask))
    if self.cfg.tie_embeddings:
      logits_BxLxV = self.embed.attend(x_BxLxD)
    else:
      logits_BxLxV = self.lm_head(x_BxLxD)
    return logits_BxLxV.astype(jnp.float32)

  def __call__(self, source_BxS, source_segment_ids_BxS, tokens_BxL, segment_ids_BxL=None,
               deterministic=True):
    memory_BxSxD = self.encode(source_BxS, source_segment_ids_BxS, deterministic)
    return self.decode(memory_BxSxD, source_segment_ids_BxS, tokens_BxL, segment_ids_BxL,
                       deterministic)


def _positions(tokens_BxL):
  b, length = tokens_BxL.shape
  return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
