"""Data pipeline throughput on Tiny Shakespeare with a trained SentencePiece model.

    python benchmarks/data_throughput.py [--data=../shared/data/tiny_shakespeare/input.txt] \
        [--tokenizer=unigram] [--vocab_size=4096] [--batches=2000]

Runs the pipeline exactly as `lm.main` does, from a fresh cache folder: build the
array_record dataset, train the tokenizer on the train split, tokenize every split through
Grain into the token stream, then draw `batches` packed batches (the shakespeare_char shape:
12 x 64) through the prefetching Grain iterator. For comparison it times the training step of
experiments/shakespeare_char.py in the same run. Prints one JSON line; tokens/s count
tokens of the trained vocabulary. Never asserts on time.
"""

import json
import os
import platform
import tempfile
import time

from absl import app, flags, logging

HERE = os.path.dirname(os.path.abspath(__file__))
_DATA = flags.DEFINE_string(
    "data", os.path.join(HERE, "..", "..", "shared", "data", "tiny_shakespeare", "input.txt"),
    "Tiny Shakespeare input.txt.")
_TOKENIZER = flags.DEFINE_enum("tokenizer", "unigram", ["unigram", "bpe"], "SentencePiece type.")
_VOCAB = flags.DEFINE_integer("vocab_size", 4096, "SentencePiece vocabulary size.")
_BATCHES = flags.DEFINE_integer("batches", 2000, "Packed batches to draw.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 100, "Timed shakespeare_char train steps.")


def main(_):
  logging.set_verbosity(logging.WARNING)
  cache = tempfile.mkdtemp(prefix="lm-data-bench-")
  os.environ["LM_CACHE_DIR"] = cache
  import jax

  from lm import sharding
  from lm.config import load_experiment
  from lm.data import builders, make_data, pipeline, tokenizers
  from lm.train import Trainer

  config = load_experiment(os.path.join(HERE, "..", "experiments", "shakespeare_char.py"))
  config.data.path = os.path.abspath(_DATA.value)
  config.data.tokenizer, config.data.vocab_size = _TOKENIZER.value, _VOCAB.value
  batch_size, seq_len = config.train.batch_size, config.data.seq_len

  start = time.perf_counter()
  prepared = builders.prepare(config.data)
  build_s = time.perf_counter() - start
  start = time.perf_counter()
  train_text = [prepared.sources["train"][i]["text"] for i in range(len(prepared.sources["train"]))]
  tokenizer = tokenizers.train_tokenizer(config.data, train_text)
  tokenizer_s = time.perf_counter() - start
  start = time.perf_counter()
  data = make_data(config, tokenizer_spec=tokenizer.to_dict())  # tokenizes into the cache
  tokenize_s = time.perf_counter() - start
  total_tokens = sum(data.size(s) for s in ("train", "validation", "test"))
  characters = sum(len(r["text"]) for src in prepared.sources.values()
                   for r in (src[i] for i in range(len(src))))

  iterator = data.iterator(data.train_batches(batch_size, seq_len, seed=0))
  next(iterator)  # threads started
  start = time.perf_counter()
  for _ in range(_BATCHES.value):
    next(iterator)
  batch_s = time.perf_counter() - start
  batch_tokens_per_s = _BATCHES.value * batch_size * seq_len / batch_s
  epoch = pipeline.StreamWindows(data.streams["train"], seq_len, 0, 0).per_epoch * seq_len
  cold_tokens_per_s = epoch / (build_s + tokenize_s + epoch / batch_tokens_per_s)

  # The consumer: shakespeare_char's train step (characters), timed in the same run.
  char_config = load_experiment(os.path.join(HERE, "..", "experiments", "shakespeare_char.py"))
  char_config.data.path = config.data.path
  char_data = make_data(char_config)
  trainer = Trainer(char_config, char_data.tokenizer.vocab_size,
                    sharding.make_mesh(char_config.mesh, jax.devices()[:1]))
  char_batches = char_data.iterator(char_data.train_batches(batch_size, seq_len, 0))
  state = trainer.init_state()
  for _ in range(5):
    state, _ = trainer.train_step(state, trainer.shard_batch(next(char_batches)))
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(_TRAIN_STEPS.value):
    state, _ = trainer.train_step(state, trainer.shard_batch(next(char_batches)))
  jax.block_until_ready(state)
  train_tokens_per_s = _TRAIN_STEPS.value * batch_size * seq_len / (time.perf_counter() - start)

  print(json.dumps({
      "benchmark": "data_throughput", "corpus": config.data.path,
      "tokenizer": _TOKENIZER.value, "vocab_size": tokenizer.vocab_size,
      "cpu_count": os.cpu_count(), "machine": platform.machine(),
      "characters": characters, "tokens": total_tokens,
      "build_array_record_s": round(build_s, 3),
      "train_tokenizer_s": round(tokenizer_s, 3),
      "tokenize_s": round(tokenize_s, 3),
      "tokenize_tokens_per_s": round(total_tokens / tokenize_s),
      "batch_shape": [batch_size, seq_len], "batches": _BATCHES.value,
      "batch_tokens_per_s": round(batch_tokens_per_s),
      "first_epoch_tokens_per_s_incl_build_and_tokenize": round(cold_tokens_per_s),
      "shakespeare_char_train_tokens_per_s": round(train_tokens_per_s),
      "ratio_batches_to_training": round(batch_tokens_per_s / train_tokens_per_s, 1),
      "ratio_first_epoch_to_training": round(cold_tokens_per_s / train_tokens_per_s, 1),
  }), flush=True)


if __name__ == "__main__":
  app.run(main)
