"""Device mesh and logical-axis sharding.

The mesh has three axes, sized by config.mesh:
  data    pure data parallelism (parameters replicated),
  fsdp    data parallelism with parameters and optimizer state sharded (ZeRO-3 style),
  tensor  Megatron-style tensor parallelism (heads and MLP hidden units split).

Models name their axes logically (`embed`, `heads`, ...); RULES maps those names onto mesh
axes. This file is the only place that knows the mapping; nothing else knows the mesh shape.
A dimension that does not divide evenly over its mesh axes is left replicated.
"""

import contextlib
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lm.config import resolve_mesh_shape

MESH_AXES = ("data", "fsdp", "tensor")

RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("length", None),
    ("layers", None),  # the stacked-layers axis of nn.scan (model.scan_layers)
)


def make_mesh(mesh_config, devices=None):
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(mesh_config, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def platform(mesh):
  """The platform of a concrete mesh's devices: "cpu", "gpu" or "tpu"."""
  if isinstance(mesh, jax.sharding.AbstractMesh):
    raise ValueError("an abstract mesh has no devices: say which platform it stands for")
  return mesh.devices.flat[0].platform


def abstract_mesh(mesh_config, num_devices):
  """A mesh of `num_devices` devices that need not exist (for lowering programs for
  another platform or size: lm.plan --lower), shaped by config.mesh."""
  shape = resolve_mesh_shape(mesh_config, num_devices)
  return jax.sharding.AbstractMesh(shape, MESH_AXES,
                                   axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def set_mesh(mesh):
  """jax.set_mesh for a concrete mesh, jax.sharding.use_abstract_mesh for an abstract one."""
  if isinstance(mesh, jax.sharding.AbstractMesh):
    return jax.sharding.use_abstract_mesh(mesh)
  return jax.set_mesh(mesh)


@contextlib.contextmanager
def on_mesh(mesh):
  """The mesh and the logical axis rules (RULES) active: for tracing and running steps."""
  with set_mesh(mesh), nn.logical_axis_rules(RULES):
    yield


def replicated(mesh):
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh):
  """[B, ...] arrays split over the data-parallel axes."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def stacked_batch_sharding(mesh):
  """[n, B, ...]: n batches stacked (several train steps per dispatch), each split as
  batch_sharding splits one."""
  return NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp")))


def _fit(spec, shape, mesh):
  """Drops mesh axes from dimensions they do not divide evenly."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    size = math.prod(mesh.shape[a] for a in names)
    fitted.append(axes if names and dim % size == 0 else None)
  return PartitionSpec(*fitted)


def logical_shardings(abstract_boxed, mesh, rules=RULES):
  """NamedShardings for a pytree of (abstract) nn.Partitioned leaves, e.g. model params."""
  def one(leaf):
    if isinstance(leaf, nn.Partitioned):
      spec = nn.logical_to_mesh_axes(leaf.names, rules)
      return NamedSharding(mesh, _fit(spec, leaf.value.shape, mesh))
    return replicated(mesh)
  return jax.tree.map(one, abstract_boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def abstract_like(tree, shardings):
  """ShapeDtypeStructs of a (concrete or abstract) tree carrying these shardings: what
  lower() and Orbax's restore take."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
