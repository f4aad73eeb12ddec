"""Running a Pallas kernel on the mesh: a pallas_call has no partitioning rule of its own,
so it runs under shard_map, each device on its rows (batch over data and fsdp) and its
heads (over tensor), as the activations around it are already split (lm/sharding.py)."""

import math

import jax
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"


def per_shard(fn, q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, q_segment_ids_BxL, kv_segment_ids_BxS):
  """fn(q, k, v, q_segments, kv_segments) on every device's share of the batch and heads.

  Heads are split over `tensor` only when the key heads divide evenly (each device then
  holds whole groups of query heads with their key head); otherwise every tensor device
  computes all heads of its rows. Without a mesh (or with one device) fn runs as is."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or math.prod(mesh.axis_sizes) == 1:
    return fn(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, q_segment_ids_BxL, kv_segment_ids_BxS)
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  batch = tuple(a for a in BATCH_AXES if a in sizes)
  rows = math.prod(sizes[a] for a in batch)
  batch = batch if batch and q_BxLxHxDh.shape[0] % rows == 0 else None
  heads = HEAD_AXIS if (HEAD_AXIS in sizes and k_BxSxKxDh.shape[2] % sizes[HEAD_AXIS] == 0) \
      else None
  qkv = P(batch, None, heads, None)
  segments = None if q_segment_ids_BxL is None else P(batch, None)
  return jax.shard_map(fn, mesh=mesh, in_specs=(qkv, qkv, qkv, segments, segments),
                       out_specs=qkv, check_vma=False)(
      q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, q_segment_ids_BxL, kv_segment_ids_BxS)
