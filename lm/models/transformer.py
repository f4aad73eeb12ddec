"""Transformers built from lm/models/layers.py: Decoder (GPT family) and Encoder (BERT family).

    tokens ─► embed (+ learned positions, + token types) ─► [block] x num_layers ─► norm ─► out
    pre-norm block:  x + Attention(Norm(x)), then x + Mlp(Norm(x))   (GPT-2, Llama)
    post-norm block: Norm(x + Attention(x)), then Norm(x + Mlp(x))   (BERT, the 2017 Transformer)
    sandwich block:  x + Norm(Attention(Norm(x))), then x + Norm(Mlp(Norm(x)))   (Gemma 2/3)

Layers attend through a sliding window or to the whole context by ModelConfig.is_local
(Mistral: every layer local; Gemma: local ones alternating with global ones).

The Decoder is causal and returns logits; the Encoder attends both ways within each segment
(segment id 0 marks padding, which no real token attends to) and returns hidden states for the
heads in lm/models/heads.py. Post-norm models normalise the embeddings and have no final norm.

`Decoder(cfg).init(rngs, tokens)` / `.apply(variables, tokens)`: no hidden state.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm.models.layers import Attention, Dense, Mask, Mlp, ModelConfig, constrain, lp
from lm.models.layers import make_norm, tied_logits
from lm.models.kernels.reference import softcap

__all__ = ["Block", "Decoder", "Encoder", "ModelConfig", "init_cache"]


class Block(nn.Module):
  cfg: ModelConfig
  layer: int = None  # its index in the stack (None: scanned, every layer alike)

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, mask, deterministic, cache=None, cache_index=None):
    cfg = self.cfg
    dropout = nn.Dropout(cfg.dropout)
    drop = lambda h: dropout(h, deterministic=deterministic)
    attn, mlp = Attention(cfg, self.layer, name="attn"), Mlp(cfg, name="mlp")
    ln_1, ln_2 = make_norm(cfg, "ln_1"), make_norm(cfg, "ln_2")
    if cfg.norm_position == "sandwich":  # the residual gets normalised sub-layer outputs
      h_BxLxD, cache = attn(ln_1(x_BxLxD), positions_BxL, mask, deterministic, cache,
                            cache_index)
      x_BxLxD = x_BxLxD + drop(make_norm(cfg, "ln_1_post")(h_BxLxD))
      h_BxLxD = make_norm(cfg, "ln_2_post")(mlp(ln_2(x_BxLxD)))
      x_BxLxD = x_BxLxD + drop(h_BxLxD)
    elif cfg.norm_position == "post":
      h_BxLxD, cache = attn(x_BxLxD, positions_BxL, mask, deterministic, cache, cache_index)
      x_BxLxD = ln_1(x_BxLxD + drop(h_BxLxD))
      x_BxLxD = ln_2(x_BxLxD + drop(mlp(x_BxLxD)))
    else:
      h_BxLxD, cache = attn(ln_1(x_BxLxD), positions_BxL, mask, deterministic, cache,
                            cache_index)
      x_BxLxD = x_BxLxD + drop(h_BxLxD)
      x_BxLxD = x_BxLxD + drop(mlp(ln_2(x_BxLxD)))
    return constrain(x_BxLxD, ("batch", "length", "embed")), cache


class _ScanBody(nn.Module):
  """One layer as nn.scan's body: carries the residual stream, scans the layer's cache."""

  cfg: ModelConfig
  block: type = Block

  @nn.compact
  def __call__(self, x_BxLxD, layer_cache, positions_BxL, mask, cache_index, deterministic,
               context=()):
    x_BxLxD, layer_cache = self.block(self.cfg, name="block")(
        x_BxLxD, positions_BxL, mask, deterministic, layer_cache, cache_index, *context)
    self.sow("intermediates", "residual", x_BxLxD)
    return x_BxLxD, layer_cache


class Decoder(nn.Module):
  """Causal language model: int tokens [B, L] -> float32 logits [B, L, V].

  With a KV `cache` (see `init_cache`) it returns (logits, cache): the tokens fill slots
  cache["index"].. of the cache and attend to every earlier slot of their row from
  cache["start"][b] on (slots before it are left padding); positions count from that start.
  `last_only`: logits for the last position only ([B, 1, V]), as a prefill needs them.
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None,
               deterministic=True, cache=None, last_only=False):
    cfg = self.cfg
    b, length = tokens_BxL.shape
    paged = cache is not None and "table" in cache
    if paged:
      return self._paged(tokens_BxL, cache, deterministic)
    if cache is not None:
      slots_L = cache["index"] + jnp.arange(length, dtype=jnp.int32)
      if positions_BxL is None:
        positions_BxL = jnp.maximum(slots_L[None, :] - cache["start"][:, None], 0)
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))

    embed, x_BxLxD = embed_tokens(cfg, tokens_BxL, positions_BxL, None, deterministic)

    if cache is None:
      mask = Mask(segment_ids_BxL, causal=True)
    else:
      slots_S = jnp.arange(jax.tree.leaves(cache["layers"])[0].shape[-2], dtype=jnp.int32)
      mask_BxLxS = ((slots_S[None, None, :] <= slots_L[None, :, None]) &
                    (slots_S[None, None, :] >= cache["start"][:, None, None]))
      mask = mask_BxLxS[:, None, None]
      if cfg.sliding_window:  # slots are positions (from the row's start) in a row
        near_LxS = slots_S[None, :] > slots_L[:, None] - cfg.sliding_window
        mask = {"global": mask, "local": mask & near_LxS[None, None, None]}
    cache_index = None if cache is None else cache["index"]
    x_BxLxD, layers = layer_stack(self, cfg, x_BxLxD, positions_BxL, mask, deterministic,
                                  None if cache is None else cache["layers"], cache_index)
    if last_only:
      x_BxLxD = x_BxLxD[:, -1:]

    new_cache = None if cache is None else {"index": cache["index"] + length,
                                            "start": cache["start"], "layers": layers}
    return self._logits(embed, x_BxLxD, cache, new_cache)

  def _paged(self, tokens_BxL, cache, deterministic):
    """A call over a paged KV cache (lm/paged.py): row b's tokens are its positions
    lengths[b].., of which the first counts[b] are written to its pages (the rest are
    padding, written to the scratch page 0); they attend to every earlier position of
    their row, through the page table."""
    cfg = self.cfg
    b, length = tokens_BxL.shape
    table_BxT, lengths_B = cache["table"], cache["lengths"]
    counts_B = cache.get("counts")
    counts_B = jnp.full((b,), length, jnp.int32) if counts_B is None else counts_B
    positions_BxL = lengths_B[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :]
    embed, x_BxLxD = embed_tokens(cfg, tokens_BxL, positions_BxL, None, deterministic)
    page = jax.tree.leaves(cache["layers"])[0].shape[-2]
    slots_S = jnp.arange(table_BxT.shape[1] * page, dtype=jnp.int32)
    mask = (slots_S[None, None, :] <= positions_BxL[:, :, None])[:, None, None]
    if cfg.sliding_window:
      near = slots_S[None, None, :] > positions_BxL[:, :, None] - cfg.sliding_window
      mask = {"global": mask, "local": mask & near[:, None, None]}
    where = {"table": table_BxT, "positions": positions_BxL,
             "valid": jnp.arange(length, dtype=jnp.int32)[None, :] < counts_B[:, None]}
    x_BxLxD, layers = layer_stack(self, cfg, x_BxLxD, positions_BxL, mask, deterministic,
                                  cache["layers"], where)
    new_cache = {"table": table_BxT, "lengths": lengths_B + counts_B, "layers": layers}
    return self._logits(embed, x_BxLxD, cache, new_cache)

  def _logits(self, embed, x_BxLxD, cache, new_cache):
    cfg = self.cfg
    if cfg.norm_position in ("pre", "sandwich"):
      x_BxLxD = make_norm(cfg, "ln_f")(x_BxLxD)
    if cfg.tie_embeddings:
      unembed_DxV = None
      if cache is not None and cfg.caches_unembedding:
        # E^T made once by the first call (the prefill), then carried with the cache.
        unembed_DxV = cache.get("unembed")
        if unembed_DxV is None:
          unembed_DxV = embed.embedding.T.astype(cfg.compute_dtype)
        new_cache["unembed"] = unembed_DxV
      logits_BxLxV = tied_logits(cfg, embed.embedding, x_BxLxD, unembed_DxV)
    else:
      logits_BxLxV = Dense((cfg.vocab_size,), ("embed", "vocab"), cfg, name="lm_head")(x_BxLxD)
    logits_BxLxV = softcap(logits_BxLxV.astype(jnp.float32), cfg.final_softcap)
    if cache is None:
      return logits_BxLxV
    return logits_BxLxV, new_cache


