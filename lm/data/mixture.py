"""Task mixtures: several datasets in one chat run, each turned into conversations by a
prompt template in the experiment config, mixed by weight (FLAN-style).

    config.data.mixture = (
        {"path": ".../squad/new_wiki_v1.0.json", "reader": "squad", "weight": 2.0,
         "user": "{context}\\n\\nQuestion: {question}", "assistant": "{answer}"},
        {"path": ".../gsm_symbolic/train.jsonl", "reader": "jsonl", "weight": 1.0,
         "user": "{question}", "assistant": "{answer_cot}\\n#### {answer}"},
        {"path": "chats.jsonl"},   # reader chat: conversations as they are
    )

Readers: chat (lm/data/conversations.py's shapes), jsonl (one JSON object a line; its fields
fill the templates), squad (SQuAD v1.1 JSON: a record per question with context, question,
answer: the first reference answer, and id). `system`, optional: a system message template.
Each source is split into train / validation / test by data.validation_fraction and
test_fraction (a seeded shuffle). Training draws from the sources in proportion to their
weights: each epoch visits as many conversations as the sources hold together, each draw
the next one of a source chosen by weight (a source smaller than its share repeats, a larger
one is sampled), and the draws are packed as any chat data is. The proportions are logged.
"""

import json

import numpy as np

from lm.data import conversations
from lm.errors import ConfigError, UserError

READERS = ("chat", "jsonl", "squad")
KEYS = ("path", "weight", "reader", "user", "assistant", "system")


def check(mixture):
  """ConfigError for an entry of config.data.mixture that cannot be read."""
  for i, entry in enumerate(mixture):
    name = f"data.mixture[{i}]"
    if not isinstance(entry, dict):
      raise ConfigError(name, f"must be a dict with {', '.join(KEYS)}; got {entry!r}")
    unknown = sorted(set(entry) - set(KEYS))
    if unknown:
      raise ConfigError(name, f"unknown key {unknown[0]!r} (keys: {', '.join(KEYS)})")
    if not entry.get("path"):
      raise ConfigError(name, "needs a path")
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
      raise ConfigError(name, f"weight must be a number > 0, got {weight!r}")
    reader = entry.get("reader", "chat")
    if reader not in READERS:
      raise ConfigError(name, f"reader must be one of {', '.join(READERS)}; got {reader!r}")
    if reader != "chat" and not (entry.get("user") and entry.get("assistant")):
      raise ConfigError(name, f"reader {reader} needs user and assistant templates")


def _squad_records(path, data):
  try:
    articles = json.loads(data.decode("utf-8"))["data"]
  except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
    raise UserError(f"{path}: not a SQuAD v1.1 file (data/paragraphs/qas)") from None
  out = []
  for article in articles:
    for paragraph in article["paragraphs"]:
      for qa in paragraph["qas"]:
        if qa.get("answers"):
          out.append((len(out) + 1, {"id": qa["id"], "context": paragraph["context"],
                                     "question": qa["question"],
                                     "answer": qa["answers"][0]["text"]},
                      f"{path} question {qa['id']}"))
  return out


def conversations_of(entry, path, data):
  """[(number, messages)] of one source's file (`data`: its bytes)."""
  reader = entry.get("reader", "chat")
  if reader == "chat":
    return conversations.read_file(path, data)
  records = (_squad_records(path, data) if reader == "squad"
             else conversations._records(path, data))  # pylint: disable=protected-access
  out = []
  for number, record, where in records:
    if not isinstance(record, dict):
      raise UserError(f"{where}: a record is a JSON object")
    try:
      turns = ([{"role": "system", "content": entry["system"].format(**record)}]
               if entry.get("system") else [])
      turns += [{"role": "user", "content": entry["user"].format(**record)},
                {"role": "assistant", "content": entry["assistant"].format(**record)}]
    except KeyError as e:
      raise UserError(f"{where}: the mixture's template names {{{e.args[0]}}}, which the "
                      f"record lacks (it has {', '.join(sorted(record))})") from None
    out.append((number, turns))
  return out


def weighted_order(sizes, weights, seed, epoch):
  """An epoch's draws: (source, index) pairs as one array of global indices (sources'
  conversations numbered one after another), sum(sizes) of them, each draw's source chosen
  in proportion to `weights` and within it the next of a seeded shuffle (cycling)."""
  rng = np.random.default_rng([seed, epoch, 7])
  p = np.asarray(weights, np.float64)
  p = p / p.sum()
  picks = rng.choice(len(sizes), size=int(sum(sizes)), p=p)
  offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  order = np.empty(len(picks), np.int64)
  for s, size in enumerate(sizes):
    where = np.flatnonzero(picks == s)
    perm = rng.permutation(size)
    order[where] = offsets[s] + perm[np.arange(len(where)) % size]
  return order
