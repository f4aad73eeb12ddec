"""Grain pipelines: tokenized streams, packed windows, shuffled host-sharded batches.

Text corpora are tokenized once per (dataset, tokenizer) by a Grain pipeline over the
array_record records and cached as one token stream per split: every document is `bos`
followed by its tokens, back to back (nanoGPT's train.bin, plus the document starts).

Training examples are windows of seq_len + 1 tokens of that stream. Each epoch cuts the
stream at a fresh random offset into (n - 1) // seq_len windows and visits them in a fresh
seeded order (Grain's index shuffle), so each token is a target at most once per epoch (all
but the fewer than seq_len cut off at the ends, which differ from epoch to epoch). A window
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
  characters: int = 0  # of the text it was made from: losses per character compare vocabularies

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
  chars_path = cache_prefix + ".characters.txt"
  os.makedirs(os.path.dirname(tokens_path), exist_ok=True)
  with _file_lock(cache_prefix):
    if not (os.path.exists(tokens_path) and os.path.exists(starts_path)):
      encoded = (grain.MapDataset.source(records)
                 .map(lambda record: (tokenizer.encode(record["text"]), len(record["text"])))
                 .to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                    prefetch_buffer_size=64)))
      starts, n, characters = [], 0, 0
      bos = np.array([tokenizer.bos_id], dtype)
      tmp = f"{tokens_path}.{os.getpid()}.tmp"
      with open(tmp, "wb") as f:
        for ids, num_chars in encoded:
          starts.append(n)
          characters += num_chars
          f.write(bos.tobytes())
          f.write(ids.astype(dtype).tobytes())
          n += 1 + len(ids)
      np.save(f"{starts_path}.{os.getpid()}.tmp.npy", np.asarray(starts, np.int64))
      os.replace(f"{starts_path}.{os.getpid()}.tmp.npy", starts_path)
      with open(chars_path, "w", encoding="utf-8") as f:
        f.write(str(characters))
      os.replace(tmp, tokens_path)  # last: its presence marks a complete cache
  size = os.path.getsize(tokens_path) // np.dtype(dtype).itemsize
  tokens = (np.memmap(tokens_path, dtype=dtype, mode="r", shape=(size,)) if size
            else np.zeros((0,), dtype))
  with open(chars_path, encoding="utf-8") as f:
    characters = int(f.read())
  return TokenStream(tokens=tokens, doc_starts=np.load(starts_path), characters=characters)


def windows(stream, starts, seq_len, pad_id):
  """Packed examples at `starts` [B]: inputs, targets, weights, segment_ids, positions [B, L].

  Windows running past the stream's end are padded: pad tokens, weight 0, segment 0."""
  starts = np.asarray(starts, np.int64)
  n = len(stream.tokens)
  idx_BxL1 = starts[:, None] + np.arange(seq_len + 1)
  ids_BxL1 = np.where(idx_BxL1 < n, stream.tokens[np.minimum(idx_BxL1, n - 1)],
                      pad_id).astype(np.int32)
  t_BxL = idx_BxL1[:, :-1]
  valid_BxL = idx_BxL1[:, 1:] < n  # the target exists
  # Each position's document (index into doc_starts) and where that document starts, or the
  # window's start for the document the window cuts into.
  doc_BxL = np.searchsorted(stream.doc_starts, t_BxL, side="right") - 1
  doc_start_BxL = np.maximum(stream.doc_starts[np.maximum(doc_BxL, 0)], starts[:, None])
  return {"inputs": ids_BxL1[:, :-1], "targets": ids_BxL1[:, 1:],
          "weights": valid_BxL.astype(np.float32),
          "segment_ids": np.where(valid_BxL, doc_BxL - doc_BxL[:, :1] + 1, 0).astype(np.int32),
          "positions": np.where(valid_BxL, t_BxL - doc_start_BxL, 0).astype(np.int32)}


