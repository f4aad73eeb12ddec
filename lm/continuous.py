"""The continuous-batching engine: a fixed set of decode slots over a paged KV cache.

Every iteration of the worker thread
  1. takes new requests (each choice of a request is one sequence) into the waiting line;
  2. admits waiting sequences, oldest first, into free slots while the pool has pages for
     their context: a prompt's full pages that an earlier prompt computed (the same tokens
     from the start) are taken from the prefix cache instead (lm/paged.py: Pages);
  3. runs one prefill call: a chunk of `chunk` tokens for each of up to `prefill_rows`
     admitted sequences (in turn), so a long prompt never stalls the others for more than
     a chunk;
  4. runs one jitted decode step for every slot whose context is cached (static shapes: all
     slots, the page table cut to a power of two of pages), and streams the new tokens.
A sequence leaves its slot the moment it ends (stop token, stop string, max_tokens, client
gone), and its pages go back to the pool. When a decoding sequence needs a page and none
is left, the youngest sequence is preempted: its pages are released and it waits again,
at the front, to be recomputed from its prompt and what it had generated (the stream
goes on where it was). A request whose context could never fit is refused at submit.

Tokens equal decoding each sequence alone with lm/decode.py: the same per-row sampling key
(the row's seed folded with its token count), the repetition penalty over the same seen
tokens, the same model through a paged cache. The events are lm/engine.py's.
"""

import collections
import dataclasses
import queue
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from lm import decode, paged, sharding
from lm.engine import QueueFull, Request, _Row, enqueue, publish

__all__ = ["ContinuousEngine", "QueueFull", "Request", "TooLong"]


_WAKE = object()  # put on the queue to wake an idle worker
MIN_POSITIONS = 64  # the narrowest page table, in positions (ContinuousEngine._width)


def _column(rows, f, dtype=jnp.int32, empty=0):
  """f(row) for each row (`empty` for None) as one device array."""
  return jnp.asarray([f(s) if s is not None else empty for s in rows], dtype)


class TooLong(ValueError):
  """A request that no state of the pool could ever hold."""


@dataclasses.dataclass
class _Seq(_Row):
  admitted: int = 0  # admission order: the youngest is preempted first
  slot: int = -1
  pages: list = dataclasses.field(default_factory=list)
  context: list = dataclasses.field(default_factory=list)  # tokens to cache on admission
  cached: int = 0  # positions of the context in the pages
  last: int = -1  # the newest token, fed to the next decode step
  limit: int = 0
  queued: bool = True  # in queue_depth (submitted, never admitted)


