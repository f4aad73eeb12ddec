"""An OpenAI-compatible completions server for a trained lm model.

    python -m lm.serve --workdir=runs/base [--host=127.0.0.1] [--port=8000]

Endpoints: POST /v1/completions (prompt string or list, max_tokens, temperature, top_p, n,
stop, seed, stream as server-sent events; lm extensions top_k and repetition_penalty),
GET /v1/models, GET /healthz, GET /metrics (Prometheus text format). Point the official
client at it: `openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")`.

Every bad request gets a 4xx JSON error in OpenAI's shape ({"error": {"message", "type",
"param", "code"}}): malformed JSON, unknown fields, wrong types or ranges, a prompt plus
max_tokens beyond the model's context (400), an unknown model (404), a full queue (429).
"""

import asyncio
import json
import os
import time
import uuid
from typing import Literal, Optional, Union

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's folder.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to bind (127.0.0.1: this machine only).")
_PORT = flags.DEFINE_integer("port", 8000, "Port.")
_MODEL_NAME = flags.DEFINE_string("model_name", None, "Model id (default: the workdir's name).")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 16, "Most completions decoded together.")
_WINDOW_MS = flags.DEFINE_float("batch_window_ms", 10.0, "How long a batch collects requests.")
_QUEUE_LIMIT = flags.DEFINE_integer("queue_limit", 64, "Queued completions before 429.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")

MAX_N = 16
MAX_STOP = 4


class Metrics:
  """Prometheus metrics of one server (its own registry, so tests can run several)."""

  def __init__(self):
    import prometheus_client as prom  # pylint: disable=import-outside-toplevel
    self.registry = prom.CollectorRegistry()
    r = self.registry
    self.requests = prom.Counter("lm_requests", "HTTP requests by endpoint and status.",
                                 ["endpoint", "status"], registry=r)
    self.errors = prom.Counter("lm_request_errors", "Failed requests by kind.", ["kind"],
                               registry=r)
    self.queue_depth = prom.Gauge("lm_queue_depth", "Completions waiting for a batch.",
                                  registry=r)
    self.time_to_first_token = prom.Histogram(
        "lm_time_to_first_token_seconds", "From request to its first generated token.",
        buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30), registry=r)
    self.time_per_token = prom.Histogram(
        "lm_time_per_output_token_seconds", "Mean time per generated token after the first.",
        buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1), registry=r)
    self.generated_tokens = prom.Counter("lm_generated_tokens", "Tokens generated.",
                                         registry=r)
    self.batch_rows = prom.Histogram("lm_batch_rows", "Completions per decode batch.",
                                     buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)

  def text(self):
    import prometheus_client as prom  # pylint: disable=import-outside-toplevel
    return prom.generate_latest(self.registry)


def _request_model():
  from pydantic import BaseModel, ConfigDict, Field  # pylint: disable=import-outside-toplevel

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

  return CompletionRequest


def _error(status, message, kind="invalid_request_error", param=None, code=None):
  from fastapi.responses import JSONResponse  # pylint: disable=import-outside-toplevel
  return JSONResponse(status_code=status, content={"error": {
      "message": message, "type": kind, "param": param, "code": code}})


