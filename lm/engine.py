"""The serving engine: requests in, batched cached decoding on device, text events out.

A worker thread takes requests from a bounded queue. It waits for the first, collects more
for `window_s` (up to `max_batch` rows; a request with n choices is n rows), and decodes them
as one batch: one prefill, then `chunk` tokens per jitted call, so text streams out every
chunk and rows that finish (stop token, stop string, max_tokens, client gone) stop counting.
New requests wait for the next batch (static batching with a collection window).

Events go to each request's `emit(event)` callback from the worker thread:
  ("delta", choice_index, text)           new text for a choice
  ("done", choice_index, finish_reason, completion_tokens)
  ("logprobs", choice_index, entry)       (continuous engine, request.logprobs >= 0) a new
                                          token's {"id", "logprob", "top": [(id, logprob)]}
  ("error", message)                      the whole request failed
"""

import dataclasses
import queue
import threading
import time

from lm import decode


class QueueFull(Exception):
  """More rows are waiting than the engine's queue limit allows."""


@dataclasses.dataclass
class Request:
  prompt_ids: list
  max_tokens: int
  sampling: list  # one decode.Sampling per choice
  stop: list  # stop strings
  emit: object  # callable(event), called from the worker thread
  cancelled: bool = False
  # -1: no log-probabilities; k >= 0: each token's, and its k likeliest alternatives'
  # (lm.continuous only), as ("logprobs", choice, entry) events before its text.
  logprobs: int = -1
  submitted: float = dataclasses.field(default_factory=time.perf_counter)
  first_token: float = 0.0

  @property
  def rows(self):
    return len(self.sampling)


@dataclasses.dataclass
class _Row:
  request: Request
  choice: int
  ids: list = dataclasses.field(default_factory=list)
  sent: int = 0  # characters of text already emitted
  finished: str = ""  # finish reason once done


class Engine:

  def __init__(self, loaded, max_batch=16, window_s=0.01, queue_limit=64, chunk=16,
               metrics=None):
    self.loaded, self.max_batch, self.window_s = loaded, max_batch, window_s
    self.queue_limit, self.chunk, self.metrics = queue_limit, chunk, metrics
    self._queue = queue.Queue()
    self._waiting_rows = 0
    self._lock = threading.Lock()
    self._thread = threading.Thread(target=self._serve, name="lm-engine", daemon=True)
    self._stopped = threading.Event()
    self.ready = threading.Event()  # set once the warm-up compiles are done
    self._busy = self._abort = False

  def start(self, warmup=True):
    if warmup:  # compile the smallest batch now rather than in the first request
      self.loaded.complete(["\n"], 2, decode.Sampling(temperature=0.0))
    self.ready.set()
    self._thread.start()

  def stop(self):
    self._stopped.set()
    self._queue.put(None)
    self._thread.join(timeout=30)

  def drain(self, timeout_s):
    """Waits until the queue and the batch in flight are done or `timeout_s` passed, then
    ends what is left of the batch with finish reason "abort"."""
    deadline = time.perf_counter() + timeout_s
    while (self._waiting_rows or self._busy) and time.perf_counter() < deadline:
      time.sleep(0.05)
    self._abort = True

  @property
  def queue_depth(self):
    return self._waiting_rows

  def submit(self, request):
    enqueue(self, request)

  def _gauge(self):
    if self.metrics:
      self.metrics.queue_depth.set(self._waiting_rows)

  def _take(self, request):
    with self._lock:
      self._waiting_rows -= request.rows
      self._gauge()

  def _serve(self):
    pending = None
    while not self._stopped.is_set():
      first = pending or self._queue.get()
      pending = None
      if first is None:
        return
      batch, rows = [first], first.rows
      deadline = time.perf_counter() + self.window_s
      while rows < self.max_batch:
        try:
          nxt = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
        except queue.Empty:
          break
        if nxt is None:
          self._stopped.set()
          break
        if rows + nxt.rows > self.max_batch:
          pending = nxt  # first in the next batch
          break
        batch.append(nxt)
        rows += nxt.rows
      for request in batch:
        self._take(request)
      self._busy = True
      try:
        self._run(batch)
      except Exception as e:  # pylint: disable=broad-except
        for request in batch:
          request.emit(("error", f"{type(e).__name__}: {e}"))
      self._busy = False

  def _run(self, batch):
    loaded = self.loaded
    rows = [_Row(request, i) for request in batch for i in range(request.rows)]
    live = [r for r in rows if not r.request.cancelled]
    for r in rows:
      if r.request.cancelled:
        r.finished = "cancelled"
    if not live:
      return
    limits = [r.request.max_tokens for r in live]
    if self.metrics:
      self.metrics.batch_rows.observe(len(live))
    with loaded.on_mesh():
      state = decode.prefill(loaded.model, loaded.params, [r.request.prompt_ids for r in live],
                             decode.bucket(max(limits)),
                             [r.request.sampling[r.choice] for r in live], loaded.stop_ids,
                             limits=limits)
      while True:
        tokens = decode.outputs(state, len(live))
        ended = self._publish(live, tokens, limits)
        if self._abort:
          for r in live:
            if not r.finished:
              r.finished = "abort"
              r.request.emit(("done", r.choice, "abort", len(r.ids)))
        if all(r.finished for r in live):
          return
        if ended:  # rows the host ended (stop string, client gone) stop decoding
          done = state.done_B.at[[i for i, r in enumerate(live) if r.finished]].set(True)
          state = state._replace(done_B=done)
        state = decode.decode(loaded.model, loaded.params, state, self.chunk)

  def _publish(self, live, tokens, limits):
    """Emits new text per row; returns whether the host ended any row just now."""
    now, ended = time.perf_counter(), False
    for r, ids, limit in zip(live, tokens, limits):
      if not r.finished:
        ended |= publish(r, ids, limit, self.loaded, self.metrics, now)
    return ended


