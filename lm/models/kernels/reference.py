"""The portable kernels and the attention maths every implementation shares.

Shapes: B batch, L query length, S key length, H query heads, K key/value heads, G query
heads per key head (H = K*G), Dh head size. Query head h uses key head h // G.
"""

import jax
import jax.numpy as jnp

NEG_INF = jnp.finfo(jnp.float32).min


def make_matmul(transpose_a_b):
  """(matmul, matmul_nt): x @ w and x @ w^T in the inputs' dtype with float32 accumulation,
  returning float32, whose backward products also run in the inputs' dtype (the incoming
  float32 cotangent is cast to it) with float32 accumulation. With bfloat16 compute every
  product of a train step is then a bfloat16 one, as under PyTorch's autocast; plain
  autodiff of a float32-accumulating product differentiates in float32, which runs at
  about half the speed wherever bfloat16 products are faster. With float32 inputs these
  are exactly jnp.dot and its usual gradients.

  `transpose_a_b(a_MxK, b_MxN)` computes a^T b (the weight gradient): the one product whose
  best form differs between platforms (lm/models/kernels/cpu.py)."""

  @jax.custom_vjp
  def matmul(x_MxK, w_KxN):
    return jax.lax.dot(x_MxK, w_KxN, preferred_element_type=jnp.float32)

  def matmul_fwd(x_MxK, w_KxN):
    return matmul(x_MxK, w_KxN), (x_MxK, w_KxN)

  def matmul_bwd(res, g_MxN):
    x_MxK, w_KxN = res
    g_MxN = g_MxN.astype(x_MxK.dtype)
    dx_MxK = a_transpose_b(g_MxN, w_KxN)
    dw_KxN = transpose_a_b(x_MxK, g_MxN)
    return dx_MxK.astype(x_MxK.dtype), dw_KxN.astype(w_KxN.dtype)

  matmul.defvjp(matmul_fwd, matmul_bwd)

  @jax.custom_vjp
  def matmul_nt(x_MxK, w_NxK):
    """For a weight stored [N, K] (a tied embedding): matmul(x, w.T) would hand XLA a
    transposed operand, which XLA:CPU runs in float32 when the dtype is bfloat16."""
    return a_transpose_b(x_MxK, w_NxK)

  def matmul_nt_fwd(x_MxK, w_NxK):
    return matmul_nt(x_MxK, w_NxK), (x_MxK, w_NxK)

  def matmul_nt_bwd(res, g_MxN):
    x_MxK, w_NxK = res
    g_MxN = g_MxN.astype(x_MxK.dtype)
    dx_MxK = jax.lax.dot(g_MxN, w_NxK, preferred_element_type=jnp.float32)
    dw_NxK = transpose_a_b(g_MxN, x_MxK)
    return dx_MxK.astype(x_MxK.dtype), dw_NxK.astype(w_NxK.dtype)

  matmul_nt.defvjp(matmul_nt_fwd, matmul_nt_bwd)
  return matmul, matmul_nt


