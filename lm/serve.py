"""An OpenAI-compatible server for a trained (or imported) lm model.

    python -m lm.serve --workdir=runs/base [--host=127.0.0.1] [--port=8000] [--api_key=K]

Endpoints: POST /v1/completions (prompt string or list, max_tokens, temperature, top_p, n,
stop, seed, stream as server-sent events; lm extensions top_k and repetition_penalty),
POST /v1/chat/completions (messages in the checkpoint's chat template), GET /v1/models,
GET /healthz (liveness), GET /readyz (200 once the warm-up compiles are done), GET /metrics
(Prometheus text format). Point the official client at it:
`openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")`.

It binds 127.0.0.1 unless --host says otherwise. With --api_key (or $LM_API_KEY) every
/v1 route and /metrics need `Authorization: Bearer KEY` (401 without). Bodies past
--max_body_bytes are refused (413). SIGTERM stops admitting requests (503), lets the ones
in flight finish for --drain_s seconds, ends the rest with finish_reason "abort", and
exits 0.

Every bad request gets a 4xx JSON error in OpenAI's shape ({"error": {"message", "type",
"param", "code"}}): malformed JSON, unknown fields, wrong types or ranges, a prompt plus
max_tokens beyond the model's context (400), an unknown model (404), a full queue (429).
"""

import asyncio
import contextlib
import dataclasses
import hmac
import os
import signal
import threading
import time
import uuid

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from lm import cli_flags, decode, inference, openai_api
from lm.continuous import ContinuousEngine, TooLong
from lm.engine import Engine, QueueFull
from lm.errors import UserError
from lm.engine import Request as Job
from lm.openai_api import ApiError, ChatRequest, CompletionRequest
from lm.serve_metrics import Metrics
from lm.serve_replies import ChatReply, Reply

_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to bind (127.0.0.1: this machine only).")
_PORT = flags.DEFINE_integer("port", 8000, "Port.")
_MODEL_NAME = flags.DEFINE_string("model_name", None, "Model id (default: the workdir's name).")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 16, "Most completions decoded together.")
_WINDOW_MS = flags.DEFINE_float("batch_window_ms", 10.0, "How long a batch collects requests.")
_QUEUE_LIMIT = flags.DEFINE_integer("queue_limit", 64, "Queued completions before 429.")
_ENGINE = flags.DEFINE_enum("engine", "continuous", ["continuous", "static"],
                            "continuous: slots over a paged KV cache (lm/continuous.py); "
                            "static: batches collected for --batch_window_ms (lm/engine.py).")
_PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "Positions per KV page (continuous).")
_NUM_PAGES = flags.DEFINE_integer("num_pages", 0, "KV pages in the pool (continuous; 0: "
                                  "every slot at the full context).")
_API_KEY = flags.DEFINE_string("api_key", None, "Bearer key the /v1 routes and /metrics "
                               "require (default: $LM_API_KEY; none: open).")
_MAX_BODY = flags.DEFINE_integer("max_body_bytes", 1 << 20, "Largest request body (413 past it).")
_DRAIN_S = flags.DEFINE_float("drain_s", 30.0, "After SIGTERM: how long requests in flight may "
                              "finish before they are ended (finish_reason abort).")
_PREFILL_CHUNK = flags.DEFINE_integer("prefill_chunk", 64, "Prompt tokens per prefill call "
                                      "(continuous).")

@dataclasses.dataclass
class Server:
  """What the routes share: the app's state (app.state.server)."""
  loaded: object  # lm.inference.Loaded
  model_name: str
  engine: Engine
  metrics: Metrics
  queue_limit: int
  created: int = dataclasses.field(default_factory=lambda: int(time.time()))
  score_prompt: object = None  # the jitted prompt log-probabilities (echo with logprobs)
  api_key: str = None
  max_body: int = 1 << 20
  draining: bool = False

  @property
  def context(self):
    return self.loaded.model.cfg.max_len

  def answered(self, endpoint, status):
    self.metrics.requests.labels(endpoint, str(status)).inc()