def make_app(loaded, model_name, max_batch=16, window_s=0.01, queue_limit=64, chunk=16):
  """The FastAPI app; its engine starts with the app (lifespan) and stops with it."""
  import contextlib  # pylint: disable=import-outside-toplevel
  from fastapi import FastAPI, Request  # pylint: disable=import-outside-toplevel
  from fastapi.exceptions import RequestValidationError  # pylint: disable=import-outside-toplevel
  from fastapi.responses import Response, StreamingResponse  # pylint: disable=import-outside-toplevel
  from starlette.exceptions import HTTPException  # pylint: disable=import-outside-toplevel

  from lm import decode  # pylint: disable=import-outside-toplevel
  from lm.engine import Engine, QueueFull, Request as Job  # pylint: disable=import-outside-toplevel

  CompletionRequest = _request_model()  # pylint: disable=invalid-name
  metrics = Metrics()
  engine = Engine(loaded, max_batch=max_batch, window_s=window_s, queue_limit=queue_limit,
                  chunk=chunk, metrics=metrics)
  created = int(time.time())
  context = loaded.model.cfg.max_len

  @contextlib.asynccontextmanager
  async def lifespan(_):
    engine.start()
    yield
    engine.stop()

  api = FastAPI(title="lm", lifespan=lifespan)

  def failed(endpoint, status, kind, message, param=None, code=None):
    metrics.requests.labels(endpoint, str(status)).inc()
    metrics.errors.labels(code or kind).inc()
    return _error(status, message, kind, param, code)

  @api.exception_handler(RequestValidationError)
  async def invalid(request, exc):
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    if first.get("type") == "json_invalid":
      return failed(request.url.path, 400, "invalid_request_error",
                    f"the body is not valid JSON: {first.get('msg', '')}", code="invalid_json")
    if first.get("type") == "extra_forbidden":
      message = f"unknown or unsupported field {where!r}"
    else:
      message = f"{where or 'body'}: {first.get('msg', 'invalid')}"
      if "input" in first and not isinstance(first["input"], (dict, list)):
        message += f" (got {first['input']!r})"
    return failed(request.url.path, 400, "invalid_request_error", message, param=where or None)

  @api.exception_handler(HTTPException)
  async def http_error(request, exc):
    return failed(request.url.path, exc.status_code, "invalid_request_error", str(exc.detail))

  @api.exception_handler(Exception)
  async def internal(request, exc):
    return failed(request.url.path, 500, "server_error", f"{type(exc).__name__}: {exc}")

  @api.get("/healthz")
  async def healthz():
    metrics.requests.labels("/healthz", "200").inc()
    return {"status": "ok", "model": model_name, "step": loaded.step,
            "queue_depth": engine.queue_depth}

  @api.get("/metrics")
  async def prometheus():
    metrics.requests.labels("/metrics", "200").inc()
    return Response(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

  @api.get("/v1/models")
  async def models():
    metrics.requests.labels("/v1/models", "200").inc()
    return {"object": "list", "data": [{"id": model_name, "object": "model",
                                        "created": created, "owned_by": "lm"}]}

  @api.post("/v1/completions")
  async def completions(body: CompletionRequest, http: Request):
    endpoint = "/v1/completions"
    if body.model != model_name:
      return failed(endpoint, 404, "invalid_request_error",
                    f"the model {body.model!r} does not exist; this server has {model_name!r}",
                    param="model", code="model_not_found")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if not prompts:
      return failed(endpoint, 400, "invalid_request_error", "prompt: give at least one prompt",
                    param="prompt")
    if len(stop) > MAX_STOP or any(not s for s in stop):
      return failed(endpoint, 400, "invalid_request_error",
                    f"stop: at most {MAX_STOP} non-empty strings", param="stop")
    if len(prompts) * body.n > queue_limit:
      return failed(endpoint, 400, "invalid_request_error",
                    f"{len(prompts)} prompts x n={body.n} completions exceed this server's "
                    f"limit of {queue_limit}", param="n")
    encoded = [loaded.encode_prompt(p) for p in prompts]
    for p in encoded:
      if len(p) + body.max_tokens > context:
        return failed(endpoint, 400, "invalid_request_error",
                      f"this model's maximum context length is {context} tokens, however you "
                      f"requested {len(p) + body.max_tokens} tokens ({len(p)} in your prompt; "
                      f"{body.max_tokens} for the completion)", param="max_tokens",
                      code="context_length_exceeded")
    seed = body.seed if body.seed is not None else uuid.uuid4().int % (2**31)
    loop = asyncio.get_running_loop()
    events = asyncio.Queue()
    emit = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
    jobs = []
    for i, ids in enumerate(encoded):
      sampling = [decode.Sampling(temperature=body.temperature, top_k=body.top_k,
                                  top_p=body.top_p, repetition_penalty=body.repetition_penalty,
                                  seed=(seed + 1_000_003 * (i * body.n + j)) % (2**31))
                  for j in range(body.n)]
      index = i * body.n
      jobs.append(Job(prompt_ids=ids, max_tokens=body.max_tokens, sampling=sampling, stop=stop,
                      emit=lambda e, base=index: emit(_shift(e, base))))
    try:
      for job in jobs:
        engine.submit(job)
    except QueueFull as e:
      for job in jobs:
        job.cancelled = True
      return failed(endpoint, 429, "rate_limit_error", str(e), code="queue_full")

    completion_id = f"cmpl-{uuid.uuid4().hex}"
    total = len(prompts) * body.n
    prompt_tokens = sum(len(p) for p in encoded) * body.n

    def chunk(choices, usage=None):
      out = {"id": completion_id, "object": "text_completion", "created": int(time.time()),
             "model": model_name, "choices": choices}
      if usage is not None:
        out["usage"] = usage
      return out

    if body.stream:
      async def stream():
        finished = 0
        try:
          while finished < total:
            event = await events.get()
            if event[0] == "error":
              metrics.errors.labels("internal").inc()
              yield f"data: {json.dumps({'error': {'message': event[1], 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
              break
            if event[0] == "delta":
              yield f"data: {json.dumps(chunk([_choice(event[1], event[2], None)]))}\n\n"
            else:
              finished += 1
              yield f"data: {json.dumps(chunk([_choice(event[1], '', event[2])]))}\n\n"
          yield "data: [DONE]\n\n"
        finally:
          for job in jobs:  # a client that went away stops its rows
            job.cancelled = True

      metrics.requests.labels(endpoint, "200").inc()
      return StreamingResponse(stream(), media_type="text/event-stream")

    texts, reasons, completion_tokens = [""] * total, [None] * total, 0
    finished = 0
    try:
      while finished < total:
        event = await events.get()
        if event[0] == "error":
          return failed(endpoint, 500, "server_error", event[1])
        if event[0] == "delta":
          texts[event[1]] += event[2]
        else:
          reasons[event[1]] = event[2]
          completion_tokens += event[3]
          finished += 1
    finally:
      for job in jobs:
        job.cancelled = True
    metrics.requests.labels(endpoint, "200").inc()
    return chunk([_choice(i, texts[i], reasons[i]) for i in range(total)],
                 usage={"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                        "total_tokens": prompt_tokens + completion_tokens})

  api.state.engine = engine
  api.state.metrics = metrics
  return api


def _shift(event, base):
  """A request's event with its choice index offset to the prompt's first choice."""
  if event[0] in ("delta", "done"):
    return (event[0], event[1] + base, *event[2:])
  return event


def _choice(index, text, finish_reason):
  return {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}


def main(argv):
  logging.set_verbosity(logging.WARNING)
  import uvicorn  # pylint: disable=import-outside-toplevel

  from lm import inference  # pylint: disable=import-outside-toplevel
  loaded = inference.load_or_exit(argv, _WORKDIR.value, _STEP.value)
  name = _MODEL_NAME.value or os.path.basename(os.path.abspath(_WORKDIR.value))
  api = make_app(loaded, name, max_batch=_MAX_BATCH.value, window_s=_WINDOW_MS.value / 1000,
                 queue_limit=_QUEUE_LIMIT.value)
  print(f"lm: serving {name!r} (step {loaded.step}) on http://{_HOST.value}:{_PORT.value}/v1",
        flush=True)
  uvicorn.run(api, host=_HOST.value, port=_PORT.value, log_level="warning")


if __name__ == "__main__":
  app.run(main)
