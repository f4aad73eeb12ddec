"""experiments/gpt_1b.py at 32,768 tokens of context: one row of 32,768 per step (a third
more tokens per step than gpt_1b.py's 12 x 2,048), RoPE base 500,000 (Llama 3's).

With fused attention (cudnn / pallas_gpu on a GPU, splash on a TPU: config.model.kernels=auto)
the same remat policy as at 2k (keep the matmul outputs) fits one H200 or TPU v5p:
`python -m lm.plan --config=experiments/gpt_1b_32k.py --hardware=h200`. The materialised
kernels (--config.model.kernels=xla) would keep [16, 32768, 32768] probabilities per layer,
640 GiB for the 20 layers: the planner says it does not fit.
"""

import os

from lm.config import load_experiment


def get_config():
  config = load_experiment(os.path.join(os.path.dirname(__file__), "gpt_1b.py"))
  config.data.seq_len = config.model.max_len = 32768
  config.model.rope_theta = 500_000.0
  config.train.batch_size = 1
  return config