class ContinuousEngine:
  """Same interface as lm.engine.Engine: start, stop, submit(Request), queue_depth."""

  def __init__(self, loaded, max_batch=16, queue_limit=64, chunk=64, page_size=16,
               num_pages=0, prefill_rows=4, metrics=None):
    """`num_pages`: the pool (0: enough for every slot at the full context, plus scratch).
    `chunk` x `prefill_rows`: the prompt tokens one prefill call computes."""
    self.loaded, self.slots, self.queue_limit = loaded, max_batch, queue_limit
    self.prefill_rows = prefill_rows
    self.chunk, self.page_size, self.metrics = chunk, page_size, metrics
    cfg = loaded.model.cfg
    self.max_len = cfg.max_len
    self.table_width = paged.pages_for(cfg.max_len, page_size)
    self.pages = paged.Pages(num_pages or max_batch * self.table_width + 1, page_size)
    self._queue = queue.Queue()
    self._waiting = collections.deque()  # sequences, oldest first
    self._waiting_rows = 0
    self._lock = threading.Lock()
    self._stopped = threading.Event()
    self.ready = threading.Event()
    self._abort = threading.Event()
    self._warmup = False
    self._thread = threading.Thread(target=self._serve, name="lm-continuous", daemon=True)
    self._slots = [None] * max_batch
    self._admissions = 0
    self._turn = 0
    self.preemptions = 0
    self._seen_counts = (0, 0, 0)  # lookups, hits, preemptions already in the metrics
    with loaded.on_mesh():
      # Committed to the mesh as the programs' outputs will be: one compile per shape.
      here = sharding.replicated(loaded.mesh)
      self._pools = jax.device_put(paged.init_pools(cfg, self.pages.num_pages, page_size),
                                   here)
      self._seen = jax.device_put(jnp.zeros((max_batch, cfg.vocab_size), jnp.bool_), here)
      self._unembed = paged.unembedding(loaded.model, loaded.params, self._pools)

  # The interface.

  def start(self, warmup=True):
    """Starts the worker. With `warmup` it first compiles the prefill and decode programs
    of every page-table width (a few powers of two), so no request waits for a compile;
    `ready` is set when that is done (at once without)."""
    self._warmup = warmup
    self._thread.start()

  def widths(self):
    """Every page-table width the programs are compiled for."""
    out, pages = [], 1
    while True:
      width = self._width(pages)
      if not out or width != out[-1]:
        out.append(width)
      if width >= self.table_width:
        return out
      pages = width + 1

  def _compile_all(self):
    """Runs each program once per width with every row idle (writes go to the scratch
    page): compiles everything a request can need."""
    s, r, cfg = self.slots, self.prefill_rows, self.loaded.model.cfg
    zeros = lambda n, dtype: jnp.zeros((n,), dtype)
    with self.loaded.on_mesh():
      for width in self.widths():
        self._pools, self._seen, _, _ = paged.decode_step(
            self.loaded.model, self.loaded.params, self._pools, self._unembed, self._seen,
            jnp.zeros((s, width), jnp.int32), zeros(s, jnp.int32), zeros(s, jnp.int32),
            zeros(s, jnp.bool_), zeros(s, jnp.uint32), zeros(s, jnp.int32),
            zeros(s, jnp.float32), zeros(s, jnp.int32), jnp.ones((s,), jnp.float32),
            jnp.ones((s,), jnp.float32), zeros(s, jnp.bool_))
        self._pools, self._seen, _, _ = paged.prefill_chunk(
            self.loaded.model, self.loaded.params, self._pools, self._unembed, self._seen,
            jnp.zeros((r, width), jnp.int32), zeros(r, jnp.int32),
            jnp.zeros((r, self.chunk), jnp.int32), zeros(r, jnp.int32),
            jnp.full((r,), s, jnp.int32), zeros(r, jnp.uint32), zeros(r, jnp.int32),
            zeros(r, jnp.float32), zeros(r, jnp.int32), jnp.ones((r,), jnp.float32),
            jnp.ones((r,), jnp.float32), zeros(r, jnp.bool_))
      n = decode.bucket(1)
      while n <= decode.bucket(cfg.max_len):  # a context's seen tokens, by its bucket
        self._seen = paged.reset_seen(self._seen, 0, jnp.zeros((n,), jnp.int32), 0)
        n *= 2

  def stop(self):
    self._stopped.set()
    self._queue.put(None)
    self._thread.join(timeout=30)

  def drain(self, timeout_s):
    """Blocks until every request has finished or `timeout_s` passed; then the worker ends
    what is left with finish reason "abort" (call with new requests kept out)."""
    deadline = time.perf_counter() + timeout_s
    while (self.running or self._waiting or self._waiting_rows) and (
        time.perf_counter() < deadline):
      time.sleep(0.05)
    self._abort.set()
    self._queue.put(_WAKE)

  @property
  def queue_depth(self):
    return self._waiting_rows

  @property
  def running(self):
    return sum(s is not None for s in self._slots)

  def submit(self, request):
    need = paged.pages_for(len(request.prompt_ids) + request.max_tokens, self.page_size)
    if len(request.prompt_ids) + 1 > self.max_len:
      raise TooLong(f"the prompt has {len(request.prompt_ids)} tokens; the model's context "
                    f"is {self.max_len}")
    if min(need, self.table_width) > self.pages.num_pages - 1:
      raise TooLong(f"{len(request.prompt_ids)} prompt tokens and max_tokens="
                    f"{request.max_tokens} need {need} pages of {self.page_size}; the pool "
                    f"has {self.pages.num_pages - 1}")
    enqueue(self, request)

  def _gauge(self):
    if self.metrics:
      self.metrics.queue_depth.set(self._waiting_rows)

  # The loop.

  def _serve(self):
    try:
      if self._warmup:
        self._compile_all()
      self.ready.set()
    except Exception as e:  # pylint: disable=broad-except
      # Not ready; requests still get an answer (the error again, most likely).
      print(f"lm: error: the engine's warm-up failed: {type(e).__name__}: {e}",
            file=sys.stderr, flush=True)
    while not self._stopped.is_set():
      idle = not self._waiting and self.running == 0
      if not self._take_new(block=idle):
        return
      if self._abort.is_set():
        self._abort_all()
      try:
        self._drop_cancelled()
        self._admit()
        self._prefill()
        self._decode()
      except Exception as e:  # pylint: disable=broad-except
        self._fail_all(f"{type(e).__name__}: {e}")
      self._observe()

  def _observe(self):
    m = self.metrics
    if not m:
      return
    m.running.set(self.running)
    m.slot_occupancy.set(self.running / self.slots)
    m.page_occupancy.set(self.pages.in_use / (self.pages.num_pages - 1))
    lookups, hits = self.pages.lookups, self.pages.hits
    m.prefix_lookups.inc(lookups - self._seen_counts[0])
    m.prefix_hits.inc(hits - self._seen_counts[1])
    m.preemptions.inc(self.preemptions - self._seen_counts[2])
    self._seen_counts = (lookups, hits, self.preemptions)

  def _take_new(self, block):
    """Moves queued requests to the waiting line; False once stop() was called."""
    while True:
      try:
        request = self._queue.get(block=block, timeout=None)
      except queue.Empty:
        return True
      if request is None:
        return False
      block = False
      if request is _WAKE:
        continue
      limit = min(request.max_tokens, self.max_len - len(request.prompt_ids))
      for choice in range(request.rows):
        self._waiting.append(_Seq(request, choice, limit=limit,
                                  context=list(request.prompt_ids)))

  def _admit(self):
    while self._waiting and None in self._slots:
      seq = self._waiting[0]
      if seq.request.cancelled:
        self._leave_line()
        seq.finished = "cancelled"
        continue
      digests = paged.page_digests(seq.context[:len(seq.context) - 1], self.page_size)
      reused = []
      for digest in digests:  # the longest cached prefix (leaving one token to compute)
        page = self.pages.lookup(digest)
        if page is None:
          break
        reused.append(page)
      own = paged.pages_for(len(seq.context), self.page_size) - len(reused)
      if own > self.pages.available:
        for page in reused:
          self.pages.release(page)
        return  # wait for pages
      self._leave_line()
      seq.pages = reused + [self.pages.take() for _ in range(own)]
      seq.cached = len(reused) * self.page_size
      seq.slot = self._slots.index(None)
      seq.admitted = self._admissions
      self._admissions += 1
      self._slots[seq.slot] = seq
      context = np.zeros(decode.bucket(len(seq.context)), np.int32)
      context[:len(seq.context)] = seq.context
      with self.loaded.on_mesh():
        self._seen = paged.reset_seen(self._seen, seq.slot, jnp.asarray(context),
                                      len(seq.context))

  def _leave_line(self):
    seq = self._waiting.popleft()
    if seq.queued:  # counted in queue_depth since submit (a preempted one is not again)
      seq.queued = False
      if self.metrics and not seq.request.cancelled:
        self.metrics.prompt_tokens.inc(len(seq.request.prompt_ids))
      with self._lock:
        self._waiting_rows -= 1
        self._gauge()
    return seq

  def _drop_cancelled(self):
    """Sequences whose client went away leave their slots (and pages) now."""
    for seq in [s for s in self._slots if s is not None and s.request.cancelled]:
      seq.finished = "cancelled"
      self._release(seq)

  def _width(self, pages):
    """The page table's width for rows of up to `pages` pages: a power of two, at least
    MIN_POSITIONS positions (few compiled shapes), at most the context."""
    minimum = paged.pages_for(MIN_POSITIONS, self.page_size)
    return min(decode.bucket(pages, minimum=minimum), self.table_width)

  def _table(self, seqs, width):
    table = np.zeros((len(seqs), width), np.int32)
    for i, seq in enumerate(seqs):
      if seq is not None:
        table[i, :min(width, len(seq.pages))] = seq.pages[:width]
    return table

  def _settings(self, rows):
    """The programs' per-row sampling arguments (seeds, tokens generated, temperature,
    top-k, top-p, penalty, whether top log-probabilities are wanted); None rows: idle."""
    setting = lambda f, dtype: _column(rows, lambda s: f(s.request.sampling[s.choice]), dtype)
    return (setting(lambda x: x.seed, jnp.uint32), _column(rows, lambda s: len(s.ids)),
            setting(lambda x: x.temperature, jnp.float32), setting(lambda x: x.top_k, jnp.int32),
            setting(lambda x: x.top_p, jnp.float32),
            setting(lambda x: x.repetition_penalty, jnp.float32),
            _column(rows, lambda s: s.request.logprobs > 0, jnp.bool_))

  def _prefill(self):
    """One chunk for each of up to `prefill_rows` sequences whose context is not all
    cached yet (in turn, so none waits behind a long one)."""
    filling = [s for s in self._slots if s is not None and s.cached < len(s.context)]
    if not filling:
      return
    shift = self._turn % len(filling)
    chosen = (filling[shift:] + filling[:shift])[:self.prefill_rows]
    self._turn += len(chosen)
    rows = self.prefill_rows
    tokens = np.zeros((rows, self.chunk), np.int32)
    pieces = []
    for r, seq in enumerate(chosen):
      piece = seq.context[seq.cached:seq.cached + self.chunk]
      tokens[r, :len(piece)] = piece
      pieces.append(piece)
    width = self._width(max(paged.pages_for(s.cached + len(p), self.page_size)
                            for s, p in zip(chosen, pieces)))
    padded = chosen + [None] * (rows - len(chosen))
    counts = [len(p) for p in pieces] + [0] * (rows - len(chosen))
    with self.loaded.on_mesh():
      self._pools, self._seen, first, logprobs = paged.prefill_chunk(
          self.loaded.model, self.loaded.params, self._pools, self._unembed, self._seen,
          jnp.asarray(self._table(padded, width)), _column(padded, lambda s: s.cached),
          jnp.asarray(tokens), jnp.asarray(counts, jnp.int32),
          _column(padded, lambda s: s.slot, empty=self.slots), *self._settings(padded))
    first, logprobs = jax.device_get((first, logprobs))
    for r, (seq, piece) in enumerate(zip(chosen, pieces)):
      seq.cached += len(piece)
      if seq.cached == len(seq.context):
        for i, digest in enumerate(paged.page_digests(seq.context, self.page_size)):
          self.pages.register(seq.pages[i], digest)
        self._emit(seq, int(first[r]), logprobs, r)

  def _decode(self):
    decoding = [s for s in self._slots if s is not None and s.cached >= len(s.context)
                and not s.finished]
    for seq in sorted(decoding, key=lambda s: s.admitted):
      if seq.slot >= 0 and seq.cached // self.page_size >= len(seq.pages):
        if not self._page_for(seq):
          continue
    decoding = [s for s in decoding if s.slot >= 0]
    if not decoding:
      return
    width = self._width(max(len(s.pages) for s in decoding))
    rows = [s if s in decoding else None for s in self._slots]
    with self.loaded.on_mesh():
      self._pools, self._seen, tokens, logprobs = paged.decode_step(
          self.loaded.model, self.loaded.params, self._pools, self._unembed, self._seen,
          jnp.asarray(self._table(rows, width)), _column(rows, lambda s: s.cached),
          _column(rows, lambda s: s.last), _column(rows, lambda s: True, jnp.bool_),
          *self._settings(rows))
    tokens, logprobs = jax.device_get((tokens, logprobs))
    if self.metrics:
      self.metrics.batch_rows.observe(len(decoding))
    for seq in decoding:
      seq.cached += 1
      self._emit(seq, int(tokens[seq.slot]), logprobs, seq.slot)

  def _page_for(self, seq):
    """A new page for `seq`'s next position, preempting the youngest sequences if none is
    free; False if `seq` itself was preempted."""
    while not self.pages.available:
      youngest = max((s for s in self._slots if s is not None), key=lambda s: s.admitted)
      self._preempt(youngest)
      if youngest is seq:
        return False
    seq.pages.append(self.pages.take())
    return True

  def _preempt(self, seq):
    self.preemptions += 1
    self._release(seq)
    seq.context = list(seq.request.prompt_ids) + list(seq.ids)
    seq.cached = 0
    self._waiting.appendleft(seq)

  def _release(self, seq):
    for page in seq.pages:
      self.pages.release(page)
    seq.pages = []
    if seq.slot >= 0:
      self._slots[seq.slot] = None
    seq.slot = -1

  def _emit(self, seq, token, logprobs=None, row=0):
    seq.last = token
    k = seq.request.logprobs
    if k >= 0 and logprobs is not None:
      chosen, ids, values = logprobs
      seq.request.emit(("logprobs", seq.choice, {
          "id": token, "logprob": float(chosen[row]),
          "top": [(int(i), float(v)) for i, v in zip(ids[row][:k], values[row][:k])]}))
    ids = seq.ids + [token]
    now = time.perf_counter()
    publish(seq, ids, seq.limit, self.loaded, self.metrics, now)
    if seq.finished:
      self._release(seq)
      if self.metrics and seq.finished != "cancelled":
        self.metrics.end_to_end.observe(now - seq.request.submitted)

  def _abort_all(self):
    """Ends every sequence in a slot or in line: its stream gets finish reason "abort"."""
    for seq in [s for s in self._slots if s is not None] + list(self._waiting):
      if not seq.finished:
        seq.finished = "abort"
        seq.request.emit(("done", seq.choice, "abort", len(seq.ids)))
      self._release(seq)
    self._waiting.clear()
    with self._lock:
      self._waiting_rows = 0
      self._gauge()

  def _fail_all(self, message):
    failed = {id(s.request): s.request for s in list(self._waiting) + self._slots if s}
    for seq in [s for s in self._slots if s is not None]:
      self._release(seq)
    self._waiting.clear()
    for request in failed.values():
      request.emit(("error", message))
