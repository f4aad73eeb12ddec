"""Grain pipelines: tokenized streams, packed windows, shuffled host-sharded batches.

Text corpora are tokenized once per (dataset, tokenizer) by a Grain pipeline over the
array_record records and cached as one token stream per split: every document is `bos`
followed by its tokens, back to back (nanoGPT's train.bin, plus the document starts).

Training examples are windows of seq_len + 1 tokens of that stream. Each epoch cuts the
stream at a fresh random offset into (n - 1) // seq_len windows and visits them in a fresh
seeded order (Grain's index shuffle), so every token is a target once per epoch. A window
packs the pieces of all documents it covers: `segment_ids` number them (1, 2, ...) and
`positions` restart at each document start, so attention never crosses a document boundary
(the model's mask compares segment ids). Evaluation walks the stream in consecutive windows,
so every target is scored exactly once; the tail is padded (segment 0, weight 0).

Batches are random-access (a Grain MapDataset indexed by batch number), so a pipeline is a
pure function of (seed, batch index). Each process builds only its own rows of every global
batch: the global batch is the same, row for row, whatever the number of processes. Grain
prefetches batches on background threads; the iterator's state (`get_state()`) goes into
every checkpoint and `set_state()` puts a resumed run at exactly the next batch.
"""

import contextlib
import dataclasses
import fcntl
import os
import sys

import grain
import numpy as np

from lm.errors import UserError


@dataclasses.dataclass
class TokenStream:
  tokens: np.ndarray  # [N] uint16 or int32, possibly memory-mapped
  doc_starts: np.ndarray  # [D] int64: index of each document's bos in `tokens`

  def __len__(self):
    return len(self.tokens)


@contextlib.contextmanager
def _file_lock(path):
  with open(path + ".lock", "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def token_stream(records, tokenizer, cache_prefix, num_threads=4):
  """Tokenizes `records` ({"text"} dicts, random access) once into a cached TokenStream."""
  dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
  tokens_path, starts_path = cache_prefix + ".tokens.bin", cache_prefix + ".starts.npy"
  os.makedirs(os.path.dirname(tokens_path), exist_ok=True)
  with _file_lock(cache_prefix):
    if not (os.path.exists(tokens_path) and os.path.exists(starts_path)):
      encoded = (grain.MapDataset.source(records)
                 .map(lambda record: tokenizer.encode(record["text"]))
                 .to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                    prefetch_buffer_size=64)))
      starts, n = [], 0
      bos = np.array([tokenizer.bos_id], dtype)
      tmp = f"{tokens_path}.{os.getpid()}.tmp"
      with open(tmp, "wb") as f:
        for ids in encoded:
          starts.append(n)
          f.write(bos.tobytes())
          f.write(ids.astype(dtype).tobytes())
          n += 1 + len(ids)
      np.save(f"{starts_path}.{os.getpid()}.tmp.npy", np.asarray(starts, np.int64))
      os.replace(f"{starts_path}.{os.getpid()}.tmp.npy", starts_path)
      os.replace(tmp, tokens_path)  # last: its presence marks a complete cache
  size = os.path.getsize(tokens_path) // np.dtype(dtype).itemsize
  tokens = (np.memmap(tokens_path, dtype=dtype, mode="r", shape=(size,)) if size
            else np.zeros((0,), dtype))
  return TokenStream(tokens=tokens, doc_starts=np.load(starts_path))


def window(stream, start, seq_len, pad_id):
  """The packed example at `start`: inputs, targets, weights, segment_ids, positions [L]."""
  n = len(stream.tokens)
  stop = min(start + seq_len + 1, n)
  ids = np.full(seq_len + 1, pad_id, np.int32)
  ids[:stop - start] = stream.tokens[start:stop]
  valid = np.arange(seq_len) < stop - start - 1
  t = start + np.arange(seq_len)
  # Each position's document (index into doc_starts) and where that document starts, or the
  # window's start for the document the window cuts into.
  doc = np.searchsorted(stream.doc_starts, t, side="right") - 1
  doc_start = np.maximum(stream.doc_starts[np.maximum(doc, 0)], start)
  first = doc[0]
  return {"inputs": ids[:-1], "targets": ids[1:], "weights": valid.astype(np.float32),
          "segment_ids": np.where(valid, doc - first + 1, 0).astype(np.int32),
          "positions": np.where(valid, t - doc_start, 0).astype(np.int32)}


class StreamWindows:
  """Training windows of a TokenStream: `example(i)` for the i-th window of the run."""

  def __init__(self, stream, seq_len, seed, pad_id, split="train"):
    if len(stream) < seq_len + 1:
      raise UserError(f"config.data: the {split} split has {len(stream)} tokens, fewer than "
                      f"data.seq_len + 1 = {seq_len + 1}; use more text or a shorter seq_len")
    self.stream, self.seq_len, self.seed, self.pad_id = stream, seq_len, seed, pad_id
    self.per_epoch = (len(stream) - 1) // seq_len
    self._order = grain.MapDataset.range(self.per_epoch).shuffle(seed=seed).repeat(None)

  def offset(self, epoch):
    slack = len(self.stream) - 1 - self.per_epoch * self.seq_len
    return int(np.random.default_rng([self.seed, epoch]).integers(0, slack + 1))

  def example(self, i):
    epoch = i // self.per_epoch
    start = self.offset(epoch) + self._order[i] * self.seq_len
    return window(self.stream, start, self.seq_len, self.pad_id)


def _stack(examples):
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def host_rows(batch_size, process_index, process_count):
  if batch_size % process_count:
    raise UserError(f"config.train.batch_size: {batch_size} is not divisible by the "
                    f"{process_count} processes")
  per_host = batch_size // process_count
  return process_index * per_host, per_host


def train_batches(example_fn, batch_size, process_index=0, process_count=1):
  """MapDataset: batch k = this process's rows of global examples [k*B, (k+1)*B)."""
  first, per_host = host_rows(batch_size, process_index, process_count)
  return grain.MapDataset.range(sys.maxsize).map(
      lambda k: _stack([example_fn(k * batch_size + first + r) for r in range(per_host)]))


def eval_batches(num_examples, example_fn, batch_size, process_index=0, process_count=1):
  """MapDataset over every example once, in order; rows past the end are all padding."""
  first, per_host = host_rows(batch_size, process_index, process_count)
  num_batches = -(-num_examples // batch_size)
  padding = _padding_like(example_fn(0)) if num_examples else None

  def batch(k):
    ids = (k * batch_size + first + r for r in range(per_host))
    return _stack([example_fn(i) if i < num_examples else padding for i in ids])

  return grain.MapDataset.range(num_batches).map(batch)


def _padding_like(example):
  return {k: np.zeros_like(v) for k, v in example.items()}


def iterator(dataset, num_threads=2, prefetch=8, state=None):
  """A prefetching iterator over a MapDataset of batches, optionally at a saved state."""
  it = iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                      prefetch_buffer_size=prefetch)))
  if state is not None:
    it.set_state(state)
  return it
