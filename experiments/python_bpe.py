"""The default experiment's model on the Python standard library, with a SentencePiece BPE
vocabulary (4,096 pieces, trained on the train split) instead of bytes.

    python -m lm.main --config=experiments/python_bpe.py

Compare with experiments/base.py through the final "nats per character".
"""

import os

from lm.config import load_experiment


def get_config():
  config = load_experiment(os.path.join(os.path.dirname(__file__), "base.py"))
  config.data.tokenizer = "bpe"
  return config
