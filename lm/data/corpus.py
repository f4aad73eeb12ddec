"""Raw text documents and their train/validation/test split (read by lm/data/builders.py).

Sources:
  * `data.path`: a local UTF-8 text file, or a folder of them (searched recursively).
  * `data.name = "python_stdlib"`: the top-level `*.py` modules of the running Python's
    standard library. Real text that every Python install carries, so the default
    experiment needs no download.

A single document is split by characters (train first, then validation, then test, as
nanoGPT does); several documents are split by document, each assigned by a hash of its name,
so adding a file never moves the others between splits.
"""

import glob
import hashlib
import os
import sysconfig

from lm.errors import UserError

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".text")


def cache_dir():
  return os.environ.get("LM_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "lm"))


def _read_text(path):
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise UserError(f"config.data.path: cannot read {path}: {e.strerror}") from None
  return decode_utf8(data, path)


def decode_utf8(data, path):
  """`data` as text, or an error naming the file and line of the first invalid byte."""
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b"\n") + 1
    raise UserError(f"config.data.path: {path} line {line} is not UTF-8 text ({e.reason} at "
                    f"byte {e.start})") from None


def local_documents(path):
  """[(name, text)] of a file or of the text files under a folder (empty ones skipped)."""
  if os.path.isfile(path):
    text = _read_text(path)
    if not text.strip():
      raise UserError(f"config.data.path: {path} is empty")
    return [(os.path.basename(path), text)]
  if os.path.isdir(path):
    files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                   if os.path.isfile(f) and f.endswith(TEXT_SUFFIXES))
    documents = [(os.path.relpath(f, path), _read_text(f)) for f in files]
    documents = [(name, text) for name, text in documents if text.strip()]
    if not documents:
      raise UserError(f"config.data.path: folder {path} holds no non-empty text files "
                      f"({', '.join(TEXT_SUFFIXES)})")
    return documents
  raise UserError(f"config.data.path: {path} does not exist")


def python_stdlib_documents():
  root = sysconfig.get_paths()["stdlib"]
  files = sorted(glob.glob(os.path.join(root, "*.py")))
  if not files:
    raise UserError(f"config.data.name: no Python standard library sources under {root}")
  return [(os.path.basename(f), _read_text(f)) for f in files]


def split_documents(documents, validation_fraction, test_fraction):
  """{split: [(name, text)]}. One document is cut by characters: train first, validation
  next, test last (a zero fraction gives an empty split). Several are assigned whole, each by
  a hash of its name, so adding a file never moves the others between splits."""
  splits = {"train": [], "validation": [], "test": []}
  if len(documents) == 1:
    name, text = documents[0]
    n = len(text)
    n_train = int(n * (1.0 - validation_fraction - test_fraction))
    n_test = int(n * test_fraction)
    for split, part in (("train", text[:n_train]), ("validation", text[n_train:n - n_test]),
                        ("test", text[n - n_test:])):
      splits[split].append((name, part))
    return splits
  for name, text in documents:
    u = int(hashlib.md5(name.encode("utf-8")).hexdigest()[:8], 16) / 2**32
    if u < validation_fraction:
      splits["validation"].append((name, text))
    elif u < validation_fraction + test_fraction:
      splits["test"].append((name, text))
    else:
      splits["train"].append((name, text))
  return splits
