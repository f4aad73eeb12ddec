"""`python -m lm.plan --config=experiments/base.py --hardware=h200 --devices=8 [--mfu=0.4]`

Sizes a run before running it: parameter count, training FLOPs per token, memory per device
(parameters, Adam state, gradients, activations under the remat policy) and the step time
and tokens/s that a given MFU implies on the named hardware. Nothing is compiled or run.

Conventions. Parameters and FLOPs are counted on the model's abstract parameters, by the
same code the loop's MFU uses (lm/metrics.py, PaLM's appendix B): 6 per weight-matrix
entry per token (the output projection included) plus 12 * layers * d_model * seq_len for
attention. Parameters and optimizer state are assumed
sharded over fsdp x tensor (what the logical rules do for every large matrix). Activation
memory per token per layer, in the compute dtype's bytes c, is an estimate of what the
backward pass keeps: none: c * (12 d + 3 f) (block inputs, norms, q/k/v, attention output,
MLP input/hidden/activation) plus the attention's own; dots: the matmul outputs only,
c * (5 d + f) plus the attention's; full: the block input only, c * d, plus one block
recomputed at a time. The attention's share depends on the kernels the model runs on the
hardware (config.model.kernels, chosen for its platform: lm/models/kernels):
materialised (xla, cpu) keeps the probabilities and scores, c * 2 H S (c * H S under dots),
quadratic in the context; fused (cudnn, pallas_gpu, splash) keeps one float32 log-sum-exp
per query and head, 4 H bytes, and no L^2 term at all.

`--lower` also lowers the config's train step (and a decoder's decode step) for the
hardware's platform on an abstract mesh of --devices devices (lm/lowering.py) and prints
that report as one more JSON line: the kernels chosen, the custom calls found, XLA's
FLOP and byte estimates where it gives them.
"""

import dataclasses
import json
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from lm import metrics, peft, tasks
from lm.errors import UserError
from lm.models import ModelConfig, kernels

GIB = 2 ** 30
# Device kind (as lm/metrics.py's peak table names it) and memory per device, from the
# vendors' data sheets; cpu: the 2-core machines this project is measured on.
HARDWARE = {
    "tpu_v5e": ("TPU v5 lite", 16 * GIB),
    "tpu_v5p": ("TPU v5p", 95 * GIB),
    "h100": ("H100", 80 * GIB),
    "h200": ("H200", 141 * GIB),
    "cpu": ("cpu", 24 * GIB),
}
PLATFORM = {"tpu_v5e": "tpu", "tpu_v5p": "tpu", "h100": "gpu", "h200": "gpu", "cpu": "cpu"}
CPU_CORES = 2


def peak_flops(hardware, dtype):
  kind = HARDWARE[hardware][0]
  if kind == "cpu":
    return metrics.CPU_PEAK_PER_CORE[dtype] * CPU_CORES
  return metrics.accelerator_peak(kind, dtype)


_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file.")
_HARDWARE = flags.DEFINE_enum("hardware", "cpu", list(HARDWARE), "Device kind.")
_DEVICES = flags.DEFINE_integer("devices", 1, "Number of devices.")
_MFU = flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation to assume.")
_LOWER = flags.DEFINE_bool("lower", False, "Also lower the train and decode steps for the "
                           "hardware's platform (jax.export) and print that report.")
_VOCAB = flags.DEFINE_integer("vocab_size", None,
                              "Vocabulary size when the config leaves it to the tokenizer.")


@dataclasses.dataclass
class Plan:
  params: int
  flops_per_token: float
  params_bytes: float  # per device
  optimizer_bytes: float
  gradient_bytes: float
  activation_bytes: float
  total_bytes: float
  fits: bool
  step_seconds: float
  tokens_per_s: float
  kernels: str = "xla"  # the implementation the model runs on the hardware
  attention: str = "materialised"  # or "fused": what the activation memory assumes

  def as_dict(self):
    return dataclasses.asdict(self)


def vocab_size(config, override=None):
  if override:
    return override
  if config.model.vocab_size:
    return config.model.vocab_size
  tokenizer = config.data.tokenizer
  if tokenizer == "byte":
    return 261  # 256 bytes + 5 specials
  if tokenizer in ("unigram", "bpe"):
    return config.data.vocab_size
  raise ValueError("the char tokenizer's vocabulary depends on the data: give --vocab_size")


