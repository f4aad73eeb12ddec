"""Decoder-only Transformer (GPT family), built from lm/models/layers.py.

    tokens ─► embed (+ learned positions) ─► [pre-norm block] x num_layers ─► norm ─► logits
    block: x + Attention(Norm(x)) then x + Mlp(Norm(x)), dropout on each residual branch.

`Decoder(cfg).init(rngs, tokens)` / `.apply(variables, tokens)`: no hidden state.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm.models.layers import Attention, Dense, Mlp, ModelConfig, attention_mask, constrain
from lm.models.layers import lp, make_norm

__all__ = ["Block", "Decoder", "ModelConfig", "init_cache"]


class Block(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, mask, deterministic, cache=None, cache_index=None):
    cfg = self.cfg
    drop = nn.Dropout(cfg.dropout)
    h_BxLxD = make_norm(cfg, "ln_1")(x_BxLxD)
    h_BxLxD, cache = Attention(cfg, name="attn")(h_BxLxD, positions_BxL, mask, deterministic,
                                                 cache, cache_index)
    x_BxLxD = x_BxLxD + drop(h_BxLxD, deterministic=deterministic)
    h_BxLxD = make_norm(cfg, "ln_2")(x_BxLxD)
    h_BxLxD = Mlp(cfg, name="mlp")(h_BxLxD)
    x_BxLxD = x_BxLxD + drop(h_BxLxD, deterministic=deterministic)
    return constrain(x_BxLxD, ("batch", "length", "embed")), cache


class _ScanBody(nn.Module):
  """One layer as nn.scan's body: carries the residual stream, scans the layer's cache."""

  cfg: ModelConfig
  block: type = Block

  @nn.compact
  def __call__(self, x_BxLxD, layer_cache, positions_BxL, mask, cache_index, deterministic):
    x_BxLxD, layer_cache = self.block(self.cfg, name="block")(
        x_BxLxD, positions_BxL, mask, deterministic, layer_cache, cache_index)
    self.sow("intermediates", "residual", x_BxLxD)
    return x_BxLxD, layer_cache


class Decoder(nn.Module):
  """Causal language model: int tokens [B, L] -> float32 logits [B, L, V].

  With a KV `cache` (see `init_cache`) it returns (logits, cache): the tokens fill slots
  cache["index"].. of the cache and attend to every earlier slot of their row from
  cache["start"][b] on (slots before it are left padding); positions count from that start.
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None,
               deterministic=True, cache=None):
    cfg = self.cfg
    b, length = tokens_BxL.shape
    if cache is not None:
      slots_L = cache["index"] + jnp.arange(length, dtype=jnp.int32)
      if positions_BxL is None:
        positions_BxL = jnp.maximum(slots_L[None, :] - cache["start"][:, None], 0)
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

    if cache is None:
      mask = attention_mask(length, segment_ids_BxL)
    else:
      slots_S = jnp.arange(jax.tree.leaves(cache["layers"])[0].shape[-2], dtype=jnp.int32)
      mask_BxLxS = ((slots_S[None, None, :] <= slots_L[None, :, None]) &
                    (slots_S[None, None, :] >= cache["start"][:, None, None]))
      mask = mask_BxLxS[:, None, None]
    block = Block
    if cfg.remat != "none" and cache is None:
      policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable
                if cfg.remat == "dots" else None)
      block = nn.remat(Block, policy=policy, static_argnums=(4,))  # 4: deterministic
    cache_index = None if cache is None else cache["index"]
    if cfg.scan_layers:  # parameters (and cache) stacked on a leading "layers" axis
      stack = nn.scan(_ScanBody, variable_axes={"params": 0, "intermediates": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                      length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
      x_BxLxD, layers = stack(cfg, block, name="layers")(
          x_BxLxD, None if cache is None else cache["layers"], positions_BxL, mask,
          cache_index, deterministic)
    else:
      layers = []
      for i in range(cfg.num_layers):
        x_BxLxD, layer_cache = block(cfg, name=f"layer_{i}")(
            x_BxLxD, positions_BxL, mask, deterministic,
            None if cache is None else cache["layers"][i], cache_index)
        layers.append(layer_cache)
        self.sow("intermediates", f"residual_{i}", x_BxLxD)  # the residual stream
      layers = tuple(layers)
    x_BxLxD = make_norm(cfg, "ln_f")(x_BxLxD)

    if cfg.tie_embeddings:
      logits_BxLxV = embed.attend(x_BxLxD)
    else:
      logits_BxLxV = Dense((cfg.vocab_size,), ("embed", "vocab"), cfg, name="lm_head")(x_BxLxD)
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    if cache is None:
      return logits_BxLxV
    return logits_BxLxV, {"index": cache["index"] + length, "start": cache["start"],
                          "layers": layers}


def init_cache(cfg, batch, length, start_B=None):
  """An empty KV cache of `length` slots per row; rows begin at slot `start_B` (default 0)."""
  shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)  # heads first: see cached_attention
  layer = lambda: {"k": jnp.zeros(shape, cfg.compute_dtype),
                   "v": jnp.zeros(shape, cfg.compute_dtype)}
  start_B = jnp.zeros((batch,), jnp.int32) if start_B is None else start_B
  if cfg.scan_layers:
    layers = {k: jnp.zeros((cfg.num_layers,) + shape, cfg.compute_dtype) for k in ("k", "v")}
  else:
    layers = tuple(layer() for _ in range(cfg.num_layers))
  return {"index": jnp.zeros((), jnp.int32), "start": jnp.asarray(start_B, jnp.int32),
          "layers": layers}
