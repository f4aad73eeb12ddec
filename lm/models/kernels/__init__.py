"""The model's kernels: its matmuls and attention, one seam with an implementation per
platform. Model code (lm/models/) calls only what `get(cfg.kernels)` returns:

    ops = kernels.get(cfg.kernels)
    y_MxN = ops.matmul(x_MxK, w_KxN)          # float32 accumulation, compute-dtype backward
    o = ops.attention(q, k, v, Mask(...), dropout_rate=..., dropout_rng=..., sow=...)
    o = ops.cached_attention(q, k_cache, v_cache, mask_BxLxS)   # decoding

Implementations (config.model.kernels):
  xla         any platform: the portable products and jax.nn.dot_product_attention (XLA)
  cpu         XLA:CPU's tuned kernels (lm/models/kernels/cpu.py)
  cudnn       GPU: cuDNN flash attention, bfloat16/float16 (lm/models/kernels/gpu.py)
  pallas_gpu  GPU: Pallas (Triton) flash attention, any dtype
  splash      TPU: Pallas splash attention under shard_map (lm/models/kernels/tpu.py)
  auto        chosen by `choose` from the mesh's platform, once (lm/model_setup.py): cpu on a
              CPU, splash on a TPU, cudnn on a GPU in bfloat16/float16 (pallas_gpu otherwise),
              and xla on an accelerator when attention dropout is on (no fused kernel has it).

The model's config holds the name chosen, never "auto". Whatever the implementation,
attention with dropout or with its weights asked for (lm/inspect.py) runs materialised, and
decoding over a KV cache runs the reference maths (lm/models/kernels/reference.py).
"""

import dataclasses
from typing import Callable

import jax.numpy as jnp

from lm.models.kernels import cpu, gpu, reference, tpu
from lm.models.kernels.mask import Mask

__all__ = ["IMPLEMENTATIONS", "Kernels", "Mask", "choose", "get"]


@dataclasses.dataclass(frozen=True)
class Kernels:
  """One implementation: its products, its attention and what it needs."""

  name: str
  platforms: tuple  # jax platform names it runs on
  matmul: Callable
  matmul_nt: Callable
  fused_attention: Callable  # (q, k, v, Mask) -> out, without dropout
  dtypes: tuple = ()  # compute dtypes its attention takes; () any
  head_dim_fits: Callable = lambda head_dim: True
  custom_calls: tuple = ()  # custom-call targets (or prefixes) its lowered programs contain
  float32_cache: bool = False  # KV cache in float32 whatever the compute dtype
  caches_unembedding: bool = False  # cached decoding keeps E^T (see ModelConfig)
  available: Callable = lambda: True  # its libraries can be loaded here

  @property
  def fused(self):
    return bool(self.custom_calls)

  def attention(self, q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask, dropout_rate=0.0,
                dropout_rng=None, sow=None, softcap=0.0):
    """Grouped-query attention; `mask` a Mask. `sow(probs_BxHxLxS)`, if given, receives the
    weights: that call (and one with dropout, or soft-capped scores, `softcap` > 0: no
    fused kernel here takes them) runs materialised."""
    if (sow is not None or softcap or
        (dropout_rate > 0.0 and dropout_rng is not None)):
      return reference.materialised_attention(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask,
                                              dropout_rate, dropout_rng, sow, softcap)
    return self.fused_attention(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask)

  cached_attention = staticmethod(reference.cached_attention)

  def cache_dtype(self, compute_dtype):
    return jnp.dtype(jnp.float32) if self.float32_cache else jnp.dtype(compute_dtype)

  def with_interpreter(self):
    """The same kernels with the Pallas ones run by Pallas's interpreter (any platform):
    for tests on a CPU."""
    attention = {"splash": lambda *a: tpu.attention(*a, interpret=True),
                 "pallas_gpu": lambda *a: gpu.pallas_attention(*a, interpret=True)}
    if self.name not in attention:
      raise ValueError(f"kernels {self.name!r} has no Pallas kernel to interpret")
    return dataclasses.replace(self, name=self.name + "+interpret",
                               fused_attention=attention[self.name],
                               platforms=self.platforms + ("cpu",))


