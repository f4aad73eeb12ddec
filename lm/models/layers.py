"""Transformer building blocks: attention (MHA/GQA, RoPE, masks), MLPs, norms.

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

lp = nn.with_logical_partitioning
constrain = nn.with_logical_constraint


@jax.custom_vjp
def matmul(x_MxK, w_KxN):
  """x @ w in the inputs' dtype with float32 accumulation, returning float32.

  The backward products also run in the inputs' dtype (the incoming float32 cotangent is
  cast to it), with float32 accumulation: with bfloat16 compute every matmul of a train step
  is a bfloat16 one, as under PyTorch's autocast. (Plain autodiff of a float32-accumulating
  product differentiates in float32: about half the speed on CPUs with bfloat16 dots.) With
  float32 inputs this is exactly jnp.dot and its usual gradients."""
  return jax.lax.dot(x_MxK, w_KxN, preferred_element_type=jnp.float32)


def _transpose_a_b(a_MxK, b_MxN):
  """a^T b (contracting the leading axes), in the inputs' dtype with float32 accumulation."""
  if jax.default_backend() == "cpu":
    # XLA:CPU runs a^T b about twice as fast with a^T materialised row-major first (a small
    # copy). The barrier keeps XLA from folding the transpose back into the product; taking
    # it flat keeps layout assignment from giving a^T a column-major layout, with which
    # XLA:CPU runs a bfloat16 product in float32.
    m, k = a_MxK.shape
    at_KxM = jax.lax.optimization_barrier(a_MxK.T.reshape(k * m)).reshape(k, m)
    return jax.lax.dot(at_KxM, b_MxN, preferred_element_type=jnp.float32)
  return jax.lax.dot_general(a_MxK, b_MxN, (((0,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _a_transpose_b(a_MxN, b_KxN):
  """a b^T (contracting the trailing axes), float32 accumulation."""
  return jax.lax.dot_general(a_MxN, b_KxN, (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _matmul_fwd(x_MxK, w_KxN):
  return matmul(x_MxK, w_KxN), (x_MxK, w_KxN)


def _matmul_bwd(res, g_MxN):
  x_MxK, w_KxN = res
  g_MxN = g_MxN.astype(x_MxK.dtype)
  dx_MxK = _a_transpose_b(g_MxN, w_KxN)
  dw_KxN = _transpose_a_b(x_MxK, g_MxN)
  return dx_MxK.astype(x_MxK.dtype), dw_KxN.astype(w_KxN.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


@jax.custom_vjp
def matmul_nt(x_MxK, w_NxK):
  """x @ w^T, as `matmul` (compute dtype, float32 accumulation, bfloat16 backward), for a
  weight stored [N, K]: a tied embedding. (matmul(x, w.T) hands XLA a transposed operand,
  which XLA:CPU runs in float32 when the dtype is bfloat16.)"""
  return _a_transpose_b(x_MxK, w_NxK)


def _matmul_nt_fwd(x_MxK, w_NxK):
  return matmul_nt(x_MxK, w_NxK), (x_MxK, w_NxK)


def _matmul_nt_bwd(res, g_MxN):
  x_MxK, w_NxK = res
  g_MxN = g_MxN.astype(x_MxK.dtype)
  dx_MxK = jax.lax.dot(g_MxN, w_NxK, preferred_element_type=jnp.float32)
  dw_NxK = _transpose_a_b(g_MxN, x_MxK)
  return dx_MxK.astype(x_MxK.dtype), dw_NxK.astype(w_NxK.dtype)


matmul_nt.defvjp(_matmul_nt_fwd, _matmul_nt_bwd)


def tied_logits(cfg, embedding_VxD, x_BxLxD, unembed_DxV=None):
  """Output logits through the (tied) input embedding: x @ E^T in the compute dtype with
  float32 accumulation, returned in float32 (flax's `Embed.attend` rounds them to the
  compute dtype). `unembed_DxV`: E^T already made (see ModelConfig.caches_unembedding)."""
  lead, d = x_BxLxD.shape[:-1], x_BxLxD.shape[-1]
  x_NxD = x_BxLxD.reshape(-1, d).astype(cfg.compute_dtype)
  if unembed_DxV is None:
    y = matmul_nt(x_NxD, embedding_VxD.astype(cfg.compute_dtype))
  else:
    y = matmul(x_NxD, unembed_DxV)
  return y.reshape(lead + (embedding_VxD.shape[0],))


class _ModelConfigBase:
  """What ModelConfig computes from its fields."""

  @classmethod
  def from_config(cls, model_config, vocab_size):
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in model_config.items() if k in fields and k != "vocab_size"}
    extra = model_config.get("extra_tokens", 0)  # ids after the tokenizer's (sentinels)
    return cls(vocab_size=(model_config.vocab_size or vocab_size) + extra, **values)

  @property
  def head_dim(self):
    return self.d_model // self.num_heads

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)

  @property
  def cache_dtype(self):
    """The KV cache's dtype: the compute dtype, except float32 on CPU. XLA:CPU runs batched
    bfloat16 products (attention over the cache) by converting both operands to float32 on
    every call: for a bfloat16 cache that is a copy of the whole cache per decoded token."""
    if jax.default_backend() == "cpu":
      return jnp.dtype(jnp.float32)
    return self.compute_dtype

  @property
  def caches_unembedding(self):
    """Whether cached decoding keeps the tied output projection E^T in the cache: on CPU with
    a compute dtype below float32. XLA:CPU's bfloat16 x @ E^T for a few rows is slow with E
    as stored ([V, D]); a row-major E^T made once per prefill is faster (GPT-2-small, batch
    16: 36.5 instead of 39.8 ms a token)."""
    return (jax.default_backend() == "cpu" and self.tie_embeddings and
            self.compute_dtype != jnp.dtype(jnp.float32))


# The model's hyper-parameters: a frozen, hashable view of config.model, its fields and
# defaults those lm/schema.py declares for the model (vocab_size includes extra_tokens).
ModelConfig = dataclasses.make_dataclass(
    "ModelConfig",
    [("vocab_size", int)] + [(f.key, f.value_type, dataclasses.field(default=f.default))
                             for f in schema.MODEL_VIEW],
    bases=(_ModelConfigBase,), frozen=True)
ModelConfig.__module__ = __name__
ModelConfig.__doc__ = ("The model's hyper-parameters (a frozen, hashable view of config.model; "
                       "fields and defaults from lm/schema.py).")


def make_norm(cfg, name):
  scale_init = lp(nn.initializers.ones, ("embed",))
  bias_init = lp(nn.initializers.zeros, ("embed",))
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


def attention_mask(length, segment_ids_BxL=None):
  """Causal mask [B or 1, 1, 1, L, S]; with segment ids, tokens see only their own segment."""
  causal_LxS = jnp.tril(jnp.ones((length, length), dtype=jnp.bool_))
  mask = causal_LxS[None, None, None]
  if segment_ids_BxL is not None:
    same_BxLxS = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
    mask = mask & same_BxLxS[:, None, None]
  return mask


def dot_product_attention(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask, dropout_rate=0.0,
                          dropout_rng=None, sow=None):
  """Grouped-query attention; softmax in float32. mask broadcasts to [B, K, G, L, S].

  `sow(probs_BxHxLxS)`, if given, receives the attention weights (before dropout). Without
  dropout or `sow`, the products run through `attention`, whose hand-written backward pass
  is the fast one."""
  if sow is None and not (dropout_rate > 0.0 and dropout_rng is not None):
    return attention(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask)
  b, length, h, dh = q_BxLxHxDh.shape
  probs_BxKxGxLxS = _attention_probs(q_BxLxHxDh, k_BxSxKxDh, mask)
  if sow is not None:
    sow(probs_BxKxGxLxS.reshape(b, h, length, -1))
  if dropout_rate > 0.0 and dropout_rng is not None:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs_BxKxGxLxS.shape)
    probs_BxKxGxLxS = jnp.where(keep, probs_BxKxGxLxS / (1.0 - dropout_rate), 0.0)
  return _attention_out(probs_BxKxGxLxS, v_BxSxKxDh, q_BxLxHxDh.shape)


def _attention_probs(q_BxLxHxDh, k_BxSxKxDh, mask):
  b, length, h, dh = q_BxLxHxDh.shape
  k = k_BxSxKxDh.shape[2]
  q_BxLxKxGxDh = q_BxLxHxDh.reshape(b, length, k, h // k, dh)
  logits_BxKxGxLxS = jnp.einsum("blkgd,bskd->bkgls", q_BxLxKxGxDh, k_BxSxKxDh,
                                preferred_element_type=jnp.float32)
  logits_BxKxGxLxS = logits_BxKxGxLxS * (dh ** -0.5)
  logits_BxKxGxLxS = jnp.where(mask, logits_BxKxGxLxS, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(logits_BxKxGxLxS, axis=-1)


def _attention_out(probs_BxKxGxLxS, v_BxSxKxDh, q_shape):
  out_BxLxKxGxDh = jnp.einsum("bkgls,bskd->blkgd", probs_BxKxGxLxS.astype(v_BxSxKxDh.dtype),
                              v_BxSxKxDh, preferred_element_type=jnp.float32)
  return out_BxLxKxGxDh.reshape(q_shape).astype(v_BxSxKxDh.dtype)


@jax.custom_vjp
def attention(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask):
  """dot_product_attention without dropout, with a hand-written backward pass.

  The backward pass takes softmax's row term from the output, sum_d(dO * O) per query
  (FlashAttention's D), instead of differentiating through the softmax (a reduction over
  every [L, S] score: the slowest part of a small model's train step on a CPU), and runs
  its four products in the inputs' dtype with float32 accumulation (bfloat16 products with
  bfloat16 compute). The gradients equal plain autodiff's (tests/test_models.py)."""
  return _attention_fwd(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask)[0]


def _attention_fwd(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask):
  probs_BxKxGxLxS = _attention_probs(q_BxLxHxDh, k_BxSxKxDh, mask)
  out_BxLxHxDh = _attention_out(probs_BxKxGxLxS, v_BxSxKxDh, q_BxLxHxDh.shape)
  return out_BxLxHxDh, (q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask, probs_BxKxGxLxS,
                        out_BxLxHxDh)


def _attention_bwd(res, g_BxLxHxDh):
  q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask, probs_BxKxGxLxS, out_BxLxHxDh = res
  b, length, h, dh = q_BxLxHxDh.shape
  k = k_BxSxKxDh.shape[2]
  dtype = q_BxLxHxDh.dtype
  split = lambda x: x.reshape(b, length, k, h // k, dh)
  g_BxLxKxGxDh = split(g_BxLxHxDh.astype(dtype))
  f32 = jnp.float32
  dprobs_BxKxGxLxS = jnp.einsum("blkgd,bskd->bkgls", g_BxLxKxGxDh, v_BxSxKxDh,
                                preferred_element_type=f32)
  dv_BxSxKxDh = jnp.einsum("bkgls,blkgd->bskd", probs_BxKxGxLxS.astype(dtype), g_BxLxKxGxDh,
                           preferred_element_type=f32)
  # sum_s(P * dP) = dO . O, one value per query: the softmax's backward row term.
  rows_BxLxKxG = jnp.sum(g_BxLxKxGxDh.astype(f32) * split(out_BxLxHxDh).astype(f32), axis=-1)
  rows_BxKxGxLx1 = rows_BxLxKxG.transpose(0, 2, 3, 1)[..., None]
  dlogits_BxKxGxLxS = jnp.where(mask, probs_BxKxGxLxS * (dprobs_BxKxGxLxS - rows_BxKxGxLx1),
                                0.0) * (dh ** -0.5)
  dlogits_BxKxGxLxS = dlogits_BxKxGxLxS.astype(dtype)
  dq_BxLxKxGxDh = jnp.einsum("bkgls,bskd->blkgd", dlogits_BxKxGxLxS, k_BxSxKxDh,
                             preferred_element_type=f32)
  q_BxLxKxGxDh = split(q_BxLxHxDh)
  dk_BxSxKxDh = jnp.einsum("bkgls,blkgd->bskd", dlogits_BxKxGxLxS, q_BxLxKxGxDh,
                           preferred_element_type=f32)
  return (dq_BxLxKxGxDh.reshape(q_BxLxHxDh.shape).astype(dtype),
          dk_BxSxKxDh.astype(k_BxSxKxDh.dtype), dv_BxSxKxDh.astype(v_BxSxKxDh.dtype), None)


attention.defvjp(_attention_fwd, _attention_bwd)


def cached_attention(q_BxLxHxDh, k_BxKxSxDh, v_BxKxSxDh, mask):
  """dot_product_attention over a KV cache stored heads-first ([B, K, S, Dh]): both products
  are then plain batched matmuls over (B, K), and the cache is never transposed."""
  b, length, h, dh = q_BxLxHxDh.shape
  k = k_BxKxSxDh.shape[1]
  q_BxKxGxLxDh = q_BxLxHxDh.reshape(b, length, k, h // k, dh).transpose(0, 2, 3, 1, 4)
  logits_BxKxGxLxS = jnp.einsum("bkgld,bksd->bkgls", q_BxKxGxLxDh, k_BxKxSxDh,
                                preferred_element_type=jnp.float32) * (dh ** -0.5)
  logits_BxKxGxLxS = jnp.where(mask, logits_BxKxGxLxS, jnp.finfo(jnp.float32).min)
  probs_BxKxGxLxS = jax.nn.softmax(logits_BxKxGxLxS, axis=-1)
  out_BxKxGxLxDh = jnp.einsum("bkgls,bksd->bkgld", probs_BxKxGxLxS.astype(v_BxKxSxDh.dtype),
                              v_BxKxSxDh)
  return out_BxKxGxLxDh.transpose(0, 3, 1, 2, 4).reshape(b, length, h, dh)


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
    y = matmul(x2.astype(cfg.compute_dtype), k2.astype(cfg.compute_dtype))
    y = y.reshape(lead + tuple(self.features))
    if cfg.use_bias:
      bias = self.param("bias", lp(nn.initializers.zeros, self.axes[n_in:]), self.features,
                        cfg.weight_dtype)
      y = y + bias.astype(jnp.float32)
    return y.astype(self.out_dtype or cfg.compute_dtype)


class Attention(nn.Module):
  """Causal self-attention with grouped key/value heads and optional RoPE."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, mask, deterministic, cache=None, cache_index=None):
    """Returns (output, cache). With a `cache` ({"k", "v"}: [B, K, S, Dh]), this call's keys
    and values are written at slots cache_index.. and the queries attend over all S slots
    (`mask` [B, 1, 1, L, S] says which); the updated cache is returned."""
    cfg = self.cfg
    dh = cfg.head_dim
    q_BxLxHxDh = Dense((cfg.num_heads, dh), ("embed", "heads", "kv"), cfg, name="query")(x_BxLxD)
    k_BxLxKxDh = Dense((cfg.num_kv_heads, dh), ("embed", "kv_heads", "kv"), cfg,
                       name="key")(x_BxLxD)
    v_BxLxKxDh = Dense((cfg.num_kv_heads, dh), ("embed", "kv_heads", "kv"), cfg,
                       name="value")(x_BxLxD)
    if cfg.positions == "rope":
      q_BxLxHxDh = rotary(q_BxLxHxDh, positions_BxL, cfg.rope_theta)
      k_BxLxKxDh = rotary(k_BxLxKxDh, positions_BxL, cfg.rope_theta)
    q_BxLxHxDh = constrain(q_BxLxHxDh, ("batch", "length", "heads", "kv"))
    if cache is not None:
      write = lambda c, x: constrain(jax.lax.dynamic_update_slice_in_dim(
          c, x.transpose(0, 2, 1, 3).astype(c.dtype), cache_index, axis=2),
                                     ("batch", "kv_heads", "length", "kv"))
      cache = {"k": write(cache["k"], k_BxLxKxDh), "v": write(cache["v"], v_BxLxKxDh)}
      out_BxLxHxDh = cached_attention(q_BxLxHxDh, cache["k"], cache["v"], mask)
    else:
      use_dropout = cfg.dropout > 0.0 and not deterministic
      out_BxLxHxDh = dot_product_attention(
          q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, mask,
          dropout_rate=cfg.dropout if use_dropout else 0.0,
          dropout_rng=self.make_rng("dropout") if use_dropout else None,
          sow=sow_attention(self))
    return Dense((cfg.d_model,), ("heads", "kv", "embed"), cfg, std=residual_std(cfg),
                 name="out")(out_BxLxHxDh), cache


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
  """GELU (two matrices; exact or tanh-approximated) or SwiGLU (three matrices)."""

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
    else:
      h_BxLxF = gelu(up("wi")(x_BxLxD), approximate=cfg.mlp == "gelu_tanh")
    h_BxLxF = h_BxLxF.astype(cfg.compute_dtype)
    h_BxLxF = constrain(h_BxLxF, ("batch", "length", "mlp"))
    return Dense((cfg.d_model,), ("mlp", "embed"), cfg, std=residual_std(cfg),
                 name="wo")(h_BxLxF)
