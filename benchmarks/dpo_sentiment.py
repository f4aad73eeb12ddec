"""The controlled-sentiment DPO experiment end to end (experiments/smollm_dpo_sentiment.py):
the reward-KL table of SmolLM2-135M-Instruct before and after LoRA DPO for several betas.

    python benchmarks/dpo_sentiment.py [--betas=0.05,0.1,0.5] [--prompts=400] [--steps=0]
        [--heldout=100] [--root=runs]

Steps, each skipped when its output is already in --root (so a stopped run picks up):
  1. the SmolLM2 GGUF imported to ROOT/smollm2 (lm.interop.hf import);
  2. the reward model ROOT/movie_sentiment (experiments/minilm_movie_sentences.py);
  3. ROOT/sentiment/pairs.jsonl: 4 continuations sampled for each of --prompts training
     openings, the best and the worst by the reward (lm.reward_pairs);
  4. per beta, LoRA DPO in ROOT/smollm_dpo_sentiment_b{beta} (--steps, 0: the experiment's);
  5. each model's mean reward and KL per token (vs the base) on 2 samples of each of
     --heldout held-out openings (lm.evaluate --task=reward).
Prints one JSON line per model (and the wall time of each step).
"""

import json
import os
import subprocess
import sys
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))
from smollm_sft_squad import SHARED, smollm2_file  # pylint: disable=wrong-import-position

REVIEWS = os.path.join(SHARED, "movie_reviews", "reviews_polarity_v2_subset.jsonl")

_BETAS = flags.DEFINE_string("betas", "0.05,0.1,0.5", "Comma-separated DPO betas.")
_PROMPTS = flags.DEFINE_integer("prompts", 400, "Training openings to sample pairs from.")
_HELDOUT = flags.DEFINE_integer("heldout", 100, "Held-out openings to score (0: all 300).")
_STEPS = flags.DEFINE_integer("steps", 0, "DPO steps per beta; 0: the experiment's own.")
_ROOT = flags.DEFINE_string("root", "runs", "Where the workdirs go.")


def _run(args, label):
  started = time.time()
  done = subprocess.run([sys.executable, "-m"] + args, cwd=REPO, capture_output=True,
                        text=True, check=False)
  if done.returncode:
    sys.exit(f"{label} failed:\n{done.stderr[-3000:]}")
  print(json.dumps({"step": label, "wall_s": round(time.time() - started, 1)}), flush=True)
  return done.stdout


def _has_checkpoint(workdir):
  return os.path.isdir(os.path.join(workdir, "checkpoints"))


def main(_):
  root = os.path.abspath(_ROOT.value)
  base, scorer = os.path.join(root, "smollm2"), os.path.join(root, "movie_sentiment")
  pairs = os.path.join(root, "sentiment")
  if not _has_checkpoint(base):
    _run(["lm.interop.hf", "import", f"--src={smollm2_file()}", f"--dst={base}"], "import")
  if not _has_checkpoint(scorer):
    _run(["lm.main", "--config=experiments/minilm_movie_sentences.py", f"--workdir={scorer}"],
         "reward model")
  if not os.path.exists(os.path.join(pairs, "pairs.jsonl")):
    _run(["lm.reward_pairs", f"--workdir={base}", f"--scorer={scorer}", "--label=pos",
          f"--data={REVIEWS}", f"--limit={_PROMPTS.value}", f"--out={pairs}"], "pairs")
  with open(os.path.join(pairs, "summary.json"), encoding="utf-8") as f:
    print(json.dumps({"pairs": json.load(f)}), flush=True)

  def score(workdir, label):
    saved = os.path.join(workdir, f"reward_score_{_HELDOUT.value}.json")  # kept: a rerun
    if not os.path.exists(saved):                                       # reads it back
      out = _run(["lm.evaluate", f"--workdir={workdir}", "--task=reward",
                  f"--data={os.path.join(pairs, 'heldout.jsonl')}", f"--scorer={scorer}",
                  "--label=pos", f"--reference={base}", "--max_tokens=48", "--samples=2",
                  f"--limit={_HELDOUT.value}"], f"score {label}")
      with open(saved, "w", encoding="utf-8") as f:
        f.write(out.strip().splitlines()[-1])
    with open(saved, encoding="utf-8") as f:
      print(json.dumps({"model": label, **json.loads(f.read())}), flush=True)

  score(base, "base")
  for beta in _BETAS.value.split(","):
    workdir = os.path.join(root, f"smollm_dpo_sentiment_b{beta}")
    steps = [f"--config.train.num_steps={_STEPS.value}"] if _STEPS.value else []
    if not os.path.exists(os.path.join(workdir, "done")):
      _run(["lm.main", "--config=experiments/smollm_dpo_sentiment.py", f"--workdir={workdir}",
            f"--config.task.beta={beta}", f"--config.data.path={pairs}/pairs.jsonl"] + steps,
           f"dpo beta={beta}")
      open(os.path.join(workdir, "done"), "w", encoding="utf-8").close()
    score(workdir, f"dpo beta={beta}")


if __name__ == "__main__":
  app.run(main)