IMPLEMENTATIONS = {k.name: k for k in (
    Kernels("xla", ("cpu", "gpu", "tpu"), reference.matmul, reference.matmul_nt,
            reference.xla_attention),
    # CPU: a float32 KV cache (XLA:CPU converts a bfloat16 one to float32 on every decoded
    # token) and E^T kept with it (XLA:CPU's bfloat16 x @ E^T over a few rows is slow with
    # E as stored: GPT-2-small, batch 16, 36.5 instead of 39.8 ms a token).
    Kernels("cpu", ("cpu",), cpu.matmul, cpu.matmul_nt, cpu.attention, float32_cache=True,
            caches_unembedding=True),
    Kernels("cudnn", ("gpu",), reference.matmul, reference.matmul_nt, gpu.cudnn_attention,
            dtypes=gpu.CUDNN_DTYPES, head_dim_fits=gpu.cudnn_head_dim_fits,
            custom_calls=(gpu.CUDNN_CUSTOM_CALL, gpu.TRITON_CUSTOM_CALL),
            available=gpu.cudnn_available),
    Kernels("pallas_gpu", ("gpu",), reference.matmul, reference.matmul_nt,
            gpu.pallas_attention, head_dim_fits=gpu.triton_head_dim_fits,
            custom_calls=(gpu.TRITON_CUSTOM_CALL,)),
    Kernels("splash", ("tpu",), reference.matmul, reference.matmul_nt, tpu.attention,
            custom_calls=(tpu.CUSTOM_CALL,)),
)}

PLATFORM_ALIASES = {"cuda": "gpu", "rocm": "gpu"}  # jax.export's names -> device platforms


def get(name):
  """The Kernels called `name` (a ModelConfig's kernels; "+interpret": Pallas interpreted)."""
  base, _, mode = name.partition("+")
  if base not in IMPLEMENTATIONS or mode not in ("", "interpret"):
    raise ValueError(f"unknown kernels {name!r}: choose from {sorted(IMPLEMENTATIONS)} "
                     "(model configs hold a chosen implementation, never 'auto')")
  return IMPLEMENTATIONS[base].with_interpreter() if mode else IMPLEMENTATIONS[base]


def choose(requested, platform, *, dtype, head_dim, dropout=0.0):
  """The implementation `requested` (config.model.kernels) names on `platform` ("cpu",
  "gpu", "tpu"). Returns its name; raises ValueError (one line, naming the reason) for one
  that does not fit the platform, the compute dtype, the head size or attention dropout."""
  platform = PLATFORM_ALIASES.get(platform, platform)
  dtype = jnp.dtype(dtype).name
  if requested == "auto":
    if platform == "cpu":
      return "cpu"
    if platform not in ("gpu", "tpu") or dropout > 0.0:
      return "xla"
    if platform == "tpu":
      return "splash"
    cudnn = IMPLEMENTATIONS["cudnn"]
    if dtype in cudnn.dtypes and cudnn.head_dim_fits(head_dim) and cudnn.available():
      return "cudnn"
    return "pallas_gpu" if gpu.triton_head_dim_fits(head_dim) else "xla"
  if requested not in IMPLEMENTATIONS:
    raise ValueError(f"{requested!r} is not one of auto, {', '.join(IMPLEMENTATIONS)}")
  impl = IMPLEMENTATIONS[requested]
  if platform not in impl.platforms:
    raise ValueError(f"{requested} runs on {'/'.join(impl.platforms)}, and this mesh is "
                     f"{platform}; use auto or xla")
  if impl.dtypes and dtype not in impl.dtypes:
    raise ValueError(f"{requested} attention takes {'/'.join(impl.dtypes)}, and "
                     f"model.dtype is {dtype}; use auto")
  if not impl.head_dim_fits(head_dim):
    raise ValueError(f"{requested} attention does not take head size {head_dim} "
                     "(d_model / num_heads); use auto or xla")
  if impl.fused and dropout > 0.0:
    raise ValueError(f"{requested} is a fused attention kernel without dropout, and "
                     f"model.dropout is {dropout}; set model.dropout=0 or use xla")
  if not impl.available():
    raise ValueError(f"{requested}: its library cannot be loaded here (cuDNN: install "
                     "jax[cuda12]); use auto")
  return requested
