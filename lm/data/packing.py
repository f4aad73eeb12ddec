"""Encoded conversations packed into windows: several per row, none attending to another.

Each conversation of n tokens takes n - 1 positions of a row (inputs are its tokens but the
last, targets its tokens but the first, each target weighted as conversations.encode said).
`segment_ids` number the conversations of a row (1, 2, ...) and `positions` restart at each,
so a packed conversation's logits are those it has alone. Rows are filled greedily in order
(a conversation that does not fit starts the next row); the rest of a row is padding
(segment 0, weight 0).

Training visits the conversations in a fresh seeded order each epoch and packs that order;
a row is a pure function of (seed, row index), so a resumed run sees the rows it would have.
Evaluation packs a split once, in order: every conversation is scored exactly once.
"""

import threading

import numpy as np

from lm.errors import UserError


def fit(encoded, seq_len, overflow, kept_indices=None):
  """(conversations that fit a row of seq_len positions, how many were truncated, dropped).
  `overflow`: truncate (keep the first seq_len + 1 tokens) or drop. `kept_indices`: a list
  that gets the indices of the conversations kept."""
  kept, truncated, dropped = [], 0, 0
  for index, (ids, weights) in enumerate(encoded):
    cut = len(ids) - 1 > seq_len
    if cut and overflow == "truncate":
      ids, weights = ids[:seq_len + 1], weights[:seq_len + 1]
    if (cut and overflow == "drop") or len(ids) < 2 or not weights[1:].any():
      dropped += 1  # too long, or nothing left to learn (or score)
      continue
    truncated += cut
    kept.append((ids, weights))
    if kept_indices is not None:
      kept_indices.append(index)
  return kept, truncated, dropped


def pack(lengths, order, seq_len):
  """Rows of conversation indices: `order` filled greedily into rows of seq_len positions
  (a conversation of n tokens takes n - 1)."""
  rows, row, used = [], [], 0
  for i in order:
    need = int(lengths[i]) - 1
    if row and used + need > seq_len:
      rows.append(row)
      row, used = [], 0
    row.append(int(i))
    used += need
  if row:
    rows.append(row)
  return rows


def rows_to_batch(encoded, rows, seq_len, pad_id):
  """Host batch {inputs, targets, weights, segment_ids, positions} [B, L] of packed rows."""
  b = len(rows)
  batch = {"inputs": np.full((b, seq_len), pad_id, np.int32),
           "targets": np.full((b, seq_len), pad_id, np.int32),
           "weights": np.zeros((b, seq_len), np.float32),
           "segment_ids": np.zeros((b, seq_len), np.int32),
           "positions": np.zeros((b, seq_len), np.int32)}
  for r, row in enumerate(rows):
    at = 0
    for segment, i in enumerate(row, start=1):
      ids, weights = encoded[i]
      n = len(ids) - 1
      batch["inputs"][r, at:at + n] = ids[:-1]
      batch["targets"][r, at:at + n] = ids[1:]
      batch["weights"][r, at:at + n] = weights[1:]
      batch["segment_ids"][r, at:at + n] = segment
      batch["positions"][r, at:at + n] = np.arange(n)
      at += n
  return batch


class PackedTraining:
  """Training rows of packed conversations: `batch(indices)` holds the run's rows `indices`
  (row k of the whole run: epochs follow one another)."""

  def __init__(self, encoded, seq_len, seed, pad_id, order=None):
    """`order(epoch)`: the conversations an epoch visits, in order (default: each once, in
    a seeded shuffle; a mixture's weighted draws: lm/data/mixture.py)."""
    if not encoded:
      raise UserError("config.data: no training conversation has a token to learn")
    self.encoded, self.seq_len, self.seed, self.pad_id = encoded, seq_len, seed, pad_id
    self.order = order or (lambda epoch: np.random.default_rng([seed, epoch]).permutation(
        len(encoded)))
    self.lengths = np.asarray([len(ids) for ids, _ in encoded])
    self._epochs = []  # rows of each epoch packed so far
    self._starts = [0]  # the run's first row index of each epoch
    self._lock = threading.Lock()  # Grain's threads ask for rows concurrently

  def _epoch(self, epoch):
    with self._lock:
      return self._packed(epoch)

  def _packed(self, epoch):
    while len(self._epochs) <= epoch:
      e = len(self._epochs)
      self._epochs.append(pack(self.lengths, self.order(e), self.seq_len))
      self._starts.append(self._starts[-1] + len(self._epochs[-1]))
    return self._epochs[epoch]

  def row(self, index):
    epoch = 0
    while True:
      rows = self._epoch(epoch)
      if index < self._starts[epoch + 1]:
        return rows[index - self._starts[epoch]]
      epoch += 1

  @property
  def per_epoch(self):
    return len(self._epoch(0))

  def batch(self, indices):
    return rows_to_batch(self.encoded, [self.row(int(i)) for i in indices], self.seq_len,
                         self.pad_id)


def fit_pairs(pairs, seq_len, overflow):
  """(pairs whose two sequences both fit a row, truncated, dropped): packing.fit's rule on
  each side; a pair loses both sides if either goes."""
  kept, truncated, dropped = [], 0, 0
  for chosen, rejected in pairs:
    sides, cut = fit([chosen, rejected], seq_len, overflow)[0:2]
    if len(sides) < 2:
      dropped += 1
      continue
    truncated += bool(cut)
    kept.append(tuple(sides))
  return kept, truncated, dropped


def pair_rows(pairs, indices, seq_len, pad_id):
  """Host batch of preference pairs: chosen_* and rejected_* {inputs, targets, weights}
  [B, L], one sequence a row from position 0 (padding after it: weight 0)."""
  out = {}
  for side, name in enumerate(("chosen", "rejected")):
    rows = rows_to_batch([pairs[int(i)][side] for i in indices],
                         [[r] for r in range(len(indices))], seq_len, pad_id)
    out.update({f"{name}_{k}": rows[k] for k in ("inputs", "targets", "weights")})
  return out


class PairTraining:
  """Training rows of preference pairs: each epoch a fresh seeded order of the pairs."""

  def __init__(self, pairs, seq_len, seed, pad_id):
    if not pairs:
      raise UserError("config.data: no training pair has reply tokens to compare")
    self.pairs, self.seq_len, self.seed, self.pad_id = pairs, seq_len, seed, pad_id
    self._orders = {}
    self._lock = threading.Lock()

  def _pair(self, index):
    epoch, at = divmod(int(index), len(self.pairs))
    with self._lock:
      if epoch not in self._orders:
        self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(
            len(self.pairs))
      return int(self._orders[epoch][at])

  def batch(self, indices):
    return pair_rows(self.pairs, [self._pair(i) for i in indices], self.seq_len, self.pad_id)
