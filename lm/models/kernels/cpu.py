"""XLA:CPU's kernels: the matmuls and attention lm's CPU train steps were tuned with.

Both are hand-differentiated: the weight gradient a^T b with a^T made row-major first, and
attention with FlashAttention's row term in its backward pass. They materialise the
[B, K, G, L, S] probabilities (memory quadratic in length), which a CPU run can afford
and which no accelerator should pay: lm/models/kernels/gpu.py and tpu.py fuse them away.
"""

import jax
import jax.numpy as jnp

from lm.models.kernels import reference

# The name scope of the barrier copies below: lm/lowering.py finds them by it in a lowered
# program (jax.checkpoint puts barriers of its own into rematerialised programs).
COPY_SCOPE = "lm_cpu_transposed_copy"


def _transpose_a_b(a_MxK, b_MxN):
  """a^T b, float32 accumulation. XLA:CPU runs it about twice as fast with a^T
  materialised row-major first (a small copy). The barrier keeps XLA from folding the
  transpose back into the product; taking it flat keeps layout assignment from giving a^T
  a column-major layout, with which XLA:CPU runs a bfloat16 product in float32."""
  m, k = a_MxK.shape
  with jax.named_scope(COPY_SCOPE):
    at_KxM = jax.lax.optimization_barrier(a_MxK.T.reshape(k * m)).reshape(k, m)
  return jax.lax.dot(at_KxM, b_MxN, preferred_element_type=jnp.float32)


matmul, matmul_nt = reference.make_matmul(_transpose_a_b)


def attention(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask):
  """Attention without dropout, with a hand-written backward pass (`mask`: kernels.Mask).

  The backward pass takes softmax's row term from the output, sum_d(dO * O) per query
  (FlashAttention's D), instead of differentiating through the softmax (a reduction over
  every [L, S] score: the slowest part of a small model's train step on a CPU), and runs
  its four products in the inputs' dtype with float32 accumulation (bfloat16 products with
  bfloat16 compute). The gradients equal plain autodiff's (tests/test_kernels.py)."""
  return _dense_attention(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh,
                          mask.dense(q_BxLxHxDh.shape[1], k_BxSxKxDh.shape[1]))


@jax.custom_vjp
def _dense_attention(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask):
  return _attention_fwd(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask)[0]


def _attention_fwd(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask):
  probs_BxKxGxLxS = reference.probs(q_BxLxHxDh, k_BxSxKxDh, mask)
  out_BxLxHxDh = reference.weighted_values(probs_BxKxGxLxS, v_BxSxKxDh, q_BxLxHxDh.shape)
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


_dense_attention.defvjp(_attention_fwd, _attention_bwd)
