"""OpenAI's completions API as lm's server speaks it: the request schema, its checks beyond
the schema, and the shapes of responses and errors. No HTTP and no model here.

    body = CompletionRequest(**json)                    # pydantic: types, ranges, no extras
    prompts, stop = check_completion(body, name, queue_limit)   # raises ApiError
    check_context(encoded_prompts, body.max_tokens, context)    # raises ApiError

An ApiError carries OpenAI's error shape ({"error": {"message", "type", "param", "code"}})
and its HTTP status; lm/serve.py answers it.
"""

import time
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 16
MAX_STOP = 4


class CompletionRequest(BaseModel):
  model_config = ConfigDict(extra="forbid", strict=True)
  model: str
  prompt: Union[str, list[str]]
  max_tokens: int = Field(16, ge=1)
  temperature: float = Field(1.0, ge=0.0, le=2.0)
  top_p: float = Field(1.0, gt=0.0, le=1.0)
  n: int = Field(1, ge=1, le=MAX_N)
  stop: Optional[Union[str, list[str]]] = None
  seed: Optional[int] = None
  stream: bool = False
  top_k: int = Field(0, ge=0)
  repetition_penalty: float = Field(1.0, gt=0.0)
  user: Optional[str] = None
  echo: Literal[False] = False
  logprobs: Literal[None] = None


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
  if body.model != model_name:
    raise ApiError(404, f"the model {body.model!r} does not exist; this server has "
                   f"{model_name!r}", param="model", code="model_not_found")
  prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
  stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
  if not prompts:
    raise ApiError(400, "prompt: give at least one prompt", param="prompt")
  if len(stop) > MAX_STOP or any(not s for s in stop):
    raise ApiError(400, f"stop: at most {MAX_STOP} non-empty strings", param="stop")
  if len(prompts) * body.n > queue_limit:
    raise ApiError(400, f"{len(prompts)} prompts x n={body.n} completions exceed this "
                   f"server's limit of {queue_limit}", param="n")
  return prompts, stop


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
