"""The default experiment: a small byte-level GPT on the Python standard library's sources.

Runs offline on any machine with lm installed (the corpus ships with Python), in a few
minutes on a 2-core CPU:  python -m lm.main --config=experiments/base.py
"""

from lm.config import defaults


def get_config():
  config = defaults()  # python_stdlib, bytes, 4 layers of d_model 128: the defaults
  config.model.max_len = 128
  config.model.positions = "rope"
  config.model.norm = "rmsnorm"
  config.model.mlp = "swiglu"

  config.train.batch_size = 16
  config.train.num_steps = 500
  config.train.learning_rate = 2e-3
  config.train.min_learning_rate = 2e-4
  config.train.warmup_steps = 50
  config.train.checkpoint_every = 250

  config.sample.prompt = "def "
  return config
