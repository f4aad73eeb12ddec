"""Metric writers (stdout, metrics.jsonl, TensorBoard) and FLOP / MFU accounting."""

import contextlib
import importlib.abc
import json
import math
import os
import sys

import jax

# Dense peak FLOP/s per device with bfloat16 / float16 inputs and float32 accumulation, from
# the vendors' data sheets. float32 counts half of it: TPUs run it at half rate, and on GPUs
# we count the TF32 tensor-core peak, which is half the bf16 one (H100/H200 494.5 TFLOP/s).
ACCELERATOR_PEAKS = (
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5", 197e12), ("TPU v4", 275e12),
    ("TPU v3", 123e12), ("H200", 989e12), ("H100", 989e12), ("A100", 312e12),
    ("L4", 121e12), ("V100", 125e12),
)
# The 2-core AMD EPYC machines this project is developed on reach about 185 GFLOP/s in
# float32 and 350 GFLOP/s with bfloat16 inputs (DESIGN.md): about 92 / 175 GFLOP/s a core.
CPU_PEAK_PER_CORE = {"float32": 92.5e9, "bfloat16": 175e9, "float16": 92.5e9}


def accelerator_peak(device_kind, dtype):
  """Peak FLOP/s of one device whose kind contains a name in ACCELERATOR_PEAKS, or None."""
  for name, peak in ACCELERATOR_PEAKS:
    if name.lower() in device_kind.lower():
      return peak / 2 if dtype == "float32" else peak
  return None


def peak_flops_per_device(dtype, configured=0.0):
  """(FLOP/s, where the figure comes from) for one device of the default backend."""
  if configured:
    return float(configured), "config.log.peak_flops"
  device = jax.devices()[0]
  if device.platform == "cpu":
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    total = CPU_PEAK_PER_CORE[dtype] * cores
    return total / jax.local_device_count(), f"{cores} CPU cores x {dtype} estimate"
  peak = accelerator_peak(device.device_kind, dtype)
  if peak is not None:
    return peak, device.device_kind
  return float("nan"), f"unknown device kind {device.device_kind!r}; set config.log.peak_flops"


# config.log.attention_flops -> the share of causal self-attention's FLOPs that is counted.
# palm: all of them (PaLM appendix B; lm's figures so far); causal_half: half, the masked
# upper triangle left out (MaxText's convention since 2025), to set lm's MFU beside theirs.
CAUSAL_ATTENTION_SHARE = {"palm": 1.0, "causal_half": 0.5}


def describe_attention_flops(convention):
  """How a log line names the convention."""
  return {"palm": "attention FLOPs counted whole (PaLM)",
          "causal_half": "causal attention FLOPs counted at half (MaxText)"}[convention]


def train_flops_per_token(params, cfg, seq_len, tied_output=None, frozen=None,
                          attention_layers=None, attention_share=1.0):
  """Model FLOPs of one training token (forward + backward), PaLM appendix B convention.

  6 per parameter that multiplies an activation (all weight matrices, LoRA factors and the
  output projection; not the embedding lookups, norms or biases): 2 forward, 2 for the
  gradient of the activation, 2 for the gradient of the weight. A `frozen` weight (a
  sub-tree of `params`, lm/peft.py) needs no weight gradient: 4. Plus 12 * layers * d_model
  * seq_len for the attention scores and their weighted sum (heads x head size for d_model,
  and a sliding-window layer's window for seq_len where it is shorter). `tied_output`: whether the
  output layer multiplies by the token embedding (default: cfg.tie_embeddings, a decoder's).
  `attention_layers`: attention blocks per token (default cfg.num_layers; an encoder-decoder
  has three per layer pair: encoder self-, decoder self- and cross-attention).
  `attention_share`: the share of the attention term counted (CAUSAL_ATTENTION_SHARE, for
  a causal model; 1 for bidirectional attention).
  """
  def matmul_params(tree):
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree or {})[0]:
      if getattr(path[-1], "key", "") in ("kernel", "lora_a", "lora_b"):
        total += math.prod(leaf.shape)
    return total

  flops = 6 * matmul_params(params) - 2 * matmul_params(frozen)
  if tied_output is None:
    tied_output = cfg.tie_embeddings
  if tied_output:  # the output projection reuses the embedding (untied: a kernel)
    frozen_embedding = any(getattr(p[-1], "key", "") == "embedding"
                           for p, _ in jax.tree_util.tree_flatten_with_path(frozen or {})[0])
    flops += (4 if frozen_embedding else 6) * cfg.vocab_size * cfg.d_model
  width = cfg.num_heads * cfg.head_dim  # the queries' width (d_model, unless head_size)
  if attention_layers:
    keys = attention_layers * seq_len
  else:  # a local layer's query sees at most its window
    keys = sum(min(cfg.sliding_window, seq_len) if cfg.is_local(i) else seq_len
               for i in range(cfg.num_layers))
  return flops + attention_share * 12 * width * keys


