"""TPU attention: Pallas splash attention (what MaxText and Levanter run), causal or
bidirectional, with segment ids and grouped key heads, under shard_map on the mesh.

Splash needs query and key lengths that are multiples of 128 (its blocks); other lengths
(a short prompt scored in one call, say) take the reference kernel, whose cost at such
lengths is small. `interpret=True` runs the kernel in Pallas's interpreter, on any
platform: tests/test_kernels.py checks it against the reference on a CPU.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

from lm.models.kernels import reference, sharded

BLOCK = 128  # splash's lane width: lengths must be multiples of it
CUSTOM_CALL = "tpu_custom_call"


def fits(length, kv_length):
  return length % BLOCK == 0 and kv_length % BLOCK == 0


def _block(n, largest=512):
  """The largest block of at most `largest` that divides n (a multiple of BLOCK)."""
  return max(b for b in range(BLOCK, min(n, largest) + 1, BLOCK) if n % b == 0)


@functools.lru_cache(maxsize=64)
def _kernel(heads, length, kv_length, causal, window, interpret):
  """The splash kernel for one example's [H, L, Dh] queries: its block-sparsity tables are
  numpy work done once per shape (made concrete even when first asked for under a trace,
  so that the cached kernel holds no tracer). A sliding window is a LocalMask, whose
  blocks outside the window splash skips."""
  if window:
    one = masks.LocalMask((length, kv_length), (window - 1, 0 if causal else window - 1),
                          offset=0)
  elif causal:
    one = masks.CausalMask((length, kv_length))
  else:
    one = masks.FullMask((length, kv_length))
  bq, bkv = _block(length), _block(kv_length)
  sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                            block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq,
                            block_kv_dq=bkv)
  with jax.ensure_compile_time_eval():
    return splash.make_splash_mha(masks.MultiHeadMask([one] * heads), block_sizes=sizes,
                                  head_shards=1, q_seq_shards=1, interpret=interpret)


def attention(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask, interpret=False):
  length, kv_length = q_BxLxHxDh.shape[1], k_BxSxKxDh.shape[1]
  if not fits(length, kv_length):
    return reference.xla_attention(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask)

  def local(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, q_seg_BxL, kv_seg_BxS):
    kernel = _kernel(q_BxLxHxDh.shape[2], length, kv_length, mask.causal, mask.window,
                     interpret)
    scale = np.asarray(q_BxLxHxDh.shape[-1] ** -0.5, q_BxLxHxDh.dtype)
    heads_first = lambda x: x.transpose(0, 2, 1, 3)  # splash takes [H, L, Dh] per example

    def one(q_HxLxDh, k_KxSxDh, v_KxSxDh, q_seg_L, kv_seg_S):
      segments = None if q_seg_L is None else splash.SegmentIds(q=q_seg_L, kv=kv_seg_S)
      return kernel(q_HxLxDh * scale, k_KxSxDh, v_KxSxDh, segment_ids=segments)

    out_BxHxLxDh = jax.vmap(one)(heads_first(q_BxLxHxDh), heads_first(k_BxSxKxDh),
                                 heads_first(v_BxSxKxDh), q_seg_BxL, kv_seg_BxS)
    return heads_first(out_BxHxLxDh).astype(v_BxSxKxDh.dtype)

  segs = (None, None) if not mask.has_segments else (
      mask.q_segment_ids_BxL.astype(jnp.int32), mask.kv_segments.astype(jnp.int32))
  return sharded.per_shard(local, q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, *segs)
