"""Chat and preference files, and task mixtures, read into the examples the dataset builders
(lm/data/builders.py) write.

    chat        conversations (lm/data/conversations.py's shapes) -> {"messages"}
    preference  pairs of replies to a prompt -> {"prompt", "chosen", "rejected"}
    mixture     config.data.mixture's sources (lm/data/mixture.py) -> {"messages", "source"}

`data.path` is a folder of `<split>.jsonl` / `.json` files, or one file whose records are
split by validation_fraction / test_fraction (a seeded shuffle); each mixture source is
split so. Each reader returns (source description, checksums, {split: [(key, record)]}, ()).
"""

import json
import os

from lm.data import conversations, mixture, source_files
from lm.errors import UserError


def _dump(x):
  return json.dumps(x, ensure_ascii=False)


def chat_examples(data_config):
  return _json_examples(data_config, conversations.read_file,
                        lambda messages: {"messages": _dump(messages)})


def preference_examples(data_config):
  return _json_examples(data_config, conversations.read_pairs,
                        lambda pair: {"prompt": _dump(pair[0]), "chosen": pair[1],
                                      "rejected": pair[2]})


def _json_examples(data_config, read, record):
  """`read(path, bytes)` -> [(number, item)] for each file; `record(item)` -> its record."""
  path = os.path.abspath(data_config.path)
  if os.path.isdir(path):
    files = source_files.split_files(path, r"(.+)\.(?:jsonl|json)")
  elif os.path.isfile(path):
    files = {"all": path}
  else:
    raise UserError(f"config.data.path: {path} does not exist")
  checksums, items = {}, {}
  for split, file in files.items():
    data = source_files.read_bytes(file)
    checksums[file] = source_files.md5(data)
    try:
      items[split] = read(file, data)
    except UnicodeDecodeError as e:
      raise UserError(f"config.data.path: {file} is not UTF-8 text ({e.reason} at byte "
                      f"{e.start})") from None
    if not items[split]:
      raise UserError(f"config.data.path: {file} holds no records")
  if "all" in items:  # one file: a seeded split by the fractions
    items = source_files.seeded_split(items["all"], data_config.validation_fraction,
                                      data_config.test_fraction, 0, f"config.data.path: {path}")
  examples = {split: [(f"{split}/{number}", record(item)) for number, item in parts]
              for split, parts in items.items()}
  return path, checksums, examples, ()


def mixture_examples(data_config):
  """data.mixture's sources, each read into conversations by its reader and templates and
  split by the fractions. Records: {"messages", "source"}."""
  checksums, examples = {}, {}
  for source, entry in enumerate(data_config.mixture):
    path = os.path.abspath(os.path.expanduser(entry["path"]))
    data = source_files.read_bytes(path, f"config.data.mixture[{source}].path")
    checksums[path] = source_files.md5(data)
    items = mixture.conversations_of(entry, path, data)
    parts = source_files.seeded_split(items, data_config.validation_fraction,
                                      data_config.test_fraction, [0, source],
                                      f"config.data.mixture[{source}]: {path}")
    for split, part in parts.items():
      examples.setdefault(split, []).extend(
          (f"{split}/{source}/{number}", {"messages": _dump(messages), "source": source})
          for number, messages in part)
  return ("a mixture of " + ", ".join(e["path"] for e in data_config.mixture), checksums,
          examples, ())