def enqueue(engine, request):
  """Counts a request's rows into an engine's queue depth (QueueFull past its queue_limit)
  and puts it on the engine's queue: both engines' submit."""
  with engine._lock:  # pylint: disable=protected-access
    if engine._waiting_rows + request.rows > engine.queue_limit:  # pylint: disable=protected-access
      raise QueueFull(f"{engine._waiting_rows} completions are queued (limit "  # pylint: disable=protected-access
                      f"{engine.queue_limit}); retry later")
    engine._waiting_rows += request.rows  # pylint: disable=protected-access
    engine._gauge()  # pylint: disable=protected-access
  engine._queue.put(request)  # pylint: disable=protected-access


def publish(r, ids, limit, loaded, metrics, now):
  """A row's generated `ids` so far: emits its new text, and ("done", ...) once it ends by
  a stop token, a stop string, its `limit` or a cancelled request. Text that may still
  change (a partial character, the start of a stop string) is held back. Returns whether
  the host ended the row (stop string, cancelled) rather than the decoder."""
  request, ended = r.request, False
  new = ids[len(r.ids):]
  r.ids = ids
  if new and not request.first_token:
    request.first_token = now
    if metrics:
      metrics.time_to_first_token.observe(now - request.submitted)
  if metrics and new:
    metrics.generated_tokens.inc(len(new))
  text = loaded.tokenizer.decode(ids)
  reason = ""
  cut = min((i for i in (text.find(s) for s in request.stop) if i >= 0), default=-1)
  if cut >= 0:
    text, reason, ended = text[:cut], "stop", True
  elif ids and ids[-1] in loaded.stop_ids:
    reason = "stop"
  elif len(ids) >= limit:
    reason = "length"
  elif request.cancelled:
    reason, ended = "cancelled", True
  if not reason:
    text = text.rstrip("\ufffd")
    hold = max((len(s) for s in request.stop), default=1) - 1
    text = text[:max(r.sent, len(text) - hold)]
  if len(text) > r.sent:
    request.emit(("delta", r.choice, text[r.sent:]))
    r.sent = len(text)
  if reason:
    r.finished = reason
    if reason != "cancelled":
      request.emit(("done", r.choice, reason, len(ids)))
    if metrics and len(ids) > 1 and request.first_token:
      metrics.time_per_token.observe((now - request.first_token) / (len(ids) - 1))
  return ended
