"""How lm.serve answers: the engine's events of one request (lm/engine.py) as one OpenAI
response or as server-sent events, for the completions API (Reply) and the chat API
(ChatReply), with the log-probabilities and echoed prompts a request asked for."""

import json

from lm import openai_api
from lm.openai_api import ApiError


class Reply:
  """The engine's events of one request, as one response or as server-sent events. Either
  way its jobs are cancelled at the end (a client that went away stops its rows). Token
  log-probabilities (requested ones) go with the text that follows them."""

  def __init__(self, server, completion_id, events, jobs, total, logprobs=False, echo=None):
    """`echo`: per choice (prompt text, its token entries or None): sent first."""
    self.server, self.id, self.events, self.jobs, self.total = (server, completion_id, events,
                                                                jobs, total)
    self.logprobs, self.echo = logprobs, echo
    # Per choice: token entries not sent yet (an echoed prompt's first).
    self.entries = [list(echo[i][1] or []) if echo else [] for i in range(total)]
    self.sent_text = [0] * total  # per choice: characters sent (the legacy text_offset)

  def _completion(self, choices, usage=None):
    return openai_api.completion(self.id, self.server.model_name, choices, usage)

  def _token_text(self, token):
    return self.server.loaded.tokenizer.decode([token])

  def _take(self, index):
    """The log-probabilities object of a choice's entries so far (None unless asked)."""
    if not self.logprobs:
      return None
    entries, self.entries[index] = self.entries[index], []
    return self._format(entries, index)

  def _format(self, entries, index):
    out = openai_api.completion_logprobs(entries, self._token_text, self.sent_text[index])
    self.sent_text[index] += sum(len(t) for t in out["tokens"])
    return out

  async def collect(self, prompt_tokens):
    texts = [self.echo[i][0] if self.echo else "" for i in range(self.total)]
    reasons, completion_tokens = [None] * self.total, 0
    finished = 0
    try:
      while finished < self.total:
        event = await self.events.get()
        if event[0] == "error":
          raise ApiError(500, event[1], kind="server_error")
        if event[0] == "logprobs":
          self.entries[event[1]].append(event[2])
        elif event[0] == "delta":
          texts[event[1]] += event[2]
        else:
          reasons[event[1]] = event[2]
          completion_tokens += event[3]
          finished += 1
    finally:
      self._cancel()
    return self._whole(texts, reasons, [self._take(i) for i in range(self.total)], {
        "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens})

  def _whole(self, texts, reasons, logprobs, usage):
    choices = [{**openai_api.choice(i, texts[i], reasons[i]), "logprobs": logprobs[i]}
               for i in range(self.total)]
    return self._completion(choices, usage=usage)

  async def stream(self, prompt_tokens=0, usage=False):
    finished, completion_tokens = 0, 0
    try:
      for chunk in self._opening():
        yield _sse(chunk)
      while finished < self.total:
        event = await self.events.get()
        if event[0] == "error":
          self.server.metrics.errors.labels("internal").inc()
          yield _sse(openai_api.error_body(event[1], "server_error"))
          break
        if event[0] == "logprobs":
          self.entries[event[1]].append(event[2])
        elif event[0] == "delta":
          yield _sse(self._delta(event[1], event[2], self._take(event[1])))
        else:
          finished += 1
          completion_tokens += event[3]
          yield _sse(self._finish(event[1], event[2], self._take(event[1])))
      if usage:
        total = prompt_tokens * self.total
        yield _sse(self._usage({"prompt_tokens": total, "completion_tokens": completion_tokens,
                                "total_tokens": total + completion_tokens}))
      yield "data: [DONE]\n\n"
    finally:
      self._cancel()

  def _opening(self):
    if not self.echo:
      return []
    return [self._delta(i, self.echo[i][0], self._take(i)) for i in range(self.total)]

  def _delta(self, index, text, logprobs=None):
    return self._completion([{**openai_api.choice(index, text, None), "logprobs": logprobs}])

  def _finish(self, index, reason, logprobs=None):
    return self._completion([{**openai_api.choice(index, "", reason), "logprobs": logprobs}])

  def _usage(self, usage):
    return self._completion([], usage)

  def _cancel(self):
    for job in self.jobs:
      job.cancelled = True


class ChatReply(Reply):
  """The same events as chat.completion objects and chat.completion.chunk deltas."""

  def _format(self, entries, index):
    return openai_api.chat_logprobs(entries, self._token_text)

  def _whole(self, texts, reasons, logprobs, usage):
    out = openai_api.chat_completion(self.id, self.server.model_name,
                                     list(zip(texts, reasons)), usage)
    for c, lp in zip(out["choices"], logprobs):
      c["logprobs"] = lp
    return out

  def _opening(self):
    return [openai_api.chat_chunk(self.id, self.server.model_name, i,
                                  {"role": "assistant", "content": ""})
            for i in range(self.total)]

  def _delta(self, index, text, logprobs=None):
    out = openai_api.chat_chunk(self.id, self.server.model_name, index, {"content": text})
    out["choices"][0]["logprobs"] = logprobs
    return out

  def _finish(self, index, reason, logprobs=None):
    out = openai_api.chat_chunk(self.id, self.server.model_name, index, {}, reason)
    out["choices"][0]["logprobs"] = logprobs
    return out

  def _usage(self, usage):
    return openai_api.chat_chunk(self.id, self.server.model_name, usage=usage)


def _sse(payload):
  return f"data: {json.dumps(payload)}\n\n"
