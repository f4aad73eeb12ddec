"""Byte- and character-level tokenizers behind one interface.

A tokenizer serialises to a small JSON-able dict (`to_dict`), stored in every checkpoint, so
a restored run decodes with exactly the vocabulary it was trained with (`from_dict`).
"""

import numpy as np

from lm.errors import UserError


class ByteTokenizer:
  """UTF-8 bytes; ids 0..255. Nothing to train; any text round-trips."""

  kind = "byte"
  vocab_size = 256

  def encode(self, text):
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def decode(self, ids):
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

  def to_dict(self):
    return {"kind": self.kind}


class CharTokenizer:
  """One id per character seen in the training text, plus a final `unk` id for the rest."""

  kind = "char"

  def __init__(self, chars):
    self.chars = "".join(chars)
    if len(set(self.chars)) != len(self.chars):
      raise UserError("char tokenizer: its character list has duplicates")
    self._index = {c: i for i, c in enumerate(self.chars)}
    self.unk_id = len(self.chars)
    self.vocab_size = len(self.chars) + 1
    # Fast path for texts whose characters all lie in the Basic Multilingual Plane.
    self._table = np.full(0x10000, self.unk_id, dtype=np.int32)
    for c, i in self._index.items():
      if ord(c) < 0x10000:
        self._table[ord(c)] = i

  @classmethod
  def train(cls, text):
    return cls(sorted(set(text)))

  def encode(self, text):
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    if codes.size and codes.max() >= 0x10000:
      return np.array([self._index.get(c, self.unk_id) for c in text], dtype=np.int32)
    return self._table[codes]

  def decode(self, ids):
    return "".join(self.chars[i] if 0 <= i < self.unk_id else "\ufffd"
                   for i in (int(j) for j in ids))

  def to_dict(self):
    return {"kind": self.kind, "chars": self.chars}


def from_dict(spec):
  if spec.get("kind") == "byte":
    return ByteTokenizer()
  if spec.get("kind") == "char":
    return CharTokenizer(spec["chars"])
  raise UserError(f"unknown tokenizer in checkpoint metadata: {spec.get('kind')!r}")


def train_tokenizer(kind, train_text):
  if kind == "byte":
    return ByteTokenizer()
  if kind == "char":
    return CharTokenizer.train(train_text)
  raise UserError(f"config.data.tokenizer: unknown tokenizer {kind!r}")
