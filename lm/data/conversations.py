"""Conversations: JSON/JSONL records in the shapes people have, read into one form, and
encoded with a model's chat template into ids with a loss weight per token.

    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
    {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}   (ShareGPT)
    {"instruction": ..., "input": ..., "output": ...}                               (Alpaca)
    {"prompt": ..., "completion": ...}

all become [{"role": "system" | "user" | "assistant", "content": str}, ...].

`encode(messages, tokenizer, train_on)` renders the conversation with the tokenizer's chat
template and weighs the tokens the model should learn to write: every assistant turn's (the
default), the last one's, or everything. An assistant turn's tokens are those the template
adds when that turn is appended to the conversation before it with a generation prompt, up
to its last visible character: its content and its end-of-turn marker (which teaches the
model to stop), not the newline after it. That is what transformers'
`return_assistant_tokens_mask` gives for templates that mark assistant text with
`{% generation %}`, and it needs no such marks.
"""

import json

import numpy as np

from lm import chat_template
from lm.errors import UserError

ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant",
                   "bard": "assistant", "model": "assistant", "system": "system"}
TRAIN_ON = ("all_assistant", "last_assistant", "everything")


def messages_of(record, where):
  """The conversation of one parsed JSON record (any of the shapes above); `where` names
  it (file and line) in errors."""
  if not isinstance(record, dict):
    raise UserError(f"{where}: a conversation record is a JSON object, not "
                    f"{type(record).__name__}")
  if "messages" in record:
    turns = [_turn(m, "role", "content", where, ROLES) for m in _list(record, "messages", where)]
  elif "conversations" in record:
    turns = [_turn(m, "from", "value", where, _SHAREGPT_ROLES)
             for m in _list(record, "conversations", where)]
  elif "instruction" in record and "output" in record:
    prompt = _text(record, "instruction", where)
    if record.get("input"):
      prompt += "\n\n" + _text(record, "input", where)
    turns = [{"role": "user", "content": prompt},
             {"role": "assistant", "content": _text(record, "output", where)}]
  elif "prompt" in record and "completion" in record:
    turns = [{"role": "user", "content": _text(record, "prompt", where)},
             {"role": "assistant", "content": _text(record, "completion", where)}]
  else:
    raise UserError(f"{where}: not a conversation (keys {', '.join(sorted(record)) or 'none'}; "
                    "lm reads messages, conversations, instruction/output or "
                    "prompt/completion)")
  if not any(t["role"] == "assistant" for t in turns):
    raise UserError(f"{where}: the conversation has no assistant turn to learn from")
  return turns


def _list(record, key, where):
  value = record[key]
  if not isinstance(value, list) or not value:
    raise UserError(f"{where}: {key} must be a non-empty list of turns")
  return value


def _text(record, key, where):
  value = record[key]
  if not isinstance(value, str):
    raise UserError(f"{where}: {key} must be a string, not {type(value).__name__}")
  return value


def _turn(message, role_key, content_key, where, roles):
  if not isinstance(message, dict) or role_key not in message or content_key not in message:
    raise UserError(f"{where}: a turn needs {role_key!r} and {content_key!r}")
  role = message[role_key]
  known = roles if isinstance(roles, dict) else {r: r for r in roles}
  if role not in known:
    raise UserError(f"{where}: unknown role {role!r} (lm knows {', '.join(known)})")
  return {"role": known[role], "content": _text(message, content_key, where)}


def read_file(path, data):
  """[(line number, messages)] of a .jsonl file (one record a line) or a .json file (a list
  of records, numbered from 1); `data` is the file's bytes."""
  return [(number, messages_of(record, where)) for number, record, where in
          _records(path, data)]


