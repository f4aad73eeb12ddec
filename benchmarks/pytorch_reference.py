"""A PyTorch (eager, float32) GPT trained like experiments/shakespeare_char.py: the reference
that lm's speed and accuracy are compared with. Not part of lm; needs `pip install torch`.

    python benchmarks/pytorch_reference.py --data=../shared/data/tiny_shakespeare/input.txt

Same model (pre-norm GPT, LayerNorm without bias, exact GELU, tied embeddings, GPT-2 init),
optimizer (AdamW, decay on >= 2-d weights, clip 1.0, warm-up + cosine), batches (nanoGPT's:
windows drawn at random, here by numpy's default_rng([seed, step]); or, with
`--batches=FILE.npz`, lm's own batches) and validation (every token of the last 10% once, as
lm's evaluation does). Prints JSON lines:
per-step losses when --print_losses > 0, then ms/step, tokens/s and the final validation loss.
`--init=FILE.npz` starts from lm's initial parameters (flattened names, see below) so that
the two implementations can be compared step by step.
"""

import argparse
import json
import math
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):

  def __init__(self, d, heads, d_ff):
    super().__init__()
    self.heads = heads
    self.ln_1 = nn.LayerNorm(d, bias=False)
    self.qkv = nn.Linear(d, 3 * d, bias=False)
    self.out = nn.Linear(d, d, bias=False)
    self.ln_2 = nn.LayerNorm(d, bias=False)
    self.wi = nn.Linear(d, d_ff, bias=False)
    self.wo = nn.Linear(d_ff, d, bias=False)

  def forward(self, x):
    b, length, d = x.shape
    q, k, v = self.qkv(self.ln_1(x)).split(d, dim=2)
    q, k, v = (t.view(b, length, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    x = x + self.out(y.transpose(1, 2).reshape(b, length, d))
    return x + self.wo(F.gelu(self.wi(self.ln_2(x))))


class GPT(nn.Module):

  def __init__(self, vocab, d, heads, layers, d_ff, max_len):
    super().__init__()
    self.embed = nn.Embedding(vocab, d)
    self.pos_embed = nn.Embedding(max_len, d)
    self.blocks = nn.ModuleList(Block(d, heads, d_ff) for _ in range(layers))
    self.ln_f = nn.LayerNorm(d, bias=False)
    for name, p in self.named_parameters():
      if p.dim() >= 2:
        std = 0.02 / math.sqrt(2 * layers) if name.endswith(("out.weight", "wo.weight")) else 0.02
        nn.init.normal_(p, 0.0, std)

  def forward(self, tokens):
    positions = torch.arange(tokens.shape[1])
    x = self.embed(tokens) + self.pos_embed(positions)
    for block in self.blocks:
      x = block(x)
    return self.ln_f(x) @ self.embed.weight.T


def load_lm_init(model, path, heads):
  """Copies lm's parameters (flattened with '/', as saved by the parity check) into model."""
  p = np.load(path)
  t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
  with torch.no_grad():
    model.embed.weight.copy_(t(p["embed/embedding"]))
    model.pos_embed.weight.copy_(t(p["pos_embed/embedding"]))
    model.ln_f.weight.copy_(t(p["ln_f/scale"]))
    for i, block in enumerate(model.blocks):
      g = lambda name: p[f"layer_{i}/{name}"]
      d = g("attn/query/kernel").shape[0]
      qkv = [g(f"attn/{n}/kernel").reshape(d, d).T for n in ("query", "key", "value")]
      block.qkv.weight.copy_(t(np.concatenate(qkv, axis=0)))
      block.out.weight.copy_(t(g("attn/out/kernel").reshape(d, d).T))
      block.wi.weight.copy_(t(g("mlp/wi/kernel").T))
      block.wo.weight.copy_(t(g("mlp/wo/kernel").T))
      block.ln_1.weight.copy_(t(g("ln_1/scale")))
      block.ln_2.weight.copy_(t(g("ln_2/scale")))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--data", required=True)
  ap.add_argument("--steps", type=int, default=2000)
  ap.add_argument("--decay_steps", type=int, default=2000, help="end of the cosine decay")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (nanoGPT: 1e-3)")
  ap.add_argument("--min_lr", type=float, default=1e-4, help="end of the cosine decay")
  ap.add_argument("--init", default="")
  ap.add_argument("--print_losses", type=int, default=0)
  ap.add_argument("--batches", default="", help="npz of [steps, B, L+1] windows to train on")
  args = ap.parse_args()
  torch.manual_seed(args.seed)
  batch, length, layers, heads, d = 12, 64, 4, 4, 128
  lr, min_lr, warmup = args.lr, args.min_lr, 100

  text = open(args.data, encoding="utf-8").read()
  n_train = int(len(text) * 0.9)
  chars = sorted(set(text[:n_train]))  # the vocabulary lm's char tokenizer builds, + unk
  index = {c: i for i, c in enumerate(chars)}
  ids = np.array([index.get(c, len(chars)) for c in text], dtype=np.int64)
  train, val = ids[:n_train], ids[n_train:]
  vocab = len(chars) + 1
  if args.init:  # lm's vocabulary: its char tokenizer adds special ids after the characters
    vocab = np.load(args.init)["embed/embedding"].shape[0]
  model = GPT(vocab, d, heads, layers, 4 * d, length)
  given = np.load(args.batches)["windows"] if args.batches else None
  if args.init:
    load_lm_init(model, args.init, heads)
  decay = [p for p in model.parameters() if p.dim() >= 2]
  no_decay = [p for p in model.parameters() if p.dim() < 2]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                           {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.99))

  def lr_at(step):
    if step < warmup:
      return lr * (step + 1) / (warmup + 1)
    ratio = min((step - warmup) / (args.decay_steps - warmup), 1.0)
    return min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (lr - min_lr)

  start = time.perf_counter()
  for step in range(args.steps):
    if given is not None:
      window = torch.from_numpy(given[step].astype(np.int64))
    else:
      starts = np.random.default_rng([args.seed, step]).integers(0, len(train) - length, batch)
      window = torch.from_numpy(train[starts[:, None] + np.arange(length + 1)])
    for group in opt.param_groups:
      group["lr"] = lr_at(step)
    logits = model(window[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if step < args.print_losses:
      print(json.dumps({"step": step + 1, "loss": loss.item()}), flush=True)
  seconds = time.perf_counter() - start

  model.eval()
  total, count = 0.0, 0
  with torch.no_grad():
    for i in range(0, len(val) - 1, length):
      chunk = torch.from_numpy(val[i:i + length + 1])[None]
      logits = model(chunk[:, :-1])
      total += F.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
      count += chunk.shape[1] - 1
  print(json.dumps({"benchmark": "pytorch_reference", "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "steps": args.steps,
                    "seed": args.seed, "ms_per_step": round(1000 * seconds / args.steps, 2),
                    "tokens_per_s": round(batch * length * args.steps / seconds, 1),
                    "val_loss": round(total / count, 4), "val_tokens": count}), flush=True)


if __name__ == "__main__":
  main()
