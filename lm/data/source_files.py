"""Local source files as the dataset builders read them: bytes (gzip undone), checksums,
a folder's split files by name, and a seeded split of one file's records.

For a folder of split files, a name starting with train goes to train, val/valid/dev to
validation and test to test.
"""

import gzip
import hashlib
import os
import re

from lm.errors import UserError

SPLITS = ("train", "validation", "test")
SPLIT_PREFIXES = (("train", "train"), ("validation", "val"), ("validation", "dev"),
                   ("test", "test"))


def md5(data):
  return hashlib.md5(data).hexdigest()


def read_bytes(path, field="config.data.path"):
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise UserError(f"{field}: cannot read {path}: {e.strerror}") from None
  if path.endswith(".gz"):
    try:
      data = gzip.decompress(data)
    except (OSError, EOFError) as e:
      raise UserError(f"{field}: {path} is not a valid gzip file ({e})") from None
  return data


def split_files(folder, pattern):
  """{split: path} for files in `folder` whose names match `pattern` (group 1: the prefix)."""
  if not os.path.isdir(folder):
    raise UserError(f"config.data.path: {folder} is not a folder" if os.path.exists(folder)
                    else f"config.data.path: {folder} does not exist")
  found = {}
  for name in sorted(os.listdir(folder)):
    m = re.fullmatch(pattern, name)
    if not m:
      continue
    prefix = m.group(1).lower()
    for split, start in SPLIT_PREFIXES:
      if prefix.startswith(start):
        if split in found:
          raise UserError(f"config.data.path: {folder} has two {split} files, "
                          f"{os.path.basename(found[split])} and {name}; keep one")
        found[split] = os.path.join(folder, name)
        break
  for split in ("train", "validation"):
    if split not in found:
      raise UserError(f"config.data.path: {folder} has no {split} file matching {pattern} "
                      f"(names start with {'/'.join(p for s, p in SPLIT_PREFIXES if s == split)})")
  return found


def seeded_split(items, validation_fraction, test_fraction, seed, where):
  """{split: items} of one source's items by a seeded shuffle: validation_fraction of them
  (at least one) to validation, test_fraction to test, the rest to train; each split keeps
  the items' order. `where` names the source in the error for too few items."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  order = np.random.default_rng(seed).permutation(len(items))
  n_val = max(1, round(len(items) * validation_fraction))
  n_test = round(len(items) * test_fraction)
  if len(items) - n_val - n_test < 1:
    raise UserError(f"{where} has {len(items)} records, too few to split into train and "
                    "validation")
  parts = {"validation": order[:n_val], "test": order[n_val:n_val + n_test],
           "train": order[n_val + n_test:]}
  return {split: [items[i] for i in sorted(idx)] for split, idx in parts.items() if len(idx)}
