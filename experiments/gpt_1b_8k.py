"""experiments/gpt_1b.py at 8,192 tokens of context: the same ~1.0B decoder, the same tokens
per step (3 rows of 8,192 instead of 12 of 2,048), RoPE base 500,000 (Llama 3's, for long
contexts).

With fused attention (the cudnn / pallas_gpu / splash kernels that config.model.kernels=auto
picks on a GPU or TPU) the activations stay linear in the context; the materialised kernels
would keep [heads, 8192, 8192] probabilities per row and layer. The planner shows both:
`python -m lm.plan --config=experiments/gpt_1b_8k.py --hardware=h200` (fused: fits) and
`--config.model.kernels=xla` (materialised: does not).
"""

import os

from lm.config import load_experiment


def get_config():
  config = load_experiment(os.path.join(os.path.dirname(__file__), "gpt_1b.py"))
  config.data.seq_len = config.model.max_len = 8192
  config.model.rope_theta = 500_000.0
  config.train.batch_size = 3
  return config
