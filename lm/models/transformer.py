"""Decoder-only Transformer (GPT family), built from lm/models/layers.py.

    tokens ─► embed (+ learned positions) ─► [pre-norm block] x num_layers ─► norm ─► logits
    block: x + Attention(Norm(x)) then x + Mlp(Norm(x)), dropout on each residual branch.

`Decoder(cfg).init(rngs, tokens)` / `.apply(variables, tokens)`: no hidden state.
"""

import flax.linen as nn
import jax.numpy as jnp

from lm.models.layers import Attention, Dense, Mlp, ModelConfig, attention_mask, constrain
from lm.models.layers import lp, make_norm

__all__ = ["Block", "Decoder", "ModelConfig"]


class Block(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, mask, deterministic):
    cfg = self.cfg
    drop = nn.Dropout(cfg.dropout)
    h_BxLxD = make_norm(cfg, "ln_1")(x_BxLxD)
    h_BxLxD = Attention(cfg, name="attn")(h_BxLxD, positions_BxL, mask, deterministic)
    x_BxLxD = x_BxLxD + drop(h_BxLxD, deterministic=deterministic)
    h_BxLxD = make_norm(cfg, "ln_2")(x_BxLxD)
    h_BxLxD = Mlp(cfg, name="mlp")(h_BxLxD)
    x_BxLxD = x_BxLxD + drop(h_BxLxD, deterministic=deterministic)
    return constrain(x_BxLxD, ("batch", "length", "embed"))


class Decoder(nn.Module):
  """Causal language model: int tokens [B, L] -> float32 logits [B, L, V]."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None,
               deterministic=True):
    cfg = self.cfg
    b, length = tokens_BxL.shape
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))

    embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype,
                     param_dtype=cfg.weight_dtype, name="embed",
                     embedding_init=lp(nn.initializers.normal(0.02), ("vocab", "embed")))
    x_BxLxD = embed(tokens_BxL)
    if cfg.positions == "learned":
      pos_embed = nn.Embed(cfg.max_len, cfg.d_model, dtype=cfg.compute_dtype,
                           param_dtype=cfg.weight_dtype, name="pos_embed",
                           embedding_init=lp(nn.initializers.normal(0.02), (None, "embed")))
      x_BxLxD = x_BxLxD + pos_embed(positions_BxL)
    x_BxLxD = nn.Dropout(cfg.dropout)(x_BxLxD, deterministic=deterministic)
    x_BxLxD = constrain(x_BxLxD, ("batch", "length", "embed"))

    mask = attention_mask(length, segment_ids_BxL)
    for i in range(cfg.num_layers):
      x_BxLxD = Block(cfg, name=f"layer_{i}")(x_BxLxD, positions_BxL, mask, deterministic)
    x_BxLxD = make_norm(cfg, "ln_f")(x_BxLxD)

    if cfg.tie_embeddings:
      logits_BxLxV = embed.attend(x_BxLxD)
    else:
      logits_BxLxV = Dense((cfg.vocab_size,), ("embed", "vocab"), cfg, name="lm_head")(x_BxLxD)
    return logits_BxLxV.astype(jnp.float32)
