"""GPU attention: cuDNN's fused flash attention, and a Pallas (Triton) flash-attention
kernel for what cuDNN is not given here.

cudnn:      jax.nn.dot_product_attention(implementation="cudnn"), bfloat16 or float16,
            causal or bidirectional, grouped key heads. A call with segment ids (packed
            documents, padded encoder rows) goes to the Triton kernel: cuDNN takes packed
            segments only on Hopper and later, through JAX's private API, and a dense mask
            only as an [L, S] bias in memory, which is what fusing is meant to avoid.
pallas_gpu: the Triton kernel for every call (float32 too): causal or bidirectional, segment
            ids, grouped key heads (repeated to the query heads for the kernel, whose
            backward sums them back), under shard_map on the mesh.

Both fused kernels need self-attention at a length that is a multiple of 128 (Triton's
blocks; cross-attention and other lengths take the reference kernel). Lowering cuDNN's
kernel needs cuDNN's library (the jax-cuda plugin and its nvidia-cudnn wheel), even with
no GPU; the Triton kernel lowers with JAX alone. `interpret=True` runs the Triton kernel in
Pallas's interpreter, on any platform, for tests.
"""

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as triton

from lm.models.kernels import reference, sharded

BLOCK = 128
CUDNN_CUSTOM_CALL = "__cudnn$fmha"  # a prefix: __cudnn$fmhaSoftmax, ...Backward
TRITON_CUSTOM_CALL = "__gpu$xla.gpu.triton"
CUDNN_DTYPES = ("bfloat16", "float16")


def cudnn_available():
  """Whether cuDNN's library can be loaded (a GPU is not needed to lower its kernel)."""
  from jax._src.lib import cuda_versions  # pylint: disable=import-outside-toplevel
  if cuda_versions is None:
    return False
  try:
    cuda_versions.cudnn_get_version()
  except RuntimeError:
    return False
  return True


def cudnn_head_dim_fits(head_dim):
  return head_dim % 8 == 0 and head_dim <= 128  # 256 on Hopper and later


def triton_head_dim_fits(head_dim):
  return head_dim >= 16 and head_dim & (head_dim - 1) == 0  # a power of two


def _self_attention_fits(q_BxLxHxDh, k_BxSxKxDh):
  length, kv_length = q_BxLxHxDh.shape[1], k_BxSxKxDh.shape[1]
  return length == kv_length and length % BLOCK == 0


def pallas_attention(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask, interpret=False):
  if not (_self_attention_fits(q_BxLxHxDh, k_BxSxKxDh)
          and triton_head_dim_fits(q_BxLxHxDh.shape[-1])):
    return reference.xla_attention(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask)
  if (mask.has_segments and not mask.self_segments) or mask.window:
    # The kernel takes one segment-id row for queries and keys (self-attention), and no
    # sliding window.
    return reference.xla_attention(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask)

  def local(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, segments_BxL, _):
    groups = q_BxLxHxDh.shape[2] // k_BxSxKxDh.shape[2]
    repeat = lambda x: jnp.repeat(x, groups, axis=2) if groups > 1 else x
    out = triton.mha(q_BxLxHxDh, repeat(k_BxSxKxDh), repeat(v_BxSxKxDh), segments_BxL,
                     sm_scale=1.0 / math.sqrt(q_BxLxHxDh.shape[-1]), causal=mask.causal,
                     interpret=interpret)
    return out.astype(v_BxSxKxDh.dtype)

  segments = None if not mask.has_segments else mask.q_segment_ids_BxL.astype(jnp.int32)
  return sharded.per_shard(local, q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, segments, segments)


def cudnn_attention(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask):
  if mask.has_segments:
    return pallas_attention(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask)
  return jax.nn.dot_product_attention(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh,
                                      is_causal=mask.causal, implementation="cudnn",
                                      local_window_size=reference.local_window(mask))
