"""Training throughput of an experiment's train step: one JSON line of figures.

    python benchmarks/train_throughput.py --config=experiments/shakespeare_char.py \
        [--steps=100] [--repeats=5] [--config.model.dtype=bfloat16] [--measure_peak]

Times `repeats` windows of `steps` train steps each (fresh batches from the real Grain
pipeline, as lm.main draws them, dispatched as lm.main does: train.steps_per_dispatch
steps per jitted call) after compilation, and reports the median window: ms/step,
tokens/s, MFU, plus compile seconds, the kernels the model ran (config.model.kernels, as
chosen for the device) and, on a GPU or TPU, the allocator's peak memory.
Never asserts on time: these machines are shared and noisy.
"""

import json
import os
import platform
import statistics
import time

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file.")
_STEPS = flags.DEFINE_integer("steps", 100, "Train steps per timed window.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed windows; the median is reported.")
_MEASURE_PEAK = flags.DEFINE_bool(
    "measure_peak", False, "Also time a 2048^3 product in model.dtype with float32 "
    "accumulation on one device, and report MFU against that measured peak (mfu_measured).")


def measured_peak(dtype, size=2048, repeats=20):
  """FLOP/s of the best of `repeats` size^3 products (dtype inputs, float32 accumulation)."""
  import jax
  import jax.numpy as jnp
  a = jnp.ones((size, size), dtype)
  product = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  product(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    product(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best


def main(_):
  logging.set_verbosity(logging.WARNING)
  import jax

  from lm import config as config_lib
  from lm import metrics, sharding
  from lm.data import make_data
  from lm.train import Trainer

  config = _CONFIG.value
  config_lib.validate(config, jax.device_count())
  data = make_data(config)
  trainer = Trainer(config, data.tokenizer.vocab_size, sharding.make_mesh(config.mesh))
  t = config.train
  batches = data.iterator(data.train_batches(t.batch_size, config.data.seq_len, t.seed))
  state = trainer.init_state()
  per_call = t.steps_per_dispatch
  if _STEPS.value % per_call:
    raise app.UsageError(f"--steps={_STEPS.value} is not a multiple of "
                         f"train.steps_per_dispatch={per_call}")

  def steps(state):
    if per_call == 1:
      return trainer.train_step(state, trainer.shard_batch(next(batches)))
    return trainer.train_steps(state, trainer.shard_batches(
        [next(batches) for _ in range(per_call)]))

  state, _ = steps(state)  # compiles
  jax.block_until_ready(state)

  windows = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    for _ in range(_STEPS.value // per_call):
      state, step_metrics = steps(state)
    jax.block_until_ready((state, step_metrics))
    windows.append((time.perf_counter() - start) / _STEPS.value)

  seconds = statistics.median(windows)
  tokens_per_step = t.batch_size * config.data.seq_len
  flops_per_token = metrics.train_flops_per_token(
      trainer.abstract_params, trainer.model_cfg, config.data.seq_len,
      trainer.task.tied_output, trainer.abstract_frozen)
  peak, peak_source = metrics.peak_flops_per_device(config.model.dtype, config.log.peak_flops)
  tokens_per_s = tokens_per_step / seconds
  extra = {}
  if _MEASURE_PEAK.value:
    measured = measured_peak(config.model.dtype)
    extra = {"peak_measured_flops_per_device": round(measured),
             "mfu_measured": round(flops_per_token * tokens_per_s
                                   / (measured * jax.device_count()), 4)}
  stats = jax.devices()[0].memory_stats() or {}  # a GPU's or TPU's allocator; none on a CPU
  if "peak_bytes_in_use" in stats:
    extra["peak_memory_gib"] = round(stats["peak_bytes_in_use"] / 2 ** 30, 2)
  print(json.dumps({
      "benchmark": "train_throughput",
      "config": config_flags.get_config_filename(flags.FLAGS["config"]),
      "device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
      "cpu_count": os.cpu_count(), "machine": platform.machine(),
      "dtype": config.model.dtype, "params": trainer.num_params,
      "kernels": trainer.model_cfg.kernels,
      "steps_per_dispatch": per_call,
      "batch_size": t.batch_size, "seq_len": config.data.seq_len,
      "compile_s": round(trainer.compile_seconds, 3),
      "ms_per_step": round(1000 * seconds, 2),
      "ms_per_step_windows": [round(1000 * w, 2) for w in windows],
      "tokens_per_s": round(tokens_per_s, 1),
      "gflop_per_step": round(flops_per_token * tokens_per_step / 1e9, 3),
      "mfu": round(flops_per_token * tokens_per_s / (peak * jax.device_count()), 4),
      "peak_flops_per_device": peak, "peak_source": peak_source, **extra,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }), flush=True)


if __name__ == "__main__":
  app.run(main)
