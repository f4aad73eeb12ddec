"""Preference pairs ranked by a reward model: the DPO paper's controlled-generation recipe.

    python -m lm.reward_pairs --workdir=runs/smollm2 --scorer=runs/movie_sentiment \\
        --label=pos --data=.../movie_reviews/reviews_polarity_v2_subset.jsonl --words=8 \\
        --samples=4 --max_tokens=48 --out=runs/sentiment

Each record of --data (JSON Lines with a `text` field) becomes a prompt: the user message
--prompt with `{opening}`, the record's first --words words. The records are split by a
seeded shuffle (lm/data/source_files.py; --heldout of them held out). For every training
prompt the model (--workdir, the policy DPO will start from) samples --samples replies at
temperature 1; the scorer (an lm classification workdir, e.g. experiments/
minilm_movie_sentences.py's) gives each reply's probability of --label, the reward; the
best and the worst reply become a pair. Prompts whose replies tie, or are all the same
text, give no pair. Written to --out:

    pairs.jsonl     {"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"}
    heldout.jsonl   {"prompt"}: the held-out prompts, for lm.evaluate --task=reward
    summary.json    counts, the mean reward of all samples, wall time

lm.evaluate --task=reward scores a model on heldout.jsonl the same way: the mean reward of
sampled replies and, against --reference, their KL per token.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

from lm.errors import UserError

PROMPT = "Continue this movie review: {opening}"


class Scorer:
  """The reward: a classification workdir's probability of one label for each text."""

  def __init__(self, workdir, label):
    from lm.inference import load  # pylint: disable=import-outside-toplevel
    self.loaded = load(workdir, decoder=False)
    names = self.loaded.label_names
    if label not in names:
      raise UserError(f"--label: {workdir} classifies into {', '.join(names) or 'no labels'}, "
                      f"not {label!r}")
    self.index = names.index(label)

  def __call__(self, texts):
    from lm import report  # pylint: disable=import-outside-toplevel
    return report.classify(self.loaded, list(texts))[:, self.index].astype(float)


