"""Transformer building blocks: attention (MHA/GQA, RoPE), MLPs, norms; the products and
attention kernels they run come from lm/models/kernels (ModelConfig.kernels).

Shape suffixes name every array's axes: B batch, L query length, S key length, D d_model,
H query heads, K key/value heads, G query heads per kv head (H = K*G), Dh head size,
F d_ff, V vocabulary. Parameters carry logical axis names (`embed`, `heads`, `kv_heads`, `kv`,
`mlp`, `vocab`) that lm/sharding.py maps onto mesh axes.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm import schema
from lm.models import kernels
from lm.models.kernels import Mask

lp = nn.with_logical_partitioning
constrain = nn.with_logical_constraint


def tied_logits(cfg, embedding_VxD, x_BxLxD, unembed_DxV=None):
  """Output logits through the (tied) input embedding: x @ E^T in the compute dtype with
  float32 accumulation, returned in float32 (flax's `Embed.attend` rounds them to the
  compute dtype). `unembed_DxV`: E^T already made (see ModelConfig.caches_unembedding)."""
  lead, d = x_BxLxD.shape[:-1], x_BxLxD.shape[-1]
  x_NxD = x_BxLxD.reshape(-1, d).astype(cfg.compute_dtype)
  ops = kernels.get(cfg.kernels)
  if unembed_DxV is None:
    y = ops.matmul_nt(x_NxD, embedding_VxD.astype(cfg.compute_dtype))
  else:
    y = ops.matmul(x_NxD, unembed_DxV)
  return y.reshape(lead + (embedding_VxD.shape[0],))


class _ModelConfigBase:
  """What ModelConfig computes from its fields."""

  def __post_init__(self):
    kernels.get(self.kernels)  # a chosen implementation, never "auto"

  @classmethod
  def from_config(cls, model_config, vocab_size, platform=None):
    """The model of config.model on `platform` ("cpu", "gpu", "tpu"): its kernels="auto"
    is resolved for it here (lm.models.kernels.choose), once."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in model_config.items() if k in fields and k != "vocab_size"}
    values["kernels"] = choose_kernels(model_config, platform)
    extra = model_config.get("extra_tokens", 0)  # ids after the tokenizer's (sentinels)
    return cls(vocab_size=(model_config.vocab_size or vocab_size) + extra, **values)

  @property
  def head_dim(self):
    return self.head_size or self.d_model // self.num_heads

  def is_local(self, layer):
    """Whether layer `layer` (None: every layer alike, a scanned stack) attends through the
    sliding window."""
    if not self.sliding_window:
      return False
    if not self.global_every:
      return True
    if layer is None:
      raise ValueError("alternating local and global layers need a layer index (no scan)")
    return (layer + 1) % self.global_every != 0

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)

  @property
  def cache_dtype(self):
    """The KV cache's dtype: the compute dtype, except with the CPU kernels (float32:
    XLA:CPU runs batched bfloat16 products, attention over the cache, by converting both
    operands to float32 on every call: for a bfloat16 cache a copy of it per token)."""
    return kernels.get(self.kernels).cache_dtype(self.compute_dtype)

  @property
  def caches_unembedding(self):
    """Whether cached decoding keeps the tied output projection E^T in the cache: with the
    CPU kernels and a compute dtype below float32 (kernels.IMPLEMENTATIONS says why)."""
    return (kernels.get(self.kernels).caches_unembedding and self.tie_embeddings and
            self.compute_dtype != jnp.dtype(jnp.float32))


