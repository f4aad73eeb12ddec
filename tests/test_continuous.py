"""The continuous-batching engine over a paged KV cache (lm/continuous.py, lm/paged.py):
the paged model equals the contiguous one; every request's tokens equal decoding it alone
(lm/decode.py), with requests of mixed lengths and settings joining and leaving at random
moments, under preemption and with prefix-cache hits; every page comes back."""

import random
import threading
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from lm import continuous, decode, loop, paged
from lm.engine import Request
from lm.inference import load
from lm.models import Decoder, ModelConfig


@pytest.mark.parametrize("scan,window", [(False, 0), (True, 0), (False, 5)])
def test_paged_attention_equals_the_uncached_model(scan, window):
  """Chunks and single tokens through a scrambled page table give the logits of one
  uncached pass over the whole sequence."""
  cfg = ModelConfig(vocab_size=50, num_layers=2, num_heads=4, num_kv_heads=2, d_model=32,
                    d_ff=64, max_len=64, positions="rope", scan_layers=scan,
                    sliding_window=window)
  model = Decoder(cfg)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 50, (2, 23))
  full = np.asarray(model.apply({"params": params}, jnp.asarray(tokens)))
  table = np.zeros((2, 8), np.int32)
  order = rng.permutation(np.arange(1, 20))
  table[0, :6], table[1, :6] = order[:6], order[6:12]
  cache = {"table": jnp.asarray(table), "lengths": jnp.zeros(2, jnp.int32),
           "counts": jnp.asarray([7, 5], jnp.int32), "layers": paged.init_pools(cfg, 20, 4)}
  chunk = np.zeros((2, 7), np.int32)
  chunk[0], chunk[1, :5] = tokens[0, :7], tokens[1, :5]  # row 1: 5 tokens and padding
  apply = jax.jit(lambda x, c: model.apply({"params": params}, x, cache=c))
  logits, cache = apply(jnp.asarray(chunk), cache)
  np.testing.assert_allclose(np.asarray(logits)[0], full[0, :7], atol=1e-5)
  np.testing.assert_allclose(np.asarray(logits)[1, :5], full[1, :5], atol=1e-5)
  lengths = [7, 5]
  for _ in range(12):
    cache["counts"] = jnp.ones(2, jnp.int32)
    step = np.asarray([[tokens[0, lengths[0]]], [tokens[1, lengths[1]]]], np.int32)
    logits, cache = apply(jnp.asarray(step), cache)
    for b in range(2):
      np.testing.assert_allclose(np.asarray(logits)[b, 0], full[b, lengths[b]], atol=1e-5)
    lengths = [n + 1 for n in lengths]
  assert list(np.asarray(cache["lengths"])) == lengths


def test_pages_count_references_and_keep_prefixes_until_needed():
  pages = paged.Pages(4, 2)
  a, b = pages.take(), pages.take()
  digests = paged.page_digests([1, 2, 3, 4, 5], 2)
  assert len(digests) == 2 and digests != paged.page_digests([9, 2, 3, 4], 2)
  pages.register(a, digests[0])
  pages.release(a)
  pages.release(b)
  assert pages.available == 3 and pages.in_use == 0
  assert pages.lookup(digests[0]) == a and pages.hits == 1  # cached, held again
  pages.release(a)
  taken = [pages.take() for _ in range(3)]  # the free ones first, then the cached one
  assert taken[-1] == a and pages.lookup(digests[0]) is None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("continuous") / "run")
  loop.run(tiny_config(**{"train.num_steps": 3, "sample.num_tokens": 0, "data.seq_len": 64,
                          "model.max_len": 96}), workdir, devices=jax.devices()[:1])
  return load(workdir)


def _alone(loaded, prompt, max_tokens, sampling):
  """The prompt decoded alone by lm/decode.py. Always 24 tokens, cut to max_tokens: a
  row's tokens do not depend on how many follow, and one output length compiles less."""
  return _decoded(loaded, [(prompt, max_tokens, [sampling])])[0]


def _decoded(loaded, requests):
  """(text, tokens) of each request by lm/decode.py's contiguous cache: one left-padded
  batch (each row's tokens are those of the row alone: tests/test_decode.py), 24 tokens
  each, cut to the request's max_tokens."""
  with loaded.on_mesh():
    rows = decode.generate(loaded.model, loaded.params, [p for p, _, _ in requests], 24,
                           [s[0] for _, _, s in requests], loaded.stop_ids)
  return [(loaded.tokenizer.decode(ids[:m]), len(ids[:m]))
          for ids, (_, m, _) in zip(rows, requests)]


def _requests(loaded, n, seed):
  rng = random.Random(seed)
  text = "def parse(args):\n    return [a.strip() for a in args if a] # the parser's core"
  out = []
  for i in range(n):
    prompt = loaded.encode_prompt(text[:rng.randint(1, len(text))])
    settings = [decode.Sampling(temperature=0.0)] if i % 3 == 0 else [
        decode.Sampling(temperature=0.9, top_k=rng.choice([0, 5]), top_p=rng.choice([1.0, 0.8]),
                        repetition_penalty=rng.choice([1.0, 1.3]), seed=100 + i)]
    out.append((prompt, rng.randint(1, 24), settings))
  return out


