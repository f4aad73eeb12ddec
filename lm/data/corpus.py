"""Raw text corpora and their train/validation/test split.

Sources:
  * `data.path`: a local UTF-8 text file, or a folder of them (searched recursively).
  * `data.name = "python_stdlib"`: the top-level `*.py` modules of the running Python's
    standard library. Real text that every Python install carries, so the default
    experiment needs no download.
  * `data.name = "tiny_shakespeare"`: downloaded once into the cache (needs internet) and
    verified by checksum.

A single document is split by characters (train first, then validation, then test, as
nanoGPT does); several documents are split by document, each assigned by a hash of its name,
so adding a file never moves the others between splits.
"""

import dataclasses
import glob
import hashlib
import os
import sysconfig
import urllib.request

from lm.errors import UserError

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt")
TINY_SHAKESPEARE_MD5 = "6fb458f1232090904fb40fe944165e91"
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".text")


@dataclasses.dataclass
class Corpus:
  train: str
  validation: str
  test: str
  source: str  # where the text came from, for logs
  fingerprint: str  # md5 of the raw text; a resumed run checks it has not changed


def cache_dir():
  return os.environ.get("LM_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "lm"))


def _read_text(path):
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except UnicodeDecodeError as e:
    raise UserError(f"config.data.path: {path} is not UTF-8 text ({e.reason} at byte "
                    f"{e.start})") from None
  except OSError as e:
    raise UserError(f"config.data.path: cannot read {path}: {e.strerror}") from None


def _local_documents(path):
  if os.path.isfile(path):
    return [(os.path.basename(path), _read_text(path))]
  if os.path.isdir(path):
    files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                   if os.path.isfile(f) and f.endswith(TEXT_SUFFIXES))
    if not files:
      raise UserError(f"config.data.path: folder {path} holds no text files "
                      f"({', '.join(TEXT_SUFFIXES)})")
    return [(os.path.relpath(f, path), _read_text(f)) for f in files]
  raise UserError(f"config.data.path: {path} does not exist")


def python_stdlib_documents():
  root = sysconfig.get_paths()["stdlib"]
  files = sorted(glob.glob(os.path.join(root, "*.py")))
  if not files:
    raise UserError(f"config.data.name: no Python standard library sources under {root}")
  return [(os.path.basename(f), _read_text(f)) for f in files]


def download(url, md5, filename):
  """Fetches `url` into the cache once, verifying its md5; returns the local path."""
  path = os.path.join(cache_dir(), filename)
  if os.path.exists(path) and _md5_file(path) == md5:
    return path
  os.makedirs(cache_dir(), exist_ok=True)
  tmp = f"{path}.{os.getpid()}.tmp"
  try:
    with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
      f.write(response.read())
  except OSError as e:
    raise UserError(f"config.data.name: cannot download {url} ({e}); offline, point "
                    "config.data.path at a local copy") from None
  if _md5_file(tmp) != md5:
    os.remove(tmp)
    raise UserError(f"config.data.name: download of {url} has the wrong checksum")
  os.replace(tmp, path)
  return path


def _md5_file(path):
  with open(path, "rb") as f:
    return hashlib.md5(f.read()).hexdigest()


def _split_by_characters(text, validation_fraction, test_fraction):
  """Train first, test last, validation between; a zero fraction gives an empty split."""
  n = len(text)
  n_train = int(n * (1.0 - validation_fraction - test_fraction))
  n_test = int(n * test_fraction)
  return text[:n_train], text[n_train:n - n_test], text[n - n_test:]


def _split_by_document(documents, validation_fraction, test_fraction):
  splits = {"train": [], "validation": [], "test": []}
  for name, text in documents:
    u = int(hashlib.md5(name.encode("utf-8")).hexdigest()[:8], 16) / 2**32
    if u < validation_fraction:
      splits["validation"].append(text)
    elif u < validation_fraction + test_fraction:
      splits["test"].append(text)
    else:
      splits["train"].append(text)
  return tuple("\n".join(splits[k]) for k in ("train", "validation", "test"))


def load_corpus(data_config):
  """Reads the corpus named by config.data and splits it."""
  if data_config.path:
    source = os.path.abspath(data_config.path)
    documents = _local_documents(data_config.path)
  elif data_config.name == "python_stdlib":
    source = sysconfig.get_paths()["stdlib"]
    documents = python_stdlib_documents()
  elif data_config.name == "tiny_shakespeare":
    source = download(TINY_SHAKESPEARE_URL, TINY_SHAKESPEARE_MD5, "tiny_shakespeare.txt")
    documents = _local_documents(source)
  else:
    raise UserError(f"config.data.name: unknown corpus {data_config.name!r}")

  digest = hashlib.md5()
  for name, text in documents:
    digest.update(name.encode("utf-8") + b"\0" + text.encode("utf-8") + b"\0")
  if len(documents) == 1:
    parts = _split_by_characters(documents[0][1], data_config.validation_fraction,
                                 data_config.test_fraction)
  else:
    parts = _split_by_document(documents, data_config.validation_fraction,
                               data_config.test_fraction)
  return Corpus(*parts, source=source, fingerprint=digest.hexdigest())
