"""OpenAI's completions and chat completions APIs as lm's server speaks them: the request schema, its checks beyond
the schema, and the shapes of responses and errors. No HTTP and no model here.

    body = CompletionRequest(**json)                    # pydantic: types, ranges, no extras
    prompts, stop = check_completion(body, name, queue_limit)   # raises ApiError
    messages, stop, max_tokens = check_chat(ChatRequest(**json), name, queue_limit)
    check_context(encoded_prompts, body.max_tokens, context)    # raises ApiError

An ApiError carries OpenAI's error shape ({"error": {"message", "type", "param", "code"}})
and its HTTP status; lm/serve.py answers it.
"""

import time
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 16
MAX_STOP = 4


class _Sampled(BaseModel):
  """What both APIs' requests share: the model, sampling, stop strings and streaming."""
  model_config = ConfigDict(extra="forbid", strict=True)
  model: str
  temperature: float = Field(1.0, ge=0.0, le=2.0)
  top_p: float = Field(1.0, gt=0.0, le=1.0)
  n: int = Field(1, ge=1, le=MAX_N)
  stop: Optional[Union[str, list[str]]] = None
  seed: Optional[int] = None
  stream: bool = False
  top_k: int = Field(0, ge=0)
  repetition_penalty: float = Field(1.0, gt=0.0)
  user: Optional[str] = None


class CompletionRequest(_Sampled):
  prompt: Union[str, list[str]]
  max_tokens: int = Field(16, ge=0)  # 0 with echo: the prompt's log-probabilities only
  echo: bool = False
  logprobs: Optional[int] = Field(None, ge=0, le=5)  # the legacy API: k alternatives


ROLES = ("system", "user", "assistant")


class Message(BaseModel):
  model_config = ConfigDict(extra="forbid", strict=True)
  role: str
  content: Optional[Union[str, list[dict]]] = None
  name: Optional[str] = None


class StreamOptions(BaseModel):
  model_config = ConfigDict(extra="forbid", strict=True)
  include_usage: bool = False


class ChatRequest(_Sampled):
  messages: list[Message]
  max_tokens: Optional[int] = Field(None, ge=1)
  max_completion_tokens: Optional[int] = Field(None, ge=1)
  stream_options: Optional[StreamOptions] = None
  logprobs: Optional[bool] = None
  top_logprobs: Optional[int] = Field(None, ge=0, le=20)


class ApiError(Exception):
  """A request the server refuses: status, OpenAI's error type, message, param, code."""

  def __init__(self, status, message, kind="invalid_request_error", param=None, code=None):
    super().__init__(message)
    self.status, self.message, self.kind, self.param, self.code = (status, message, kind,
                                                                   param, code)

  def body(self):
    return error_body(self.message, self.kind, self.param, self.code)


def error_body(message, kind="invalid_request_error", param=None, code=None):
  return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def validation_error(errors):
  """The ApiError of pydantic's (FastAPI's) first validation error of a request body."""
  first = errors[0] if errors else {}
  where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
  if first.get("type") == "json_invalid":
    return ApiError(400, f"the body is not valid JSON: {first.get('msg', '')}",
                    code="invalid_json")
  if first.get("type") == "extra_forbidden":
    message = f"unknown or unsupported field {where!r}"
  else:
    message = f"{where or 'body'}: {first.get('msg', 'invalid')}"
    if "input" in first and not isinstance(first["input"], (dict, list)):
      message += f" (got {first['input']!r})"
  return ApiError(400, message, param=where or None)


def check_completion(body, model_name, queue_limit):
  """(prompts, stop strings) of a completion request, after the checks pydantic cannot
  make: the model's name, at least one prompt, the stop list, the number of completions."""
  _check_model(body, model_name)
  prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
  stop = _stops(body)
  if not prompts:
    raise ApiError(400, "prompt: give at least one prompt", param="prompt")
  if body.max_tokens == 0 and not body.echo:
    raise ApiError(400, "max_tokens: 0 generates nothing; it is for echo (scoring the "
                   "prompt)", param="max_tokens")
  if len(prompts) * body.n > queue_limit:
    raise ApiError(400, f"{len(prompts)} prompts x n={body.n} completions exceed this "
                   f"server's limit of {queue_limit}", param="n")
  return prompts, stop


def _stops(body):
  stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
  if len(stop) > MAX_STOP or any(not s for s in stop):
    raise ApiError(400, f"stop: at most {MAX_STOP} non-empty strings", param="stop")
  return stop


