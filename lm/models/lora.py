"""Low-rank adapters (LoRA, Hu et al. 2021) on a model's dense projections, added from outside
the model code.

    with lora.attach(Adapters(rank=8, alpha=16.0, targets=r"attn/(query|value)")):
      params = model.init(...)   # each matching Dense gets lora_a [in, r] and lora_b [r, out]
      y = model.apply(...)       # that Dense computes x W + b + (alpha / r) dropout(x) A B
    served = lora.merge(params)  # W + (alpha / r) A B: the plain model, no adapter left

`attach` is a flax method interceptor: around every lm Dense (lm/models/layers.py) whose
module path, e.g. `encoder/layer_3/attn/query` (`encoder/layers/block/...` with
model.scan_layers), matches `targets` (re.search), it creates the two factors in that
Dense's own scope (so nn.scan stacks them per layer like the kernel) and adds their product's
output. A is initialised like PyTorch's Linear (uniform, bound 1/sqrt(in)), B to zero, so an
adapted model starts out computing exactly what the base model does. Dropout on the
adapter's input runs only when the apply call has a "dropout" rng (training).
Which parameters train and which stay frozen is lm/peft.py's business.
"""

import contextlib
import dataclasses
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm.models.layers import Dense

A, B = "lora_a", "lora_b"


@dataclasses.dataclass(frozen=True)
class Adapters:
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: str = r"attn/(query|value)$"  # re.search over a Dense's module path
  skip: tuple = ()  # top-level parameter names never adapted (task heads: they train fully)

  @property
  def scale(self):
    return self.alpha / self.rank

  def matches(self, path):
    return bool(path) and path[0] not in self.skip and re.search(self.targets, "/".join(path))


def _interceptor(adapters):
  def intercept(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    module = context.module
    if (context.method_name != "__call__" or not isinstance(module, Dense)
        or not adapters.matches(module.path)):
      return y
    cfg, x = module.cfg, args[0]
    n_in = len(module.axes) - len(module.features)
    d_in, d_out = math.prod(x.shape[x.ndim - n_in:]), math.prod(module.features)
    a = module.param(A, nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                     (d_in, adapters.rank), cfg.weight_dtype)
    b = module.param(B, nn.initializers.zeros, (adapters.rank, d_out), cfg.weight_dtype)
    x_NxI = x.reshape((-1, d_in)).astype(cfg.compute_dtype)
    if adapters.dropout > 0 and module.has_rng("dropout"):
      keep = jax.random.bernoulli(module.make_rng("dropout"), 1 - adapters.dropout,
                                  x_NxI.shape)
      x_NxI = jnp.where(keep, x_NxI / (1 - adapters.dropout), 0).astype(x_NxI.dtype)
    h_NxR = jnp.dot(x_NxI, a.astype(cfg.compute_dtype), preferred_element_type=jnp.float32)
    delta_NxO = jnp.dot(h_NxR.astype(cfg.compute_dtype), b.astype(cfg.compute_dtype),
                        preferred_element_type=jnp.float32) * adapters.scale
    return (y.astype(jnp.float32) + delta_NxO.reshape(y.shape)).astype(y.dtype)
  return intercept


@contextlib.contextmanager
def attach(adapters):
  """Within this context, model.init creates and model.apply uses `adapters` (None: none)."""
  if adapters is None:
    yield
    return
  with nn.intercept_methods(_interceptor(adapters)):
    yield


def is_adapter(path):
  """Whether a parameter path (a tuple of names) is a LoRA factor."""
  return bool(path) and path[-1] in (A, B)


def merge(params, alpha):
  """`params` with every adapter folded into its kernel, W + (alpha / rank) A B, and the
  factors dropped: the base model's tree, servable with no adapter cost. Works on host
  (numpy) and device arrays; stacked (scanned) layers too."""
  if not isinstance(params, dict):
    return params
  out = {k: merge(v, alpha) for k, v in params.items() if k not in (A, B)}
  if A in params and B in params and "kernel" in params:
    a, b, kernel = params[A], params[B], params["kernel"]
    xp = np if all(isinstance(t, np.ndarray) for t in (a, b, kernel)) else jnp
    delta = xp.einsum("...ir,...ro->...io", xp.asarray(a, np.float32),
                      xp.asarray(b, np.float32)) * (alpha / a.shape[-1])
    out["kernel"] = (xp.asarray(kernel, np.float32) + delta.reshape(kernel.shape)).astype(
        kernel.dtype)
  return out