def choose_kernels(model_config, platform):
  """config.model.kernels resolved for `platform`; a one-line ConfigError if it cannot be."""
  from lm.errors import ConfigError  # pylint: disable=import-outside-toplevel
  requested = model_config.get("kernels", "auto")
  if platform is None:
    if requested == "auto":
      raise ConfigError("model.kernels", "auto needs the platform the model runs on "
                        "(ModelConfig.from_config(..., platform=))")
    platform = kernels.get(requested).platforms[0]
  try:
    return kernels.choose(requested, platform, dtype=model_config.get("dtype", "float32"),
                          head_dim=(model_config.get("head_size", 0) or
                                    model_config.d_model // model_config.num_heads),
                          dropout=model_config.get("dropout", 0.0))
  except ValueError as e:
    raise ConfigError("model.kernels", str(e)) from None


# The model's hyper-parameters: a frozen, hashable view of config.model, its fields and
# defaults those lm/schema.py declares for the model (vocab_size includes extra_tokens).
# Its kernels default to the portable "xla" (config.model.kernels' "auto" is resolved by
# from_config for a platform).
ModelConfig = dataclasses.make_dataclass(
    "ModelConfig",
    [("vocab_size", int)] + [(f.key, f.value_type, dataclasses.field(
        default="xla" if f.key == "kernels" else f.default)) for f in schema.MODEL_VIEW],
    bases=(_ModelConfigBase,), frozen=True)
ModelConfig.__module__ = __name__
ModelConfig.__doc__ = ("The model's hyper-parameters (a frozen, hashable view of config.model; "
                       "fields and defaults from lm/schema.py).")


class RMSNorm1p(nn.Module):
  """Gemma's RMSNorm: x / rms(x) * (1 + scale) in float32, the scale initialised at 0."""

  cfg: ModelConfig
  axis: str = "embed"

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    scale = self.param("scale", lp(nn.initializers.zeros, (self.axis,)), (x.shape[-1],),
                       cfg.weight_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.norm_eps)
    return (y * (1.0 + scale.astype(jnp.float32))).astype(cfg.compute_dtype)


def make_norm(cfg, name, axis="embed"):
  """model.norm over the last axis (`axis`: its logical name; "kv" for a per-head norm)."""
  scale_init = lp(nn.initializers.ones, (axis,))
  bias_init = lp(nn.initializers.zeros, (axis,))
  if cfg.norm == "rmsnorm_1p":
    return RMSNorm1p(cfg, axis, name=name)
  if cfg.norm == "rmsnorm":
    return nn.RMSNorm(epsilon=cfg.norm_eps, dtype=cfg.compute_dtype,
                      param_dtype=cfg.weight_dtype, scale_init=scale_init, name=name)
  return nn.LayerNorm(epsilon=cfg.norm_eps, use_bias=cfg.use_bias, dtype=cfg.compute_dtype,
                      param_dtype=cfg.weight_dtype, scale_init=scale_init,
                      bias_init=bias_init, name=name)


def rotary(x_BxLxNxDh, positions_BxL, theta):
  """Rotary position embedding, rotate-half layout (as in Llama / GPT-NeoX)."""
  half = x_BxLxNxDh.shape[-1] // 2
  freq_half = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
  angle_BxLxhalf = positions_BxL[..., None].astype(jnp.float32) * freq_half
  sin_BxLx1xhalf = jnp.sin(angle_BxLxhalf)[:, :, None, :]
  cos_BxLx1xhalf = jnp.cos(angle_BxLxhalf)[:, :, None, :]
  x1, x2 = jnp.split(x_BxLxNxDh.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos_BxLx1xhalf - x2 * sin_BxLx1xhalf,
                         x2 * cos_BxLx1xhalf + x1 * sin_BxLx1xhalf], axis=-1)
  return out.astype(x_BxLxNxDh.dtype)


class Dense(nn.Module):
  """y = x @ kernel (+ bias), contracting x's last `len(axes) - len(features)` axes.

  The kernel is created with its full N-d shape and logical axis names (flax's DenseGeneral
  initialises a flat 2-d kernel, which clashes with N-d sharding constraints). Inputs are
  cast to the compute dtype; the product accumulates in float32.
  """

  features: tuple
  axes: tuple  # logical names of the kernel's axes: contracted ones, then `features`
  cfg: ModelConfig
  std: float = 0.02
  out_dtype: object = None  # default: the compute dtype; float32 keeps the accumulator
  bias: bool = None  # default: model.use_bias

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    n_in = len(self.axes) - len(self.features)
    shape = tuple(x.shape[-n_in:]) + tuple(self.features)
    kernel = self.param("kernel", lp(nn.initializers.normal(self.std), self.axes), shape,
                        cfg.weight_dtype)
    lead = x.shape[:x.ndim - n_in]
    x2 = x.reshape((-1, math.prod(shape[:n_in])))
    k2 = kernel.reshape((math.prod(shape[:n_in]), -1))
    y = kernels.get(cfg.kernels).matmul(x2.astype(cfg.compute_dtype),
                                        k2.astype(cfg.compute_dtype))
    y = y.reshape(lead + tuple(self.features))
    if cfg.use_bias if self.bias is None else self.bias:
      bias = self.param("bias", lp(nn.initializers.zeros, self.axes[n_in:]), self.features,
                        cfg.weight_dtype)
      y = y + bias.astype(jnp.float32)
    return y.astype(self.out_dtype or cfg.compute_dtype)