def transpose_a_b(a_MxK, b_MxN):
  """a^T b (contracting the leading axes), float32 accumulation."""
  return jax.lax.dot_general(a_MxK, b_MxN, (((0,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)


def a_transpose_b(a_MxN, b_KxN):
  """a b^T (contracting the trailing axes), float32 accumulation."""
  return jax.lax.dot_general(a_MxN, b_KxN, (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)


matmul, matmul_nt = make_matmul(transpose_a_b)


# The materialised attention maths: the masked softmax once, the products per layout.

def softcap(logits, cap):
  """cap * tanh(logits / cap): Gemma 2's soft cap (cap 0: the logits as they are)."""
  if not cap:
    return logits
  return cap * jnp.tanh(logits / cap)


def masked_softmax(logits_BxKxGxLxS, mask, head_dim, cap=0.0):
  """softmax(softcap(logits / sqrt(Dh))) over the keys in float32, masked keys at -inf (a
  query that sees no key at all gets uniform weights, never NaN)."""
  logits_BxKxGxLxS = softcap(logits_BxKxGxLxS * (head_dim ** -0.5), cap)
  return jax.nn.softmax(jnp.where(mask, logits_BxKxGxLxS, NEG_INF), axis=-1)


def probs(q_BxLxHxDh, k_BxSxKxDh, mask, cap=0.0):
  """The attention probabilities, [B, K, G, L, S] in float32; `mask` broadcasts to them;
  `cap`: the scores' soft cap."""
  b, length, h, dh = q_BxLxHxDh.shape
  kv_heads = k_BxSxKxDh.shape[2]
  q_BxLxKxGxDh = q_BxLxHxDh.reshape(b, length, kv_heads, h // kv_heads, dh)
  logits_BxKxGxLxS = jnp.einsum("blkgd,bskd->bkgls", q_BxLxKxGxDh, k_BxSxKxDh,
                                preferred_element_type=jnp.float32)
  return masked_softmax(logits_BxKxGxLxS, mask, dh, cap)


def weighted_values(probs_BxKxGxLxS, v_BxSxKxDh, q_shape):
  """sum_s probs * v as [B, L, H, Dh] in v's dtype (float32 accumulation)."""
  out_BxLxKxGxDh = jnp.einsum("bkgls,bskd->blkgd", probs_BxKxGxLxS.astype(v_BxSxKxDh.dtype),
                              v_BxSxKxDh, preferred_element_type=jnp.float32)
  return out_BxLxKxGxDh.reshape(q_shape).astype(v_BxSxKxDh.dtype)


def materialised_attention(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask, dropout_rate=0.0,
                           dropout_rng=None, sow=None, softcap=0.0):
  """Attention through the [B, K, G, L, S] probabilities, differentiated by autodiff:
  the path for attention dropout, soft-capped scores and inspections that ask for the
  weights (`sow(probs_BxHxLxS)` receives them, before dropout). `mask`: a kernels.Mask."""
  b, length, h, _ = q_BxLxHxDh.shape
  p = probs(q_BxLxHxDh, k_BxSxKxDh, mask.dense(length, k_BxSxKxDh.shape[1]), softcap)
  if sow is not None:
    sow(p.reshape(b, h, length, -1))
  if dropout_rate > 0.0 and dropout_rng is not None:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, p.shape)
    p = jnp.where(keep, p / (1.0 - dropout_rate), 0.0)
  return weighted_values(p, v_BxSxKxDh, q_BxLxHxDh.shape)


def cached_attention(q_BxLxHxDh, k_BxKxSxDh, v_BxKxSxDh, mask, softcap=0.0):
  """Attention over a KV cache stored heads-first ([B, K, S, Dh]): both products are then
  plain batched matmuls over (B, K), and the cache is never transposed. `mask`: booleans
  broadcasting to [B, K, G, L, S] (which slots each query sees); `softcap`: the scores'."""
  b, length, h, dh = q_BxLxHxDh.shape
  k = k_BxKxSxDh.shape[1]
  q_BxKxGxLxDh = q_BxLxHxDh.reshape(b, length, k, h // k, dh).transpose(0, 2, 3, 1, 4)
  logits_BxKxGxLxS = jnp.einsum("bkgld,bksd->bkgls", q_BxKxGxLxDh, k_BxKxSxDh,
                                preferred_element_type=jnp.float32)
  probs_BxKxGxLxS = masked_softmax(logits_BxKxGxLxS, mask, dh, softcap)
  out_BxKxGxLxDh = jnp.einsum("bkgls,bksd->bkgld", probs_BxKxGxLxS.astype(v_BxKxSxDh.dtype),
                              v_BxKxSxDh)
  return out_BxKxGxLxDh.transpose(0, 3, 1, 2, 4).reshape(b, length, h, dh)


def xla_attention(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask):
  """jax.nn.dot_product_attention's XLA implementation (GQA native; logits and softmax in
  float32), the portable reference the fused kernels are tested against."""
  dense = None
  if mask.has_segments:  # [B, 1, L, S]: broadcast over heads
    dense = mask.q_segment_ids_BxL[:, None, :, None] == mask.kv_segments[:, None, None, :]
  return jax.nn.dot_product_attention(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask=dense,
                                      is_causal=mask.causal, implementation="xla",
                                      local_window_size=local_window(mask))


def local_window(mask):
  """jax.nn.dot_product_attention's local_window_size (keys before, keys after) for a
  Mask's sliding window; None without one."""
  if not mask.window:
    return None
  return (mask.window - 1, 0 if mask.causal else mask.window - 1)