def encoder_decoder_train_flops(params, cfg, source_len, target_len, tied_output=True,
                                frozen=None, causal_share=1.0):
  """Model FLOPs of training on one (source, target) example, train_flops_per_token's
  convention: the encoder's matrices once per source token, the decoder's (and the output
  layer) once per target token; attention: the encoder's over the source, the decoder's
  causal one over the target (times `causal_share`, CAUSAL_ATTENTION_SHARE) and its
  cross-attention over the source."""
  def matmul_params(tree):
    return sum(math.prod(leaf.shape)
               for path, leaf in jax.tree_util.tree_flatten_with_path(tree or {})[0]
               if getattr(path[-1], "key", "") in ("kernel", "lora_a", "lora_b"))

  frozen = frozen or {}
  side = lambda name: (6 * matmul_params(params.get(name)) -
                       2 * matmul_params(frozen.get(name)))
  decoder = side("decoder") + 6 * matmul_params(params.get("lm_head")) - 2 * matmul_params(
      frozen.get("lm_head"))
  if tied_output:
    decoder += (4 if "embed" in frozen else 6) * cfg.vocab_size * cfg.d_model
  attention = 12 * cfg.num_layers * cfg.d_model * (source_len * source_len +
                                                    causal_share * target_len * target_len +
                                                    target_len * source_len)
  return side("encoder") * source_len + decoder * target_len + attention


class MetricWriter:
  """Appends `{"step": s, **scalars}` to metrics.jsonl and TensorBoard (process 0 only).

  On resume from `resume_step`, records of later steps (written by a run that went on past
  its last checkpoint) are dropped from metrics.jsonl, so each step appears once.
  """

  def __init__(self, workdir, resume_step=0):
    self.enabled = jax.process_index() == 0
    self._jsonl = self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, "metrics.jsonl")
      if os.path.exists(path):
        _truncate_after(path, resume_step)
      self._jsonl = open(path, "a", encoding="utf-8")
      with _torch_hidden():
        from tensorboardX import SummaryWriter  # writes event files without TensorFlow
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=10)

  def write(self, step, scalars):
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
    self._jsonl.flush()
    for k, v in clean.items():
      if math.isfinite(v):
        self._tb.add_scalar(k, v, int(step))

  def write_text(self, step, tag, text):
    if self.enabled:
      self._tb.add_text(tag, text, int(step))

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


class _NoTorch(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name == "torch" or name.startswith("torch."):
      raise ImportError(f"{name} is hidden while tensorboardX is imported")
    return None


@contextlib.contextmanager
def _torch_hidden():
  """tensorboardX imports PyTorch where it is installed (a second, in every run) only to
  accept torch tensors, which lm never passes: hide it, unless it is already loaded."""
  if "torch" in sys.modules or "tensorboardX" in sys.modules:
    yield
    return
  finder = _NoTorch()
  sys.meta_path.insert(0, finder)
  try:
    yield
  finally:
    sys.meta_path.remove(finder)


def _truncate_after(path, step):
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  keep = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= step:
        keep.append(line)
    except (ValueError, KeyError, TypeError):
      pass  # a torn last line from a killed run
  if len(keep) != len(lines):
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(keep)
    os.replace(tmp, path)


def log(message):
  """One line on stdout from process 0."""
  if jax.process_index() == 0:
    print(message, flush=True)
