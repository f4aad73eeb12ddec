"""A ~1.0B-parameter decoder for accelerator throughput (benchmarks/gpu_mfu.sh).

20 layers, d_model 2048, 16 heads, SwiGLU (d_ff 5632), RoPE, RMSNorm, context 2048,
bfloat16 compute with float32 parameters and Adam state, layers scanned, remat of
everything but the matmuls. Byte-level on the Python standard library so that it runs
anywhere; `python -m lm.plan --config=experiments/gpt_1b.py --hardware=h200` sizes it.
"""

import os

from lm.config import load_experiment


def get_config():
  config = load_experiment(os.path.join(os.path.dirname(__file__), "base.py"))
  m = config.model
  m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.d_ff = 20, 2048, 16, 16, 5632
  m.max_len = 2048
  m.dtype, m.param_dtype = "bfloat16", "float32"
  m.scan_layers, m.remat = True, "dots"
  config.data.seq_len = 2048
  config.train.num_steps = 1000
  config.train.warmup_steps = 100
  config.train.learning_rate, config.train.min_learning_rate = 3e-4, 3e-5
  config.train.eval_every, config.train.checkpoint_every = 500, 500
  config.train.log_every = 10
  config.sample.num_tokens = 0
  return config