def encode(messages, tokenizer, train_on="all_assistant", template=None):
  """(ids [N] int32, weights [N] float32): the rendered conversation's ids as the tokenizer
  reads a rendered chat, and 1 on the tokens to learn (`train_on`, TRAIN_ON). `template`:
  default the tokenizer's own."""
  template = template or tokenizer.chat_template
  specials = tokenizer.special_tokens()
  render = lambda turns, prompt=False: chat_template.render(
      template, turns, add_generation_prompt=prompt, special_tokens=specials)
  ids = tokenizer.chat_ids(render(messages))
  weights = np.zeros(len(ids), np.float32)
  if train_on == "everything":
    weights[:] = 1.0
    return np.asarray(ids, np.int32), weights
  assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
  if train_on == "last_assistant":
    assistant = assistant[-1:]
  for i in assistant:
    start = tokenizer.chat_ids(render(messages[:i], prompt=True))
    # The turn up to its last visible character: its end-of-turn marker, not the newline
    # some templates put after it (what {% generation %} blocks mark, too).
    end = tokenizer.chat_ids(render(messages[:i + 1]).rstrip())
    if ids[:len(start)] != start or ids[:len(end)] != end:
      raise UserError("the chat template does not render a conversation as the "
                      "conversation before each turn plus that turn (its tokens cannot be "
                      "told apart); set data.train_on=everything")
    weights[len(start):len(end)] = 1.0
  return np.asarray(ids, np.int32), weights


def pair_of(record, where):
  """(prompt turns, chosen reply, rejected reply) of a preference record: {prompt, chosen,
  rejected} with a prompt text (TruthfulQA's pairs) or turns, or ShareGPT's {conversations,
  chosen: {from, value}, rejected: {from, value}}."""
  if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
    raise UserError(f"{where}: a preference pair needs chosen and rejected (and prompt or "
                    "conversations)")
  if "conversations" in record:
    turns = [_turn(m, "from", "value", where, _SHAREGPT_ROLES)
             for m in _list(record, "conversations", where)]
    reply = lambda key: (_turn(record[key], "from", "value", where, _SHAREGPT_ROLES)["content"]
                         if isinstance(record[key], dict) else _text(record, key, where))
  elif "prompt" in record:
    turns = ([{"role": "user", "content": _text(record, "prompt", where)}]
             if not isinstance(record["prompt"], list) else
             [_turn(m, "role", "content", where, ROLES) for m in record["prompt"]])
    reply = lambda key: _text(record, key, where)
  else:
    raise UserError(f"{where}: a preference pair needs a prompt or conversations")
  chosen, rejected = reply("chosen"), reply("rejected")
  if chosen == rejected:
    raise UserError(f"{where}: chosen equals rejected")
  if turns[-1]["role"] == "assistant":
    raise UserError(f"{where}: the prompt ends with an assistant turn; the replies follow it")
  return turns, chosen, rejected


def read_pairs(path, data):
  """[(line number, (turns, chosen, rejected))] of a .jsonl or .json file of pairs."""
  return [(number, pair_of(record, where)) for number, record, where in _records(path, data)]


def _records(path, data):
  text = data.decode("utf-8", errors="strict")
  if path.endswith(".json"):
    try:
      records = json.loads(text)
    except json.JSONDecodeError as e:
      raise UserError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(records, list):
      raise UserError(f"{path}: a .json file of records holds a list of them")
    return [(i, r, f"{path} record {i}") for i, r in enumerate(records, 1)]
  out = []
  for number, line in enumerate(text.split("\n"), 1):
    if line.strip():
      try:
        out.append((number, json.loads(line), f"{path} line {number}"))
      except json.JSONDecodeError as e:
        raise UserError(f"{path} line {number}: not valid JSON ({e.msg})") from None
  return out


def encode_pair(turns, chosen, rejected, tokenizer):
  """Two (ids, weights): the prompt followed by each reply, weight 1 on the reply's tokens."""
  return tuple(encode(turns + [{"role": "assistant", "content": reply}], tokenizer,
                      "last_assistant") for reply in (chosen, rejected))