def _serve(engine, requests, seed):
  """Submits the requests at random moments from another thread; returns each one's text
  and completion tokens once all are done."""
  results = [{"text": "", "done": None} for _ in requests]
  finished = threading.Semaphore(0)

  def emit_for(i):
    def emit(event):
      if event[0] == "delta":
        results[i]["text"] += event[2]
      elif event[0] == "done":
        results[i]["done"] = (event[2], event[3])
        finished.release()
      else:
        results[i]["done"] = event
        finished.release()
    return emit

  rng = random.Random(seed)
  engine.start(warmup=False)
  try:
    for i, (prompt, max_tokens, sampling) in enumerate(requests):
      engine.submit(Request(prompt, max_tokens, sampling, [], emit_for(i)))
      time.sleep(rng.choice([0.0, 0.0, 0.01, 0.05]))
    for _ in requests:
      assert finished.acquire(timeout=300)
  finally:
    engine.stop()
  return results


@pytest.mark.parametrize("num_pages,chunk", [(0, 8), (30, 5)])
def test_every_request_equals_decoding_it_alone(tiny, num_pages, chunk):
  """Mixed prompts, lengths and settings through 4 slots. With 29 usable pages of 4
  positions the pool cannot hold four long rows: the youngest are preempted and
  recomputed, and still give the same tokens."""
  requests = _requests(tiny, 10, seed=num_pages)
  engine = continuous.ContinuousEngine(tiny, max_batch=4, chunk=chunk, page_size=4,
                                       num_pages=num_pages)
  results = _serve(engine, requests, seed=1)
  for (prompt, _, _), got, (text, count) in zip(requests, results, _decoded(tiny, requests)):
    assert got["text"] == text and got["done"][1] == count, (prompt, got, text)
  if num_pages:
    assert engine.preemptions > 0
  assert engine.running == 0 and engine.pages.in_use == 0  # every page came back


def test_a_prefix_cache_hit_gives_the_same_tokens(tiny):
  prompt = tiny.encode_prompt("import os\nimport sys\n\ndef main(argv):\n    return 0\n")
  engine = continuous.ContinuousEngine(tiny, max_batch=2, chunk=8, page_size=4)
  greedy = [decode.Sampling(temperature=0.0)]
  first = _serve(engine, [(prompt, 12, greedy)], seed=0)
  hits = engine.pages.hits
  engine2 = continuous.ContinuousEngine(tiny, max_batch=2, chunk=8, page_size=4)
  engine2.pages, engine2._pools = engine.pages, engine._pools  # pylint: disable=protected-access
  again = _serve(engine2, [(prompt, 12, greedy), (prompt + prompt[:3], 12, greedy)], seed=0)
  assert engine.pages.hits - hits >= 2 * ((len(prompt) - 1) // 4)
  assert again[0] == first[0]
  assert again[1]["text"] == _alone(tiny, prompt + prompt[:3], 12, greedy[0])[0]


def test_a_client_gone_frees_its_slot_and_what_cannot_fit_is_refused(tiny):
  engine = continuous.ContinuousEngine(tiny, max_batch=2, chunk=8, page_size=4, num_pages=9)
  with pytest.raises(continuous.TooLong, match="need 10 pages of 4; the pool has 8"):
    engine.submit(Request([1] * 20, 20, [decode.Sampling()], [], print))
  with pytest.raises(continuous.TooLong, match="context is 96"):
    engine.submit(Request([1] * 96, 1, [decode.Sampling()], [], print))
  engine = continuous.ContinuousEngine(tiny, max_batch=2, chunk=8, page_size=4)
  started = threading.Event()
  request = Request(tiny.encode_prompt("x = 1"), 80, [decode.Sampling(temperature=0.0)], [],
                    lambda e: started.set())
  engine.start(warmup=False)
  try:
    engine.submit(request)
    assert started.wait(60)
    request.cancelled = True
    deadline = time.time() + 30
    while engine.running and time.time() < deadline:
      time.sleep(0.01)
    assert engine.running == 0 and engine.pages.in_use == 0
  finally:
    engine.stop()


def test_warm_up_compiles_every_program_requests_need(tiny):
  """After the warm-up, requests of any length compile none of the engine's programs."""
  import logging  # pylint: disable=import-outside-toplevel
  engine = continuous.ContinuousEngine(tiny, max_batch=2, chunk=8, page_size=4)
  assert engine.widths() == [16, 24]  # 64 positions at least, the context (96) at most
  compiled = []
  handler = logging.Handler()
  handler.emit = lambda record: compiled.append(record.getMessage())
  logger = logging.getLogger("jax._src.interpreters.pxla")
  requests = [(tiny.encode_prompt("x" * n), 30, [decode.Sampling(temperature=0.0)])
              for n in (3, 50, 70)]
  engine.start(warmup=True)
  try:
    assert engine.ready.wait(300)
    logger.addHandler(handler)
    jax.config.update("jax_log_compiles", True)  # globally: the engine runs in a thread
    engine.stop()
    engine = continuous.ContinuousEngine(tiny, max_batch=2, chunk=8, page_size=4)
    _serve(engine, requests, seed=0)
  finally:
    jax.config.update("jax_log_compiles", False)
    logger.removeHandler(handler)
    engine.stop()
  names = ("decode_step", "prefill_chunk", "reset_seen")
  assert not [m for m in compiled if any(f"jit({n})" in m for n in names)], compiled