def layer_mask(mask, cfg, local):
  """The mask one layer attends with: `mask` (a kernels.Mask, or a cached decoder's
  {"global", "local"} booleans) for a global layer, through the window for a local one."""
  if isinstance(mask, dict):
    return mask["local" if local else "global"]
  if local:
    return mask.replace(window=cfg.sliding_window)
  return mask


def query_scale(cfg):
  """What the queries are multiplied by so that the kernels' 1/sqrt(Dh) makes the scores'
  scale 1/sqrt(query_pre_attn_scalar) (1 without it)."""
  if not cfg.query_pre_attn_scalar:
    return 1.0
  return (cfg.head_dim / cfg.query_pre_attn_scalar) ** 0.5


class Attention(nn.Module):
  """Causal self-attention with grouped key/value heads and optional RoPE, per-head q/k
  norms, a sliding window (`layer`'s kind: ModelConfig.is_local) and soft-capped scores."""

  cfg: ModelConfig
  layer: int = None  # its index in the stack (None: a scanned stack, every layer alike)

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, mask, deterministic, cache=None, cache_index=None):
    """Returns (output, cache). `mask`: a kernels.Mask. With a `cache` ({"k", "v"}:
    [B, K, S, Dh]), this call's keys and values are written at slots cache_index.. and the
    queries attend over all S slots (`mask` is then booleans [B, 1, 1, L, S] saying which,
    or {"global", "local"} such booleans with a window); the updated cache is returned."""
    cfg = self.cfg
    ops = kernels.get(cfg.kernels)
    dh = cfg.head_dim
    local = cfg.is_local(self.layer)
    mask = layer_mask(mask, cfg, local)
    qkv_bias = cfg.use_bias or cfg.qkv_bias
    q_BxLxHxDh = Dense((cfg.num_heads, dh), ("embed", "heads", "kv"), cfg, bias=qkv_bias,
                       name="query")(x_BxLxD)
    k_BxLxKxDh = Dense((cfg.num_kv_heads, dh), ("embed", "kv_heads", "kv"), cfg,
                       bias=qkv_bias, name="key")(x_BxLxD)
    v_BxLxKxDh = Dense((cfg.num_kv_heads, dh), ("embed", "kv_heads", "kv"), cfg,
                       bias=qkv_bias, name="value")(x_BxLxD)
    if cfg.qk_norm:
      q_BxLxHxDh = make_norm(cfg, "query_norm", axis="kv")(q_BxLxHxDh)
      k_BxLxKxDh = make_norm(cfg, "key_norm", axis="kv")(k_BxLxKxDh)
    if cfg.positions == "rope":
      theta = cfg.rope_local_theta if local and cfg.rope_local_theta else cfg.rope_theta
      q_BxLxHxDh = rotary(q_BxLxHxDh, positions_BxL, theta)
      k_BxLxKxDh = rotary(k_BxLxKxDh, positions_BxL, theta)
    if cfg.query_pre_attn_scalar:
      q_BxLxHxDh = (q_BxLxHxDh.astype(jnp.float32) * query_scale(cfg)).astype(
          q_BxLxHxDh.dtype)
    q_BxLxHxDh = constrain(q_BxLxHxDh, ("batch", "length", "heads", "kv"))
    if isinstance(cache_index, dict):  # a paged cache: {"k", "v"} pools [N, K, page, Dh]
      cache = paged_write(cache, cache_index, k_BxLxKxDh, v_BxLxKxDh)
      out_BxLxHxDh = ops.cached_attention(
          q_BxLxHxDh, paged_gather(cache["k"], cache_index["table"]),
          paged_gather(cache["v"], cache_index["table"]), mask, softcap=cfg.attn_softcap)
    elif cache is not None:
      write = lambda c, x: constrain(jax.lax.dynamic_update_slice_in_dim(
          c, x.transpose(0, 2, 1, 3).astype(c.dtype), cache_index, axis=2),
                                     ("batch", "kv_heads", "length", "kv"))
      cache = {"k": write(cache["k"], k_BxLxKxDh), "v": write(cache["v"], v_BxLxKxDh)}
      out_BxLxHxDh = ops.cached_attention(q_BxLxHxDh, cache["k"], cache["v"], mask,
                                          softcap=cfg.attn_softcap)
    else:
      use_dropout = cfg.dropout > 0.0 and not deterministic
      out_BxLxHxDh = ops.attention(
          q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, mask,
          dropout_rate=cfg.dropout if use_dropout else 0.0,
          dropout_rng=self.make_rng("dropout") if use_dropout else None,
          sow=sow_attention(self), softcap=cfg.attn_softcap)
    return Dense((cfg.d_model,), ("heads", "kv", "embed"), cfg, std=residual_std(cfg),
                 name="out")(out_BxLxHxDh), cache