def embed_tokens(cfg, tokens_BxL, positions_BxL, type_ids_BxL, deterministic):
  """(token embedding module, embedded inputs): tokens + learned positions + token types,
  normalised here in post-norm models. Call from a compact method: the modules join it."""
  embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype,
                   param_dtype=cfg.weight_dtype, name="embed",
                   embedding_init=lp(nn.initializers.normal(0.02), ("vocab", "embed")))
  x_BxLxD = embed(tokens_BxL)
  if cfg.embed_scale:  # sqrt(d) rounded to the compute dtype, as Gemma multiplies
    x_BxLxD = x_BxLxD * jnp.asarray(cfg.d_model ** 0.5, cfg.compute_dtype)
  if cfg.positions == "learned":
    pos_embed = nn.Embed(cfg.max_len, cfg.d_model, dtype=cfg.compute_dtype,
                         param_dtype=cfg.weight_dtype, name="pos_embed",
                         embedding_init=lp(nn.initializers.normal(0.02), (None, "embed")))
    x_BxLxD = x_BxLxD + pos_embed(positions_BxL)
  if cfg.type_vocab_size:
    type_embed = nn.Embed(cfg.type_vocab_size, cfg.d_model, dtype=cfg.compute_dtype,
                          param_dtype=cfg.weight_dtype, name="type_embed",
                          embedding_init=lp(nn.initializers.normal(0.02), (None, "embed")))
    x_BxLxD = x_BxLxD + type_embed(jnp.zeros_like(tokens_BxL) if type_ids_BxL is None
                                   else type_ids_BxL)
  if cfg.norm_position == "post":
    x_BxLxD = make_norm(cfg, "ln_embed")(x_BxLxD)
  x_BxLxD = nn.Dropout(cfg.dropout)(x_BxLxD, deterministic=deterministic)
  return embed, constrain(x_BxLxD, ("batch", "length", "embed"))