def _check_model(body, model_name):
  if body.model != model_name:
    raise ApiError(404, f"the model {body.model!r} does not exist; this server has "
                   f"{model_name!r}", param="model", code="model_not_found")


def check_chat(body, model_name, queue_limit):
  """(messages as {role, content} dicts, stop strings, max_tokens) of a chat request:
  known roles, text content (a string, or text parts), at least one message."""
  _check_model(body, model_name)
  if not body.messages:
    raise ApiError(400, "messages: give at least one message", param="messages")
  messages = []
  for i, m in enumerate(body.messages):
    if m.role not in ROLES:
      raise ApiError(400, f"messages[{i}].role: unknown role {m.role!r} (this server takes "
                     f"{', '.join(ROLES)})", param=f"messages.{i}.role")
    content = m.content
    if isinstance(content, list):  # [{"type": "text", "text": ...}]
      if any(part.get("type") != "text" or not isinstance(part.get("text"), str)
             for part in content):
        raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                       param=f"messages.{i}.content")
      content = "".join(part["text"] for part in content)
    if not content:
      raise ApiError(400, f"messages[{i}]: a {m.role} message needs content",
                     param=f"messages.{i}.content")
    messages.append({"role": m.role, "content": content})
  if body.n > queue_limit:
    raise ApiError(400, f"n={body.n} completions exceed this server's limit of "
                   f"{queue_limit}", param="n")
  if body.max_tokens and body.max_completion_tokens and (
      body.max_tokens != body.max_completion_tokens):
    raise ApiError(400, "max_tokens and max_completion_tokens differ; give one",
                   param="max_completion_tokens")
  if body.top_logprobs is not None and not body.logprobs:
    raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
  max_tokens = body.max_completion_tokens or body.max_tokens
  return messages, _stops(body), max_tokens  # max_tokens None: what the context leaves


def check_context(encoded, max_tokens, context):
  """Every prompt (token ids) plus max_tokens fits the model's context."""
  for p in encoded:
    if len(p) + max_tokens > context:
      raise ApiError(400, f"this model's maximum context length is {context} tokens, "
                     f"however you requested {len(p) + max_tokens} tokens ({len(p)} in your "
                     f"prompt; {max_tokens} for the completion)", param="max_tokens",
                     code="context_length_exceeded")


def completion(completion_id, model_name, choices, usage=None):
  """A text_completion object (a whole response, or one streamed chunk)."""
  out = {"id": completion_id, "object": "text_completion", "created": int(time.time()),
         "model": model_name, "choices": choices}
  if usage is not None:
    out["usage"] = usage
  return out


def choice(index, text, finish_reason):
  return {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}


def chat_completion(completion_id, model_name, choices, usage):
  """A chat.completion object; `choices`: (text, finish_reason) per choice."""
  return {"id": completion_id, "object": "chat.completion", "created": int(time.time()),
          "model": model_name, "usage": usage,
          "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                       "logprobs": None, "finish_reason": reason}
                      for i, (text, reason) in enumerate(choices)]}


def chat_chunk(completion_id, model_name, index=None, delta=None, finish_reason=None,
               usage=None):
  """A chat.completion.chunk: one choice's delta (and finish reason), or (index None) the
  closing chunk with no choices and the usage."""
  out = {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()),
         "model": model_name,
         "choices": [] if index is None else [{"index": index, "delta": delta or {},
                                               "logprobs": None,
                                               "finish_reason": finish_reason}]}
  if usage is not None:
    out["usage"] = usage
  return out


def completion_logprobs(entries, token_text, offset=0):
  """The legacy completions API's logprobs object of a choice's token entries
  (lm.engine's {"id", "logprob", "top"}); `token_text(id)`: a token's text."""
  tokens = [token_text(e["id"]) for e in entries]
  offsets, at = [], offset
  for t in tokens:
    offsets.append(at)
    at += len(t)
  def top(e):  # by text, likeliest first; tokens of the same text keep the likeliest's
    out = {}
    for i, v in e["top"]:
      out.setdefault(token_text(i), v)
    return out

  return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
          "top_logprobs": [None if e["logprob"] is None else top(e) for e in entries],
          "text_offset": offsets}


def chat_logprobs(entries, token_text):
  """The chat API's logprobs object ({"content": [...]}) of a choice's token entries."""
  item = lambda i, v: {"token": token_text(i), "logprob": v,
                       "bytes": list(token_text(i).encode("utf-8"))}
  return {"content": [{**item(e["id"], e["logprob"]),
                       "top_logprobs": [item(i, v) for i, v in e["top"]]} for e in entries]}
