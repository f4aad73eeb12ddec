"""The default experiment: a small byte-level GPT on the Python standard library's sources.

Runs offline on any machine with lm installed (the corpus ships with Python), in a few
minutes on a 2-core CPU:  python -m lm.main --config=experiments/base.py
"""

from lm.config import defaults


def get_config():
  config = defaults()
  config.data.name = "python_stdlib"
  config.data.tokenizer = "byte"
  config.data.seq_len = 128
  config.data.validation_fraction = 0.05
  config.data.test_fraction = 0.05

  config.model.num_layers = 4
  config.model.num_heads = 4
  config.model.num_kv_heads = 4
  config.model.d_model = 128
  config.model.d_ff = 512
  config.model.max_len = 128
  config.model.positions = "rope"
  config.model.norm = "rmsnorm"
  config.model.mlp = "swiglu"

  config.train.batch_size = 16
  config.train.num_steps = 500
  config.train.learning_rate = 2e-3
  config.train.min_learning_rate = 2e-4
  config.train.warmup_steps = 50
  config.train.eval_every = 250
  config.train.eval_steps = 20
  config.train.checkpoint_every = 250
  config.train.log_every = 50

  config.sample.prompt = "def "
  config.sample.num_tokens = 200
  return config