def layer_stack(module, cfg, x_BxLxD, positions_BxL, mask, deterministic, cache_layers=None,
                cache_index=None, block=Block, context=()):
  """Runs the num_layers blocks (a loop, or one nn.scan) inside `module`'s compact method;
  returns (x, per-layer caches). `context`: more arguments for every block (a
  DecoderBlock's encoder output and its mask)."""
  if cfg.remat != "none" and cache_layers is None:
    policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable
              if cfg.remat == "dots" else None)
    block = nn.remat(block, policy=policy, static_argnums=(4,))  # 4: deterministic
  if cfg.scan_layers:  # parameters (and cache) stacked on a leading "layers" axis
    stack = nn.scan(_ScanBody, variable_axes={"params": 0, "intermediates": 0},
                    split_rngs={"params": True, "dropout": True},
                    in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast,
                             nn.broadcast),
                    length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
    return stack(cfg, block, name="layers")(x_BxLxD, cache_layers, positions_BxL, mask,
                                            cache_index, deterministic, context)
  layers = []
  for i in range(cfg.num_layers):
    x_BxLxD, layer_cache = block(cfg, i, name=f"layer_{i}")(
        x_BxLxD, positions_BxL, mask, deterministic,
        None if cache_layers is None else cache_layers[i], cache_index, *context)
    layers.append(layer_cache)
    module.sow("intermediates", f"residual_{i}", x_BxLxD)  # the residual stream
  return x_BxLxD, tuple(layers)


class Encoder(nn.Module):
  """Bidirectional encoder: int tokens [B, L] -> (hidden states [B, L, D], pooled [B, D]).

  The pooled vector is BERT's pooler, tanh(dense(first token's state)), with model.pooler;
  None without.

  `segment_ids` [B, L]: tokens attend to the tokens of their own segment (packed examples);
  0 marks padding, which no real token attends to. Default: one segment, no padding.
  `type_ids` [B, L]: BERT's sentence A/B ids (model.type_vocab_size > 0)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None, type_ids_BxL=None,
               deterministic=True):
    cfg = self.cfg
    b, length = tokens_BxL.shape
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    if segment_ids_BxL is None:
      segment_ids_BxL = jnp.ones((b, length), jnp.int32)
    _, x_BxLxD = embed_tokens(cfg, tokens_BxL, positions_BxL, type_ids_BxL, deterministic)
    mask = Mask(segment_ids_BxL)
    x_BxLxD, _ = layer_stack(self, cfg, x_BxLxD, positions_BxL, mask, deterministic)
    if cfg.norm_position in ("pre", "sandwich"):
      x_BxLxD = make_norm(cfg, "ln_f")(x_BxLxD)
    pooled_BxD = None
    if cfg.pooler:
      pooled_BxD = jnp.tanh(Dense((cfg.d_model,), ("embed", None),
                                  dataclasses.replace(cfg, use_bias=True),
                                  name="pooler")(x_BxLxD[:, 0]))
    return x_BxLxD, pooled_BxD


def init_cache(cfg, batch, length, start_B=None):
  """An empty KV cache of `length` slots per row; rows begin at slot `start_B` (default 0)."""
  shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)  # heads first (cached_attention)
  layer = lambda: {"k": jnp.zeros(shape, cfg.cache_dtype),
                   "v": jnp.zeros(shape, cfg.cache_dtype)}
  start_B = jnp.zeros((batch,), jnp.int32) if start_B is None else start_B
  if cfg.scan_layers:
    layers = {k: jnp.zeros((cfg.num_layers,) + shape, cfg.cache_dtype) for k in ("k", "v")}
  else:
    layers = tuple(layer() for _ in range(cfg.num_layers))
  return {"index": jnp.zeros((), jnp.int32), "start": jnp.asarray(start_B, jnp.int32),
          "layers": layers}