def make_app(loaded, model_name, max_batch=16, window_s=0.01, queue_limit=64, chunk=16,
             engine="continuous", page_size=16, num_pages=0, prefill_chunk=64, api_key=None,
             max_body_bytes=1 << 20):
  """The FastAPI app; its engine starts with the app (lifespan) and stops with it.
  `engine`: continuous (page_size, num_pages, prefill_chunk) or static (window_s and
  chunk: decode steps per call)."""
  metrics = Metrics()
  if engine == "continuous":
    engine = ContinuousEngine(loaded, max_batch=max_batch, queue_limit=queue_limit,
                              chunk=prefill_chunk, page_size=page_size, num_pages=num_pages,
                              metrics=metrics)
  else:
    engine = Engine(loaded, max_batch=max_batch, window_s=window_s, queue_limit=queue_limit,
                    chunk=chunk, metrics=metrics)
  server = Server(loaded, model_name, engine, metrics, queue_limit)
  server.api_key, server.max_body = api_key, max_body_bytes

  @contextlib.asynccontextmanager
  async def lifespan(_):
    engine.start()
    yield
    engine.stop()

  api = FastAPI(title="lm", lifespan=lifespan)
  api.state.server = server
  api.add_exception_handler(ApiError, _refused)
  api.add_exception_handler(RequestValidationError, _invalid)
  api.add_exception_handler(HTTPException, _http_error)
  api.add_exception_handler(Exception, _internal)
  api.include_router(router)
  api.middleware("http")(_guard)
  return api


OPEN_ROUTES = ("/healthz", "/readyz")


async def _guard(request, call_next):
  """The API key, the body size limit and, once draining, a 503 for new requests."""
  server = request.app.state.server
  path = request.url.path
  if server.api_key and path not in OPEN_ROUTES:
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {server.api_key}".encode()):
      return await _refused(request, ApiError(
          401, "a valid API key is required (Authorization: Bearer KEY)",
          code="invalid_api_key"))
  length = request.headers.get("content-length")
  if length is not None and (not length.isdigit() or int(length) > server.max_body):
    return await _refused(request, ApiError(
        413, f"the request body exceeds this server's limit of {server.max_body} bytes",
        code="body_too_large"))
  if server.draining and path.startswith("/v1/") and request.method == "POST":
    return await _refused(request, ApiError(503, "the server is shutting down",
                                            kind="server_error", code="shutting_down"))
  return await call_next(request)


# Errors: every one an OpenAI-shaped JSON body, counted by endpoint, status and kind.

async def _refused(request, exc):
  server = request.app.state.server
  server.answered(request.url.path, exc.status)
  server.metrics.errors.labels(exc.code or exc.kind).inc()
  return JSONResponse(status_code=exc.status, content=exc.body())


async def _invalid(request, exc):
  return await _refused(request, openai_api.validation_error(exc.errors()))


async def _http_error(request, exc):
  return await _refused(request, ApiError(exc.status_code, str(exc.detail)))


async def _internal(request, exc):
  return await _refused(request, ApiError(500, f"{type(exc).__name__}: {exc}",
                                          kind="server_error"))


# Routes.

router = APIRouter()


@router.get("/healthz")
async def healthz(request: Request):
  server = request.app.state.server
  server.answered("/healthz", 200)
  return {"status": "ok", "model": server.model_name, "step": server.loaded.step,
          "queue_depth": server.engine.queue_depth}


@router.get("/readyz")
async def readyz(request: Request):
  """200 once the engine's warm-up compiles are done (503 before): for load balancers."""
  server = request.app.state.server
  ready = server.engine.ready.is_set()
  server.answered("/readyz", 200 if ready else 503)
  return JSONResponse(status_code=200 if ready else 503,
                      content={"ready": ready, "model": server.model_name})


