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

Cached decoding (lm/search.py): `init_cache` gives each decoder layer a self-attention KV
cache and room for the cross-attention keys and values; the first `decode` call with the
cache and the memory fills both, and later calls pass memory=None: the cross-attention then
reads its cached keys and values and the memory is never projected again.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm.models import kernels
from lm.models.layers import Attention, Dense, Mask, Mlp, ModelConfig, constrain, lp
from lm.models.layers import make_norm, residual_std, sow_attention, tied_logits
from lm.models.transformer import Block, layer_stack


class CrossAttention(nn.Module):
  """Queries from the decoder, keys and values from the encoder's memory (or, decoding,
  from the cache they were written to on the first step)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, memory_BxSxD, mask, deterministic, cache=None):
    """(output, cache). `mask`: a kernels.Mask, the memory positions that may be seen."""
    cfg = self.cfg
    ops = kernels.get(cfg.kernels)
    dh = cfg.head_dim
    q_BxLxHxDh = Dense((cfg.num_heads, dh), ("embed", "heads", "kv"), cfg, name="query")(x_BxLxD)
    q_BxLxHxDh = constrain(q_BxLxHxDh, ("batch", "length", "heads", "kv"))
    if memory_BxSxD is not None:
      k_BxSxKxDh = Dense((cfg.num_kv_heads, dh), ("embed", "kv_heads", "kv"), cfg,
                         name="key")(memory_BxSxD)
      v_BxSxKxDh = Dense((cfg.num_kv_heads, dh), ("embed", "kv_heads", "kv"), cfg,
                         name="value")(memory_BxSxD)
    if cache is None:
      use_dropout = cfg.dropout > 0.0 and not deterministic
      out_BxLxHxDh = ops.attention(
          q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask,
          dropout_rate=cfg.dropout if use_dropout else 0.0,
          dropout_rng=self.make_rng("dropout") if use_dropout else None,
          sow=sow_attention(self))
    else:
      if memory_BxSxD is not None:  # the first decoding step: keep them, heads first
        cache = {"k": k_BxSxKxDh.transpose(0, 2, 1, 3).astype(cfg.cache_dtype),
                 "v": v_BxSxKxDh.transpose(0, 2, 1, 3).astype(cfg.cache_dtype)}
      out_BxLxHxDh = ops.cached_attention(q_BxLxHxDh, cache["k"], cache["v"],
                                          mask.dense(x_BxLxD.shape[1], cache["k"].shape[2]))
    return Dense((cfg.d_model,), ("heads", "kv", "embed"), cfg, std=residual_std(cfg),
                 name="out")(out_BxLxHxDh), cache


class DecoderBlock(nn.Module):
  cfg: ModelConfig
  layer: int = None  # its index (layer_stack passes it; encoder-decoders have no windows)

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, mask, deterministic, cache=None, cache_index=None,
               memory_BxSxD=None, memory_mask=None):
    """`cache`: {"self": KV cache, "cross": cross-attention keys and values} or None."""
    cfg = self.cfg
    dropout = nn.Dropout(cfg.dropout)
    drop = lambda h: dropout(h, deterministic=deterministic)
    attn, cross = Attention(cfg, name="attn"), CrossAttention(cfg, name="cross_attn")
    mlp = Mlp(cfg, name="mlp")
    ln_1, ln_2, ln_3 = (make_norm(cfg, f"ln_{i}") for i in (1, 2, 3))
    self_cache, cross_cache = (None, None) if cache is None else (cache["self"], cache["cross"])
    if cfg.norm_position == "post":
      h_BxLxD, self_cache = attn(x_BxLxD, positions_BxL, mask, deterministic, self_cache,
                                 cache_index)
      x_BxLxD = ln_1(x_BxLxD + drop(h_BxLxD))
      h_BxLxD, cross_cache = cross(x_BxLxD, memory_BxSxD, memory_mask, deterministic,
                                   cross_cache)
      x_BxLxD = ln_2(x_BxLxD + drop(h_BxLxD))
      x_BxLxD = ln_3(x_BxLxD + drop(mlp(x_BxLxD)))
    else:
      h_BxLxD, self_cache = attn(ln_1(x_BxLxD), positions_BxL, mask, deterministic,
                                 self_cache, cache_index)
      x_BxLxD = x_BxLxD + drop(h_BxLxD)
      h_BxLxD, cross_cache = cross(ln_2(x_BxLxD), memory_BxSxD, memory_mask, deterministic,
                                   cross_cache)
      x_BxLxD = x_BxLxD + drop(h_BxLxD)
      x_BxLxD = x_BxLxD + drop(mlp(ln_3(x_BxLxD)))
    new_cache = None if cache is None else {"self": self_cache, "cross": cross_cache}
    return constrain(x_BxLxD, ("batch", "length", "embed")), new_cache


class _Side(nn.Module):
  """One side's stack: (post-norm: the embeddings' norm), dropout, the blocks, (pre-norm:
  the final norm)."""

  cfg: ModelConfig
  block: type = Block

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, mask, deterministic, context=(), cache_layers=None,
               cache_index=None):
    """(output, per-layer caches)."""
    cfg = self.cfg
    if cfg.norm_position == "post":
      x_BxLxD = make_norm(cfg, "ln_embed")(x_BxLxD)
    x_BxLxD = nn.Dropout(cfg.dropout)(x_BxLxD, deterministic=deterministic)
    x_BxLxD, layers = layer_stack(self, cfg, x_BxLxD, positions_BxL, mask, deterministic,
                                  cache_layers, cache_index, block=self.block, context=context)
    if cfg.norm_position == "pre":
      x_BxLxD = make_norm(cfg, "ln_f")(x_BxLxD)
    return x_BxLxD, layers


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
                        Mask(source_segment_ids_BxS), deterministic)[0]

  def decode(self, memory_BxSxD, source_segment_ids_BxS, tokens_BxL, segment_ids_BxL=None,
             deterministic=True, cache=None):
    """Logits [B, L, V] (float32) of the next target token at every target position.

    With a `cache` (init_cache): (logits, cache); the tokens fill target slots
    cache["index"].. and attend to every earlier slot. `memory_BxSxD` is needed on the first
    call only (it fills the cross-attention cache); pass None afterwards."""
    length = tokens_BxL.shape[1]
    # Every target position sees the memory's non-padding positions.
    memory_mask = Mask(jnp.ones(tokens_BxL.shape, jnp.int32),
                       (source_segment_ids_BxS > 0).astype(jnp.int32))
    if cache is None:
      positions_BxL = _positions(tokens_BxL)
      mask, layers, index = Mask(segment_ids_BxL, causal=True), None, None
    else:
      index = cache["index"]
      slots_L = index + jnp.arange(length, dtype=jnp.int32)
      positions_BxL = jnp.broadcast_to(slots_L, tokens_BxL.shape)
      slots_T = jnp.arange(cache["length"].shape[0], dtype=jnp.int32)
      mask = (slots_T[None, :] <= slots_L[:, None])[None, None, None]  # [1, 1, 1, L, T]
      layers = cache["layers"]
    x_BxLxD, layers = self.decoder(self._embed(tokens_BxL, positions_BxL), positions_BxL, mask,
                                   deterministic, (memory_BxSxD, memory_mask), layers, index)
    if self.cfg.tie_embeddings:
      logits_BxLxV = tied_logits(self.cfg, self.embed.embedding, x_BxLxD)
    else:
      logits_BxLxV = self.lm_head(x_BxLxD)
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    if cache is None:
      return logits_BxLxV
    return logits_BxLxV, {**cache, "index": index + length, "layers": layers}

  def __call__(self, source_BxS, source_segment_ids_BxS, tokens_BxL, segment_ids_BxL=None,
               deterministic=True):
    memory_BxSxD = self.encode(source_BxS, source_segment_ids_BxS, deterministic)
    return self.decode(memory_BxSxD, source_segment_ids_BxS, tokens_BxL, segment_ids_BxL,
                       deterministic)


def init_cache(cfg, batch, target_len, source_len):
  """An empty decoding cache: per decoder layer a self-attention KV cache of `target_len`
  slots and the cross-attention keys and values over `source_len` memory positions (heads
  first, [B, K, S, Dh], as the kernels' cached_attention reads them)."""
  self_shape = (batch, cfg.num_kv_heads, target_len, cfg.head_dim)
  cross_shape = (batch, cfg.num_kv_heads, source_len, cfg.head_dim)
  stack = (cfg.num_layers,) if cfg.scan_layers else ()
  layer = lambda: {name: {"k": jnp.zeros(stack + shape, cfg.cache_dtype),
                          "v": jnp.zeros(stack + shape, cfg.cache_dtype)}
                   for name, shape in (("self", self_shape), ("cross", cross_shape))}
  layers = layer() if cfg.scan_layers else tuple(layer() for _ in range(cfg.num_layers))
  # "length" carries the number of slots in its shape (a static size under jit).
  return {"index": jnp.zeros((), jnp.int32), "length": jnp.zeros((target_len,), jnp.bool_),
          "layers": layers}


def _positions(tokens_BxL):
  b, length = tokens_BxL.shape
  return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
