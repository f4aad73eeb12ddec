"""Data: corpus -> tokenizer -> train/validation/test token streams -> batches."""

import dataclasses

import numpy as np

from lm.data.batches import EvalBatches, TrainBatches
from lm.data.corpus import Corpus, load_corpus
from lm.data.tokenizers import ByteTokenizer, CharTokenizer, from_dict, train_tokenizer

__all__ = ["ByteTokenizer", "CharTokenizer", "Corpus", "Data", "EvalBatches", "TrainBatches",
           "load_corpus", "make_data"]


@dataclasses.dataclass
class Data:
  tokenizer: object
  fingerprint: str
  source: str
  splits: dict  # split name -> int32 token array

  def train_batches(self, batch_size, seq_len, seed):
    return TrainBatches(self.splits["train"], batch_size, seq_len, seed)

  def eval_batches(self, split, batch_size, seq_len):
    return EvalBatches(self.splits[split], batch_size, seq_len, split)


def make_data(config, tokenizer_spec=None):
  """Loads and tokenizes the corpus. `tokenizer_spec` (from a checkpoint) skips training."""
  corpus = load_corpus(config.data)
  if tokenizer_spec is not None:
    tokenizer = from_dict(tokenizer_spec)
  else:
    tokenizer = train_tokenizer(config.data.tokenizer, corpus.train)
  splits = {name: np.asarray(tokenizer.encode(getattr(corpus, name)), np.int32)
            for name in ("train", "validation", "test")}
  return Data(tokenizer=tokenizer, fingerprint=corpus.fingerprint, source=corpus.source,
              splits=splits)
