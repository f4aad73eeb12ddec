"""Hugging Face `transformers` generate on a randomly initialised GPT-2 small, for
benchmarks/decode_throughput.py (run with an interpreter that has torch and transformers).

Prints one JSON line per batch size: greedy decoding of `new_tokens` tokens after a prompt
of `prompt_len` random ids, float32, KV cache on (transformers' default), median of repeats.
"""

import argparse
import json
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch_sizes", default="1,16")
  ap.add_argument("--new_tokens", type=int, default=128)
  ap.add_argument("--prompt_len", type=int, default=16)
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()
  torch.manual_seed(0)
  model = GPT2LMHeadModel(GPT2Config()).eval()  # 12 layers, 12 heads, 768, vocab 50257
  for b in (int(x) for x in args.batch_sizes.split(",")):
    ids = torch.randint(0, 50257, (b, args.prompt_len))
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                  do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    times = []
    with torch.no_grad():
      model.generate(ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm up
      for _ in range(args.repeats):
        start = time.perf_counter()
        out = model.generate(ids, **kwargs)
        times.append(time.perf_counter() - start)
    assert out.shape == (b, args.prompt_len + args.new_tokens)
    seconds = statistics.median(times)
    print(json.dumps({"impl": "transformers", "batch": b, "seconds": round(seconds, 3),
                      "tokens_per_s": round(b * args.new_tokens / seconds, 1),
                      "torch_threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
  main()
