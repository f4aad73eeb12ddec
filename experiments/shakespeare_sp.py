"""Tiny Shakespeare with a SentencePiece unigram vocabulary trained on the train split.

The model and schedule of experiments/shakespeare_char.py; the context is 64 tokens (about
190 characters) instead of 64 characters. Losses per token are not comparable across
vocabularies: compare the final "nats per character", which lm reports for every split.

    python -m lm.main --config=experiments/shakespeare_sp.py \
        --config.data.path=../shared/data/tiny_shakespeare/input.txt

Without data.path it reads the TFDS catalog's tiny_shakespeare (downloaded once).
"""

import os

from lm.config import load_experiment


def get_config():
  config = load_experiment(os.path.join(os.path.dirname(__file__), "shakespeare_char.py"))
  config.data.tokenizer = "unigram"
  config.data.vocab_size = 2048
  config.sample.prompt = "ROMEO:"
  config.sample.num_tokens = 100
  return config