@router.get("/metrics")
async def prometheus(request: Request):
  server = request.app.state.server
  server.answered("/metrics", 200)
  return Response(server.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/models")
async def models(request: Request):
  server = request.app.state.server
  server.answered("/v1/models", 200)
  return {"object": "list", "data": [{"id": server.model_name, "object": "model",
                                      "created": server.created, "owned_by": "lm"}]}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
  server = request.app.state.server
  prompts, stop = openai_api.check_completion(body, server.model_name, server.queue_limit)
  encoded = [server.loaded.encode_prompt(p) for p in prompts]
  openai_api.check_context(encoded, body.max_tokens, server.context)
  logprobs = -1 if body.logprobs is None else body.logprobs
  _check_logprobs(server, logprobs)
  echo = None
  if body.echo:  # each choice starts with its prompt (and the prompt tokens' logprobs)
    entries = [None] * len(encoded)
    if logprobs >= 0:
      entries = await asyncio.to_thread(
          lambda: [_prompt_entries(server, ids, logprobs) for ids in encoded])
    echo = [(text, e) for text, e in zip(prompts, entries) for _ in range(body.n)]
  if body.max_tokens == 0:  # scoring only: nothing to generate
    events, jobs = asyncio.Queue(), []
    for i in range(len(prompts) * body.n):
      events.put_nowait(("done", i, "length", 0))
  else:
    events, jobs = _submit(server, body, encoded, stop, logprobs)
  reply = Reply(server, f"cmpl-{uuid.uuid4().hex}", events, jobs, len(prompts) * body.n,
                 logprobs >= 0, echo)
  if body.stream:
    server.answered("/v1/completions", 200)
    return StreamingResponse(reply.stream(), media_type="text/event-stream")
  result = await reply.collect(prompt_tokens=sum(len(p) for p in encoded) * body.n)
  server.answered("/v1/completions", 200)
  return result


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request):
  """Messages rendered with the checkpoint's chat template (transformers' rendering); the
  reply ends at the model's stop tokens or its end-of-turn text."""
  server = request.app.state.server
  messages, stop, max_tokens = openai_api.check_chat(body, server.model_name,
                                                     server.queue_limit)
  try:
    ids = server.loaded.chat_ids(messages)
  except UserError as e:
    raise ApiError(400, str(e), param="messages") from None
  if max_tokens is None:
    max_tokens = max(server.context - len(ids), 1)
  openai_api.check_context([ids], max_tokens, server.context)
  end_of_turn = getattr(server.loaded.tokenizer, "chat_stop_text", None)
  body.max_tokens = max_tokens
  logprobs = (body.top_logprobs or 0) if body.logprobs else -1
  _check_logprobs(server, logprobs)
  events, jobs = _submit(server, body, [ids], stop + ([end_of_turn] if end_of_turn else []),
                         logprobs)
  reply = ChatReply(server, f"chatcmpl-{uuid.uuid4().hex}", events, jobs, body.n,
                     logprobs >= 0)
  usage = body.stream_options is not None and body.stream_options.include_usage
  if body.stream:
    server.answered("/v1/chat/completions", 200)
    return StreamingResponse(reply.stream(prompt_tokens=len(ids), usage=usage),
                             media_type="text/event-stream")
  result = await reply.collect(prompt_tokens=len(ids) * body.n)
  server.answered("/v1/chat/completions", 200)
  return result


def _prompt_entries(server, ids, k):
  """Log-probability entries of a prompt's tokens (the first has none: nothing precedes it),
  from one forward pass: each token's, and its position's k likeliest."""
  loaded = server.loaded
  if server.score_prompt is None:
    server.score_prompt = jax.jit(lambda p, x: jax.nn.log_softmax(
        loaded.model.apply({"params": p}, x)[0].astype(jnp.float32)))
  padded = np.zeros((1, decode.bucket(len(ids))), np.int32)
  padded[0, :len(ids)] = ids
  with loaded.on_mesh():
    logp = np.asarray(server.score_prompt(loaded.params, jnp.asarray(padded)))[:len(ids)]
  entries = [{"id": ids[0], "logprob": None, "top": []}]
  for i in range(1, len(ids)):
    row = logp[i - 1]
    best = np.argsort(-row, kind="stable")[:k]
    entries.append({"id": int(ids[i]), "logprob": float(row[ids[i]]),
                    "top": [(int(b), float(row[b])) for b in best]})
  return entries


