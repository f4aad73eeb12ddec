"""Which keys each query may see, as the kernels take it: a causal flag, segment ids and a
sliding window.

A dense [B, 1, 1, L, S] boolean mask is what the materialised kernels use; the fused ones
(cuDNN, Pallas) take the flag and the ids and never build it.
"""

import flax.struct
import jax.numpy as jnp


@flax.struct.dataclass
class Mask:
  """Query l sees key s when (not causal or s <= l) and, with segment ids, when both carry
  the same id. Padding is a segment of its own (id 0 in lm's data): a real token never
  sees it. `kv_segment_ids_BxS=None` with query ids: self-attention, the keys' ids are the
  queries'. Cross-attention gives every query id 1 and every real memory position id 1,
  padding 0."""

  q_segment_ids_BxL: object = None
  kv_segment_ids_BxS: object = None  # None: the queries' (self-attention)
  causal: bool = flax.struct.field(pytree_node=False, default=False)
  # > 0: query l sees keys s with l - window < s (and, not causal, s < l + window): itself
  # and the window - 1 keys before it (self-attention: indexes are positions).
  window: int = flax.struct.field(pytree_node=False, default=0)

  def __post_init__(self):
    if self.q_segment_ids_BxL is None and self.kv_segment_ids_BxS is not None:
      raise ValueError("Mask: key segment ids without query segment ids")

  @property
  def has_segments(self):
    return self.q_segment_ids_BxL is not None

  @property
  def self_segments(self):
    """Whether queries and keys share one row of segment ids (self-attention)."""
    return self.kv_segment_ids_BxS is None

  @property
  def kv_segments(self):
    return self.q_segment_ids_BxL if self.kv_segment_ids_BxS is None else self.kv_segment_ids_BxS

  def dense(self, length, kv_length):
    """[B or 1, 1, 1, L, S] booleans (broadcasting over key heads and groups)."""
    mask = jnp.ones((1, 1, 1, length, kv_length), jnp.bool_)
    if self.causal:
      mask = mask & jnp.tril(jnp.ones((length, kv_length), jnp.bool_))[None, None, None]
    if self.window:
      distance_LxS = jnp.arange(length)[:, None] - jnp.arange(kv_length)[None, :]
      near_LxS = (distance_LxS < self.window) & (-distance_LxS < self.window)
      mask = mask & near_LxS[None, None, None]
    if self.has_segments:
      same_BxLxS = self.q_segment_ids_BxL[:, :, None] == self.kv_segments[:, None, :]
      mask = mask & same_BxLxS[:, None, None]
    return mask
