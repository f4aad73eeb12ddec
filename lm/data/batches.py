"""Fixed-length windows over a token stream, as batches of numpy arrays.

Every batch is a dict of [B, L] arrays: `inputs`, `targets` (inputs shifted by one) and
`weights` (1.0 where a target counts, 0.0 on padding).

Training batches are a pure function of (seed, step): window starts are drawn from a
generator seeded by both, so a resumed run sees exactly the batches an uninterrupted run
sees, with no iterator state to save. Evaluation walks the split in non-overlapping windows
so that every token after the first is predicted exactly once.
"""

import numpy as np

from lm.errors import UserError


def _check_length(tokens, seq_len, split):
  if len(tokens) < seq_len + 1:
    raise UserError(f"config.data: the {split} split has {len(tokens)} tokens, fewer than "
                    f"data.seq_len + 1 = {seq_len + 1}; use more text or a shorter seq_len")


class TrainBatches:
  """Random windows: `batch(step)` is the same for the same (seed, step), on every host."""

  def __init__(self, tokens, batch_size, seq_len, seed):
    _check_length(tokens, seq_len, "train")
    self.tokens = np.asarray(tokens, dtype=np.int32)
    self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed

  def batch(self, step, rows=None):
    """The global batch for `step`, or only its `rows` (a slice) for one host's share."""
    rng = np.random.default_rng([self.seed, step])
    starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
    if rows is not None:
      starts = starts[rows]
    idx_BxL1 = starts[:, None] + np.arange(self.seq_len + 1)
    window_BxL1 = self.tokens[idx_BxL1]
    return {"inputs": window_BxL1[:, :-1], "targets": window_BxL1[:, 1:],
            "weights": np.ones(window_BxL1[:, 1:].shape, np.float32)}


class EvalBatches:
  """Consecutive windows of seq_len + 1 tokens that overlap by one; the tail is padded."""

  def __init__(self, tokens, batch_size, seq_len, split):
    _check_length(tokens, seq_len, split)
    self.tokens = np.asarray(tokens, dtype=np.int32)
    self.batch_size, self.seq_len = batch_size, seq_len
    self.num_windows = -(-(len(self.tokens) - 1) // seq_len)
    self.num_batches = -(-self.num_windows // batch_size)
    self.num_targets = len(self.tokens) - 1

  def batch(self, index, rows=None):
    b, length = self.batch_size, self.seq_len
    window = np.arange(index * b, (index + 1) * b)
    idx_BxL1 = window[:, None] * length + np.arange(length + 1)
    valid_BxL1 = (idx_BxL1 < len(self.tokens)) & (window[:, None] < self.num_windows)
    window_BxL1 = np.where(valid_BxL1, self.tokens[np.minimum(idx_BxL1, len(self.tokens) - 1)],
                           0).astype(np.int32)
    batch = {"inputs": window_BxL1[:, :-1], "targets": window_BxL1[:, 1:],
             "weights": valid_BxL1[:, 1:].astype(np.float32)}
    if rows is not None:
      batch = {k: v[rows] for k, v in batch.items()}
    return batch

  def __iter__(self):
    return (self.batch(i) for i in range(self.num_batches))