def _check_logprobs(server, logprobs):
  if logprobs >= 0 and not isinstance(server.engine, ContinuousEngine):
    raise ApiError(400, "logprobs: this server's static engine does not compute them "
                   "(serve with --engine=continuous)", param="logprobs")


def _submit(server, body, encoded, stop, logprobs=-1):
  """Queues one engine job per prompt (its n completions are rows of it): (an asyncio queue
  of their events, the jobs). A full queue is a 429 and queues none of them."""
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
    jobs.append(Job(prompt_ids=ids, max_tokens=body.max_tokens, sampling=sampling, stop=stop,
                    emit=lambda e, base=i * body.n: emit(_shift(e, base)), logprobs=logprobs))
  try:
    for job in jobs:
      server.engine.submit(job)
  except QueueFull as e:
    for job in jobs:
      job.cancelled = True
    raise ApiError(429, str(e), kind="rate_limit_error", code="queue_full") from None
  except TooLong as e:
    for job in jobs:
      job.cancelled = True
    raise ApiError(400, str(e), param="max_tokens", code="context_length_exceeded") from None
  return events, jobs


def _shift(event, base):
  """A request's event with its choice index offset to the prompt's first choice."""
  if event[0] in ("delta", "done", "logprobs"):
    return (event[0], event[1] + base, *event[2:])
  return event

flags.adopt_module_key_flags(cli_flags)


def main(argv):
  logging.set_verbosity(logging.WARNING)
  import uvicorn  # pylint: disable=import-outside-toplevel

  loaded = inference.load_or_exit(argv, cli_flags.WORKDIR.value, cli_flags.STEP.value)
  name = _MODEL_NAME.value or os.path.basename(os.path.abspath(cli_flags.WORKDIR.value))
  api = make_app(loaded, name, max_batch=_MAX_BATCH.value, window_s=_WINDOW_MS.value / 1000,
                 queue_limit=_QUEUE_LIMIT.value, engine=_ENGINE.value,
                 page_size=_PAGE_SIZE.value, num_pages=_NUM_PAGES.value,
                 prefill_chunk=_PREFILL_CHUNK.value,
                 api_key=_API_KEY.value or os.environ.get("LM_API_KEY") or None,
                 max_body_bytes=_MAX_BODY.value)
  print(f"lm: serving {name!r} (step {loaded.step}) on http://{_HOST.value}:{_PORT.value}/v1",
        flush=True)
  server = _graceful_server(uvicorn.Config(api, host=_HOST.value, port=_PORT.value,
                                           log_level="warning",
                                           timeout_graceful_shutdown=_DRAIN_S.value + 10),
                            api.state.server, _DRAIN_S.value)
  server.run()
  print("lm: stopped", flush=True)


def _graceful_server(config, lm_server, drain_s):
  """uvicorn's server, which on SIGTERM (or Ctrl-C) first drains lm's engine: no new
  requests (503), drain_s seconds for the ones in flight, then the rest ended ("abort");
  uvicorn then closes the connections and the lifespan stops the engine."""
  import uvicorn  # pylint: disable=import-outside-toplevel

  class Graceful(uvicorn.Server):

    def handle_exit(self, sig, frame):
      if not lm_server.draining:
        lm_server.draining = True
        print(f"lm: signal {sig}: draining for up to {drain_s:g} s", flush=True)
        threading.Thread(target=lm_server.engine.drain, args=(drain_s,), daemon=True).start()
      super().handle_exit(sig, frame)
      if sig == signal.SIGTERM:  # a drained shutdown is a clean exit: uvicorn would re-raise
        self._captured_signals.remove(sig)  # the signal after it (status -15)

  return Graceful(config)


if __name__ == "__main__":
  app.run(main)