def paged_write(pools, where, k_BxLxKxDh, v_BxLxKxDh):
  """The pools with this call's keys and values written at each row's positions, through
  its page table (`where`: {"table" [B, T], "positions" [B, L], "valid" [B, L]}); tokens
  that are not valid go to the scratch page 0."""
  page = pools["k"].shape[2]
  table_BxT, positions_BxL = where["table"], where["positions"]
  index_BxL = jnp.minimum(positions_BxL // page, table_BxT.shape[1] - 1)
  page_BxL = jnp.where(where["valid"], jnp.take_along_axis(table_BxT, index_BxL, axis=1), 0)
  offset_BxL = positions_BxL % page
  write = lambda pool, x: pool.at[page_BxL, :, offset_BxL].set(x.astype(pool.dtype))
  return {"k": write(pools["k"], k_BxLxKxDh), "v": write(pools["v"], v_BxLxKxDh)}


def paged_gather(pool_NxKxPxDh, table_BxT):
  """Each row's pages in order as one heads-first cache [B, K, T * page, Dh]."""
  pages_BxTxKxPxDh = pool_NxKxPxDh[table_BxT]
  b, t, k, p, dh = pages_BxTxKxPxDh.shape
  return pages_BxTxKxPxDh.transpose(0, 2, 1, 3, 4).reshape(b, k, t * p, dh)


def sow_attention(module):
  """The attention weights go to the "intermediates" collection when the caller asks for it
  (lm/inspect.py); otherwise None, so that attention takes its fast path."""
  if not module.is_mutable_collection("intermediates"):
    return None
  return lambda probs: module.sow("intermediates", "attention", probs)


def residual_std(cfg):
  """GPT-2's init for projections that write into the residual stream."""
  return 0.02 / (2 * cfg.num_layers) ** 0.5


def gelu(x, approximate=False):
  """GELU; exact as PyTorch computes it, x/2 * (1 + erf(x/sqrt 2)): XLA has erf as one
  operation, while jax.nn.gelu's erfc expands into a long chain of them (a slower train
  step on a CPU, and a slower compile). The two differ by at most 1e-6."""
  if approximate:
    return nn.gelu(x, approximate=True)
  return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(math.sqrt(0.5), x.dtype)))


class Mlp(nn.Module):
  """GELU (two matrices; exact or tanh-approximated), SwiGLU or GeGLU (three matrices)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    # The activation runs in float32 on the products' float32 accumulators; its result is
    # cast once to the compute dtype for the next product.
    up = lambda name: Dense((cfg.d_ff,), ("embed", "mlp"), cfg, out_dtype=jnp.float32,
                            name=name)
    if cfg.mlp == "swiglu":
      h_BxLxF = nn.silu(up("wi_gate")(x_BxLxD)) * up("wi_up")(x_BxLxD)
    elif cfg.mlp == "geglu":
      h_BxLxF = gelu(up("wi_gate")(x_BxLxD), approximate=True) * up("wi_up")(x_BxLxD)
    else:
      h_BxLxF = gelu(up("wi")(x_BxLxD), approximate=cfg.mlp == "gelu_tanh")
    h_BxLxF = h_BxLxF.astype(cfg.compute_dtype)
    h_BxLxF = constrain(h_BxLxF, ("batch", "length", "mlp"))
    return Dense((cfg.d_model,), ("mlp", "embed"), cfg, std=residual_std(cfg),
                 name="wo")(h_BxLxF)