def model_cost(config, vocab, platform="cpu"):
  """(parameters, training FLOPs per token, kernels) of the config's model on `platform`
  (kernels: the implementation config.model.kernels names there): counted on its abstract
  parameters (jax.eval_shape of the initialiser traces it; nothing is compiled or run) by
  the task's own FLOP count, the one the loop's MFU uses (lm/tasks/, lm/metrics.py)."""
  seq_len = config.data.seq_len
  model_cfg = ModelConfig.from_config(config.model, vocab, platform)
  task = tasks.make_from_config(config, model_cfg, max(config.task.num_labels, 2))
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  params = jax.eval_shape(lambda key: nn.unbox(task.init(key, tokens)), jax.random.key(0))
  share = metrics.CAUSAL_ATTENTION_SHARE[config.log.attention_flops]
  flops = task.example_flops(params, {}, task.nominal_lengths(seq_len),
                             causal_share=share) / seq_len
  return peft.count(params), flops, model_cfg.kernels


def make_plan(config, hardware, devices, mfu, vocab=None):
  m, t, s = config.model, config.train, config.data.seq_len
  v = vocab_size(config, vocab)
  memory = HARDWARE[hardware][1]
  n, flops, kernel_name = model_cost(config, v, PLATFORM[hardware])
  fused = kernels.get(kernel_name).fused
  mesh = config.mesh
  shard = max(mesh.fsdp, 1) * max(mesh.tensor, 1)
  data_shards = devices // max(mesh.tensor, 1)
  params_bytes = n * _BYTES[m.param_dtype] / shard
  optimizer_bytes = 2 * n * 4 / shard
  gradient_bytes = n * 4 / shard
  c = _BYTES[m.dtype]
  attention = {"none": 4 * m.num_heads if fused else 2 * m.num_heads * s * c,
               "dots": 4 * m.num_heads if fused else m.num_heads * s * c, "full": 0}
  block = (12 * m.d_model + 3 * m.d_ff) * c + attention["none"]
  per_layer = {"none": block, "dots": (5 * m.d_model + m.d_ff) * c + attention["dots"],
               "full": m.d_model * c}[m.remat]
  tokens = t.batch_size * s / max(data_shards, 1) / t.grad_accum_steps
  activation_bytes = tokens * per_layer * m.num_layers
  if m.remat == "full":  # one block recomputed at a time
    activation_bytes += tokens * block
  activation_bytes += tokens * v * 4 * 2  # float32 logits and their gradient
  total = params_bytes + optimizer_bytes + gradient_bytes + activation_bytes
  peak = peak_flops(hardware, m.dtype)
  step_seconds = flops * t.batch_size * s / (devices * peak * mfu)
  return Plan(params=n, flops_per_token=flops, params_bytes=params_bytes,
              optimizer_bytes=optimizer_bytes, gradient_bytes=gradient_bytes,
              activation_bytes=activation_bytes, total_bytes=total,
              fits=total <= memory, step_seconds=step_seconds,
              tokens_per_s=t.batch_size * s / step_seconds, kernels=kernel_name,
              attention="fused" if fused else "materialised")


def main(argv):
  if len(argv) > 1 or _CONFIG.value is None:
    print("lm: error: usage: python -m lm.plan --config=FILE [--hardware=h200] [--devices=8]",
          file=sys.stderr)
    sys.exit(2)
  config = _CONFIG.value
  try:
    p = make_plan(config, _HARDWARE.value, _DEVICES.value, _MFU.value, _VOCAB.value)
  except (ValueError, UserError) as e:
    print(f"lm: error: {e}", file=sys.stderr)
    sys.exit(2)
  g = lambda b: f"{b / GIB:,.2f} GiB"
  print(f"parameters        {p.params:,} ({p.params / 1e6:,.1f}M)")
  print(f"FLOPs per token   {p.flops_per_token / 1e9:,.3f} GFLOP (training, model FLOPs; "
        f"{metrics.describe_attention_flops(config.log.attention_flops)})")
  print(f"memory per device params {g(p.params_bytes)} + Adam {g(p.optimizer_bytes)} + "
        f"gradients {g(p.gradient_bytes)} + activations {g(p.activation_bytes)} "
        f"(remat {config.model.remat}, {p.attention} attention: {p.kernels} kernels) = "
        f"{g(p.total_bytes)}; "
        f"{'fits' if p.fits else 'does NOT fit'} in {g(HARDWARE[_HARDWARE.value][1])}")
  print(f"at {_MFU.value:.0%} MFU on {_DEVICES.value} x {_HARDWARE.value}: "
        f"{p.step_seconds * 1000:,.3f} ms per step, {p.tokens_per_s:,.0f} tokens/s")
  print(json.dumps({"plan": p.as_dict(), "hardware": _HARDWARE.value,
                    "attention_flops": config.log.attention_flops,
                    "devices": _DEVICES.value, "mfu": _MFU.value}))
  if _LOWER.value:
    from lm import lowering  # pylint: disable=import-outside-toplevel
    print(json.dumps({"lowering": lowering.lower(config, PLATFORM[_HARDWARE.value],
                                                 vocab_size(config, _VOCAB.value),
                                                 _DEVICES.value)}))


if __name__ == "__main__":
  app.run(main)