class StreamWindows:
  """Training windows of a TokenStream: `batch(indices)` holds the run's windows `indices`."""

  def __init__(self, stream, seq_len, seed, pad_id, split="train"):
    if len(stream) < seq_len + 1:
      raise UserError(f"config.data: the {split} split has {len(stream)} tokens, fewer than "
                      f"data.seq_len + 1 = {seq_len + 1}; use more text or a shorter seq_len")
    self.stream, self.seq_len, self.seed, self.pad_id = stream, seq_len, seed, pad_id
    self.per_epoch = (len(stream) - 1) // seq_len
    self._order = grain.MapDataset.range(self.per_epoch).shuffle(seed=seed).repeat(None)
    self._offsets = {}

  def offset(self, epoch):
    """Where epoch `epoch` starts cutting the stream: a fresh random phase every epoch."""
    if epoch not in self._offsets:
      slack = len(self.stream) - 1 - self.per_epoch * self.seq_len
      self._offsets[epoch] = int(np.random.default_rng([self.seed, epoch]).integers(0, slack + 1))
    return self._offsets[epoch]

  def start(self, i):
    return self.offset(i // self.per_epoch) + self._order[i] * self.seq_len

  def batch(self, indices):
    return windows(self.stream, [self.start(int(i)) for i in indices], self.seq_len,
                   self.pad_id)


def stack(examples):
  """One batch (a dict of [n, ...] arrays) from n examples (dicts of arrays)."""
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def rows(example_fn):
  """A batch function from a one-example function: stacks `example_fn(i)` over indices."""
  return lambda indices: stack([example_fn(int(i)) for i in indices])


def trim_to_bucket(batch, multiple):
  """Cuts a batch of padded example rows to its longest row (segment id > 0), rounded up to
  a multiple of `multiple`: short examples then cost short sequences, at one compilation per
  length. Seq2seq batches cut their source (source_*) and target sides each to its own."""
  out = dict(batch)
  for mask_key, is_side in (("segment_ids", lambda k: not k.startswith("source")),
                            ("source_segment_ids", lambda k: k.startswith("source"))):
    if mask_key not in batch:
      continue
    seq_len = batch[mask_key].shape[1]
    longest = int((batch[mask_key] > 0).sum(axis=1).max(initial=1))
    length = min(seq_len, -(-max(longest, 1) // multiple) * multiple)
    out.update({k: v[:, :length] for k, v in batch.items()
                if is_side(k) and v.ndim >= 2 and v.shape[1] == seq_len})
  return out


def host_rows(batch_size, process_index, process_count):
  if batch_size % process_count:
    raise UserError(f"config.train.batch_size: {batch_size} is not divisible by the "
                    f"{process_count} processes")
  per_host = batch_size // process_count
  return process_index * per_host, per_host


def train_batches(batch_fn, batch_size, process_index=0, process_count=1):
  """MapDataset: batch k = this process's rows of global examples [k*B, (k+1)*B).

  `batch_fn(indices)` returns the examples `indices` as a dict of stacked arrays."""
  first, per_host = host_rows(batch_size, process_index, process_count)
  return grain.MapDataset.range(sys.maxsize).map(
      lambda k: batch_fn(k * batch_size + first + np.arange(per_host)))


def eval_batches(num_examples, batch_fn, batch_size, process_index=0, process_count=1):
  """MapDataset over every example once, in order; rows past the end are all zeros."""
  first, per_host = host_rows(batch_size, process_index, process_count)
  num_batches = -(-num_examples // batch_size)

  def batch(k):
    ids = k * batch_size + first + np.arange(per_host)
    ids = ids[ids < num_examples]
    count = len(ids)
    real = batch_fn(ids if count else np.zeros(1, ids.dtype))  # example 0 gives the shapes
    return {key: np.concatenate([v[:count], np.zeros((per_host - count,) + v.shape[1:],
                                                     v.dtype)])
            for key, v in real.items()}

  return grain.MapDataset.range(num_batches).map(batch)


def iterator(dataset, num_threads=2, prefetch=8, state=None):
  """A prefetching iterator over a MapDataset of batches, optionally at a saved state."""
  it = iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                      prefetch_buffer_size=prefetch)))
  if state is not None:
    it.set_state(state)
  return it
