"""Decoding throughput of lm against Hugging Face transformers, same model shape, same run.

    python benchmarks/decode_throughput.py --torch_python=/path/to/python-with-transformers

A GPT-2-small-shaped decoder (12 layers, 12 heads, d_model 768, vocab 50,257, learned
positions, LayerNorm with biases, GELU-tanh, tied embeddings) with random weights; greedy
decoding of 128 new tokens after a 16-token prompt, at batch 1 and 16. lm runs in float32
and with bfloat16 weights and compute; transformers (benchmarks/hf_generate.py, run by
--torch_python) in float32. Prints one JSON line per measurement and a summary line with the
ratios. Wall time includes everything a caller waits for (prefill, the decode loop, the
transfer of the tokens), after one warm-up call that compiles.
"""

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags, logging

_TORCH_PYTHON = flags.DEFINE_string("torch_python", "",
                                    "Interpreter with torch + transformers; empty: skip.")
_BATCH_SIZES = flags.DEFINE_string("batch_sizes", "1,16", "Comma-separated batch sizes.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 128, "Tokens to generate.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 16, "Prompt tokens.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats; the median is reported.")
_SAMPLED = flags.DEFINE_bool("sampled", True, "Also time lm sampling (top-p, top-k) at the "
                             "largest batch, float32.")
HERE = os.path.dirname(os.path.abspath(__file__))


def timed(run):
  """Median seconds of --repeats calls of `run`, after one that compiles."""
  out = run()
  assert all(len(row) == _NEW_TOKENS.value for row in out)
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(_):
  logging.set_verbosity(logging.WARNING)
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np

  from lm import decode
  from lm.models import Decoder, ModelConfig

  results = {}
  batch_sizes = [int(x) for x in _BATCH_SIZES.value.split(",")]
  for dtype in ("float32", "bfloat16"):
    cfg = ModelConfig(vocab_size=50257, num_layers=12, num_heads=12, num_kv_heads=12,
                      d_model=768, d_ff=3072, max_len=1024, dtype=dtype, param_dtype=dtype,
                      norm="layernorm", positions="learned", mlp="gelu_tanh", use_bias=True,
                      tie_embeddings=True)
    model = Decoder(cfg)
    params = jax.jit(lambda k: nn.unbox(model.init(k, jnp.zeros((1, 8), jnp.int32))["params"]))(
        jax.random.key(0))
    for b in batch_sizes:
      prompts = np.random.default_rng(0).integers(0, 50257, (b, _PROMPT_LEN.value)).tolist()
      greedy = [decode.Sampling(temperature=0.0)] * b
      seconds = timed(lambda: decode.generate(model, params, prompts, _NEW_TOKENS.value, greedy))
      results[(dtype, b)] = b * _NEW_TOKENS.value / seconds
      print(json.dumps({"impl": "lm", "dtype": dtype, "batch": b, "seconds": round(seconds, 3),
                        "tokens_per_s": round(results[(dtype, b)], 1),
                        "device": jax.devices()[0].device_kind}), flush=True)
    if dtype == "float32" and _SAMPLED.value:
      # What a server pays per token for sampling (temperature 0.8, top-p 0.95, top-k 50).
      b = max(batch_sizes)
      prompts = np.random.default_rng(0).integers(0, 50257, (b, _PROMPT_LEN.value)).tolist()
      hot = [decode.Sampling(temperature=0.8, top_p=0.95, top_k=50, seed=i) for i in range(b)]
      seconds = timed(lambda: decode.generate(model, params, prompts, _NEW_TOKENS.value, hot))
      print(json.dumps({"impl": "lm", "dtype": dtype, "batch": b, "sampling": "t0.8,p0.95,k50",
                        "seconds": round(seconds, 3),
                        "tokens_per_s": round(b * _NEW_TOKENS.value / seconds, 1)}), flush=True)

  summary = {"benchmark": "decode_throughput", "new_tokens": _NEW_TOKENS.value,
             "prompt_len": _PROMPT_LEN.value, "cpu_count": os.cpu_count()}
  if _TORCH_PYTHON.value:
    out = subprocess.run(
        [_TORCH_PYTHON.value, os.path.join(HERE, "hf_generate.py"),
         f"--batch_sizes={_BATCH_SIZES.value}", f"--new_tokens={_NEW_TOKENS.value}",
         f"--prompt_len={_PROMPT_LEN.value}", f"--repeats={_REPEATS.value}"],
        capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
      if line.startswith("{"):
        print(line, flush=True)
        hf = json.loads(line)
        b = hf["batch"]
        summary[f"hf_tokens_per_s_batch{b}"] = hf["tokens_per_s"]
        summary[f"lm_f32_over_hf_batch{b}"] = round(results[("float32", b)] / hf["tokens_per_s"], 2)
        summary[f"lm_bf16_over_hf_batch{b}"] = round(results[("bfloat16", b)] / hf["tokens_per_s"], 2)
  for (dtype, b), v in results.items():
    summary[f"lm_{dtype}_tokens_per_s_batch{b}"] = round(v, 1)
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  sys.exit(app.run(main))