def read_prompts(path, words, prompt, heldout_fraction, seed=0):
  """{"train": [user messages], "validation": [...]}: each record's opening in `prompt`."""
  from lm.data import corpus, source_files  # pylint: disable=import-outside-toplevel
  text = corpus.decode_utf8(source_files.read_bytes(path, "--data"), path)
  openings = []
  for number, line in enumerate(text.split("\n"), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(f"{path} line {number}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
      raise UserError(f"{path} line {number}: a record needs a text field")
    opening = " ".join(record["text"].split()[:words] if words else record["text"].split())
    if opening:
      openings.append(opening)
  if "{opening}" not in prompt:
    raise UserError(f"--prompt: {prompt!r} has no {{opening}}")
  parts = source_files.seeded_split(openings, heldout_fraction, 0.0, seed, f"--data: {path}")
  return {split: [prompt.replace("{opening}", o) for o in items]
          for split, items in parts.items()}


def sample_replies(loaded, questions, samples, max_tokens, seed=0, batch_size=32):
  """[(context ids, [(reply ids, reply text)] * samples)] for one-turn chats: replies
  sampled at temperature 1 (no top-k or top-p), `samples` per question, in batches of
  `batch_size` rows. Row r of question q draws with seed seed + q * samples + r."""
  from lm import decode  # pylint: disable=import-outside-toplevel
  contexts = [loaded.chat_ids([{"role": "user", "content": q}]) for q in questions]
  rows = [(q, r) for q in range(len(questions)) for r in range(samples)]
  rows.sort(key=lambda qr: len(contexts[qr[0]]))  # batches of similar lengths
  stop_text = getattr(loaded.tokenizer, "chat_stop_text", None)
  out = [[None] * samples for _ in questions]
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    with loaded.on_mesh():
      ids = decode.generate(
          loaded.model, loaded.params, [contexts[q] for q, _ in chunk], max_tokens,
          [decode.Sampling(temperature=1.0, seed=seed + q * samples + r) for q, r in chunk],
          loaded.stop_ids)
    for (q, r), reply in zip(chunk, ids):
      text = loaded.tokenizer.decode([t for t in reply if t not in loaded.stop_ids])
      out[q][r] = (list(reply), (text.split(stop_text)[0] if stop_text else text).strip())
  return list(zip(contexts, out))


def best_and_worst(replies, rewards):
  """(chosen, rejected, their rewards) of one prompt's replies, or None on a tie."""
  order = np.argsort(rewards, kind="stable")
  worst, best = int(order[0]), int(order[-1])
  if rewards[best] <= rewards[worst] or replies[best] == replies[worst]:
    return None
  return replies[best], replies[worst], float(rewards[best]), float(rewards[worst])


def make_pairs(policy, scorer, questions, samples, max_tokens, seed=0, batch_size=32):
  """(pair records, every sample's reward) for `questions`."""
  sampled = sample_replies(policy, questions, samples, max_tokens, seed, batch_size)
  texts = [[text for _, text in replies] for _, replies in sampled]
  rewards = scorer([t for row in texts for t in row]).reshape(len(questions), samples)
  pairs = []
  for question, row, row_rewards in zip(questions, texts, rewards):
    picked = best_and_worst(row, row_rewards)
    if picked:
      chosen, rejected, good, bad = picked
      pairs.append({"prompt": question, "chosen": chosen, "rejected": rejected,
                    "chosen_reward": round(good, 4), "rejected_reward": round(bad, 4)})
  return pairs, rewards


def _write_jsonl(path, records):
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  os.replace(tmp, path)  # never a half-written file


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m lm.reward_pairs",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="the policy that samples the replies")
  parser.add_argument("--scorer", required=True, help="a classification workdir (the reward)")
  parser.add_argument("--label", required=True, help="the scorer's label whose probability "
                      "is the reward")
  parser.add_argument("--data", required=True, help="JSON Lines records with a text field")
  parser.add_argument("--out", required=True, help="a folder for pairs.jsonl, heldout.jsonl")
  parser.add_argument("--prompt", default=PROMPT)
  parser.add_argument("--words", type=int, default=8, help="opening words (0: all)")
  parser.add_argument("--heldout", type=float, default=0.2)
  parser.add_argument("--samples", type=int, default=4)
  parser.add_argument("--max_tokens", type=int, default=48)
  parser.add_argument("--limit", type=int, default=0, help="the first N training prompts")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  from lm.inference import load  # pylint: disable=import-outside-toplevel
  started = time.time()
  try:
    if args.samples < 2 or args.max_tokens < 1 or args.words < 0 or args.limit < 0:
      raise UserError("--samples must be >= 2, --max_tokens >= 1, --words and --limit >= 0")
    if not 0 < args.heldout < 1:
      raise UserError(f"--heldout: {args.heldout} is not a fraction in (0, 1)")
    prompts = read_prompts(args.data, args.words, args.prompt, args.heldout, args.seed)
    train = prompts["train"][:args.limit] if args.limit else prompts["train"]
    scorer = Scorer(args.scorer, args.label)
    policy = load(args.workdir)
    pairs, rewards = make_pairs(policy, scorer, train, args.samples, args.max_tokens,
                                args.seed, args.batch_size)
  except UserError as e:
    print(f"lm: error: {e}", file=sys.stderr)
    sys.exit(2)
  os.makedirs(args.out, exist_ok=True)
  _write_jsonl(os.path.join(args.out, "pairs.jsonl"), pairs)
  _write_jsonl(os.path.join(args.out, "heldout.jsonl"),
               [{"prompt": p} for p in prompts["validation"]])
  summary = {"prompts": len(train), "pairs": len(pairs), "heldout": len(prompts["validation"]),
             "samples": args.samples, "mean_reward": round(float(rewards.mean()), 4),
             "mean_chosen": round(float(np.mean([p["chosen_reward"] for p in pairs])), 4)
             if pairs else None,
             "mean_rejected": round(float(np.mean([p["rejected_reward"] for p in pairs])), 4)
             if pairs else None, "wall_s": round(time.time() - started, 1)}
  with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f)
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
