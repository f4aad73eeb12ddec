"""The OpenAI-compatible server: the official client, streaming, batching, bad requests."""

import asyncio
import json
import socket
import threading
import time

import flax.linen as nn
import httpx
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
import uvicorn

from conftest import tiny_config
from lm import decode, sharding
from lm.data import CharTokenizer
from lm.inference import Loaded
from lm.models import Decoder, ModelConfig
from lm.serve import make_app

TEXT = "the quick brown fox jumps over the lazy dog.\n"


@pytest.fixture(scope="module")
def loaded():
  tokenizer = CharTokenizer.train([TEXT])
  cfg = ModelConfig(vocab_size=tokenizer.vocab_size, num_layers=2, num_heads=2,
                    num_kv_heads=1, d_model=32, d_ff=64, max_len=160, positions="rope")
  model = Decoder(cfg)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  params["embed"]["embedding"] = params["embed"]["embedding"] * 20  # no near-ties
  config = tiny_config()
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  return Loaded(model=model, params=params, tokenizer=tokenizer, config=config, step=7,
                mesh=mesh)


class Server:
  """uvicorn in a thread on a free port."""

  def __init__(self, api):
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      self.port = s.getsockname()[1]
    self.server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=self.port,
                                                log_level="warning"))
    self.thread = threading.Thread(target=self.server.run, daemon=True)
    self.thread.start()
    deadline = time.time() + 120
    while not self.server.started:
      assert time.time() < deadline and self.thread.is_alive(), "server did not start"
      time.sleep(0.05)
    self.url = f"http://127.0.0.1:{self.port}"

  def close(self):
    self.server.should_exit = True
    self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(loaded):
  s = Server(make_app(loaded, "tiny", max_batch=8, window_s=0.02, queue_limit=64, chunk=4))
  yield s
  s.close()


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def expected(loaded, prompt, max_tokens, **sampling):
  """The completion computed directly, without the server."""
  s = decode.Sampling(**{"temperature": 0.0, **sampling})
  return loaded.complete([prompt], max_tokens, s)[0]


def test_the_openai_client_gets_completions(client, loaded):
  out = client.completions.create(model="tiny", prompt="the quick", max_tokens=12,
                                  temperature=0)
  assert out.object == "text_completion" and out.model == "tiny"
  assert out.choices[0].text == expected(loaded, "the quick", 12)
  assert out.choices[0].finish_reason in ("length", "stop")
  assert out.usage.prompt_tokens == 10  # bos + 9 characters
  assert out.usage.completion_tokens >= len(out.choices[0].text)
  assert [m.id for m in client.models.list().data] == ["tiny"]


def test_streaming_sends_the_same_text_in_pieces(client, loaded):
  stream = client.completions.create(model="tiny", prompt="lazy", max_tokens=20,
                                     temperature=0, stream=True)
  pieces, reasons = [], []
  for chunk in stream:
    pieces.append(chunk.choices[0].text)
    reasons.append(chunk.choices[0].finish_reason)
  assert len([p for p in pieces if p]) > 1  # more than one chunk of text
  assert "".join(pieces) == expected(loaded, "lazy", 20)
  assert reasons[-1] in ("length", "stop") and not any(reasons[:-1])


def test_several_prompts_n_choices_seeds_and_stop_strings(client, loaded):
  out = client.completions.create(model="tiny", prompt=["fox", "dog"], n=2, max_tokens=10,
                                  temperature=1.0, seed=5)
  assert [c.index for c in out.choices] == [0, 1, 2, 3]
  again = client.completions.create(model="tiny", prompt=["fox", "dog"], n=2, max_tokens=10,
                                    temperature=1.0, seed=5)
  assert [c.text for c in again.choices] == [c.text for c in out.choices]
  full = expected(loaded, "the", 16)
  stop = full[3:5]
  cut = client.completions.create(model="tiny", prompt="the", max_tokens=16, temperature=0,
                                  stop=[stop])
  assert cut.choices[0].text == full[:full.index(stop)]
  assert cut.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("body,status,fragment", [
    ('{"model": "tiny", "prompt": "a", "max_tokens": ', 400, "not valid JSON"),
    ({"model": "tiny", "prompt": "a", "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "a", "max_tokens": -3}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "a", "max_tokens": 10**9}, 400, "maximum context length"),
    ({"model": "tiny", "prompt": "a", "temperature": 3}, 400, "temperature"),
    ({"model": "tiny", "prompt": "a", "n": 100}, 400, "n"),
    ({"model": "tiny", "prompt": "a", "frequency_penalty": 1}, 400, "frequency_penalty"),
    ({"model": "tiny", "prompt": 5}, 400, "prompt"),
    ({"model": "tiny", "prompt": "a", "stop": ["x"] * 5}, 400, "stop"),
    ({"prompt": "a"}, 400, "model"),
    ({"model": "gpt-4", "prompt": "a"}, 404, "does not exist"),
])
def test_bad_requests_get_openai_shaped_4xx_errors(server, body, status, fragment):
  content = body if isinstance(body, str) else json.dumps(body)
  r = httpx.post(f"{server.url}/v1/completions", content=content,
                 headers={"content-type": "application/json"}, timeout=60)
  assert r.status_code == status, r.text
  error = r.json()["error"]
  assert set(error) == {"message", "type", "param", "code"}
  assert fragment in error["message"]
  assert httpx.get(f"{server.url}/healthz").json()["status"] == "ok"  # still serving


def _chat_expected(loaded, messages, max_tokens):
  """The reply decoded directly: the template-rendered ids, greedy, cut at the end of turn."""
  ids = loaded.chat_ids(messages)
  with loaded.on_mesh():
    out = decode.generate(loaded.model, loaded.params, [ids], max_tokens,
                          decode.Sampling(temperature=0.0), loaded.stop_ids)[0]
  return loaded.tokenizer.decode(out).split("<|im_end|>")[0], len(ids)


def test_chat_completions_render_the_template_and_stream_with_usage(client, loaded):
  messages = [{"role": "system", "content": "be brief"},
              {"role": "user", "content": "the lazy fox"}]
  text, prompt_tokens = _chat_expected(loaded, messages, 10)
  out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                       temperature=0)
  assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
  assert out.choices[0].message.content == text
  assert out.usage.prompt_tokens == prompt_tokens
  again = client.chat.completions.create(model="tiny", messages=messages, temperature=0,
                                         max_completion_tokens=10)
  assert again.choices[0].message.content == text
  chunks = list(client.chat.completions.create(
      model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True,
      stream_options={"include_usage": True}))
  assert chunks[0].choices[0].delta.role == "assistant"
  assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
  assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == prompt_tokens
  assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens
  parts = client.chat.completions.create(  # content as text parts
      model="tiny", temperature=0, max_tokens=10, messages=[
          messages[0], {"role": "user", "content": [{"type": "text", "text": "the lazy "},
                                                    {"type": "text", "text": "fox"}]}])
  assert parts.choices[0].message.content == text


@pytest.mark.parametrize("body,fragment", [
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "unknown role 'wizard'"),
    ({"messages": [{"role": "user"}]}, "a user message needs content"),
    ({"messages": []}, "at least one message"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
     "top_logprobs needs logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
     "less than or equal to 20"),
    ({"messages": [{"role": "user", "content": "fox " * 40}], "max_tokens": 8},
     "maximum context length is 160"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "only text parts"),
])
def test_bad_chat_requests_are_openai_shaped_400s(server, body, fragment):
  r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "tiny", **body})
  assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text


def _log_softmax(loaded, ids):
  logits = np.asarray(loaded.model.apply({"params": loaded.params}, jnp.asarray([ids])),
                      np.float64)[0]
  top = logits.max(-1, keepdims=True)
  return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def test_logprobs_are_the_model_s_own(client, loaded):
  """Each token's log-probability and its alternatives' equal a direct forward pass over
  the prompt and the tokens before it; streamed, they arrive with the text."""
  out = client.completions.create(model="tiny", prompt="the lazy", max_tokens=6,
                                  temperature=0, logprobs=3)
  lp = out.choices[0].logprobs
  prompt = loaded.encode_prompt("the lazy")
  ids = prompt + [loaded.tokenizer.encode(t)[0] for t in lp.tokens]
  logp = _log_softmax(loaded, ids)
  for i, (token, value, top) in enumerate(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs)):
    row = logp[len(prompt) - 1 + i]
    assert value == pytest.approx(row[ids[len(prompt) + i]], abs=1e-4)
    best = np.argsort(-row)[:3]
    assert list(top) == [loaded.tokenizer.decode([int(b)]) for b in best]
    assert list(top.values()) == pytest.approx(list(row[best]), abs=1e-4)
    assert list(top)[0] == token  # greedy: the likeliest
  assert "".join(lp.tokens) == out.choices[0].text
  assert lp.text_offset == list(np.cumsum([0] + [len(t) for t in lp.tokens[:-1]]))
  messages = [{"role": "user", "content": "the fox"}]
  chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5,
                                        temperature=0, logprobs=True, top_logprobs=2)
  content = chat.choices[0].logprobs.content
  assert len(content) == chat.usage.completion_tokens
  assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token and
             c.bytes == list(c.token.encode()) for c in content)
  streamed = [c for chunk in client.chat.completions.create(
      model="tiny", messages=messages, max_tokens=5, temperature=0, logprobs=True, stream=True)
              for ch in chunk.choices if ch.logprobs for c in ch.logprobs.content]
  assert [(c.token, round(c.logprob, 5)) for c in streamed] == [
      (c.token, round(c.logprob, 5)) for c in content]
  assert all(c.top_logprobs == [] for c in streamed)  # top_logprobs 0: the tokens only


def test_echo_returns_the_prompt_and_scores_it(client, loaded):
  """echo with max_tokens 0 scores a prompt (what lm-evaluation-harness asks a server
  for); with tokens to generate, the text starts with the prompt."""
  scored = client.completions.create(model="tiny", prompt="the lazy dog", max_tokens=0,
                                     echo=True, logprobs=2)
  lp = scored.choices[0].logprobs
  ids = loaded.encode_prompt("the lazy dog")
  assert scored.choices[0].text == "the lazy dog" and scored.usage.completion_tokens == 0
  assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
  logp = _log_softmax(loaded, ids)
  np.testing.assert_allclose(lp.token_logprobs[1:], [logp[i - 1, ids[i]]
                                                    for i in range(1, len(ids))], atol=1e-4)
  for i, top in enumerate(lp.top_logprobs[1:], 1):  # the two likeliest, by their text
    best = np.argsort(-logp[i - 1], kind="stable")[:2]
    want = {}
    for b in best:
      want.setdefault(loaded.tokenizer.decode([int(b)]), float(logp[i - 1, b]))
    assert top.keys() == want.keys()
    assert list(top.values()) == pytest.approx(list(want.values()), abs=1e-4)
  out = client.completions.create(model="tiny", prompt="fox", max_tokens=6, temperature=0,
                                  echo=True)
  assert out.choices[0].text == "fox" + expected(loaded, "fox", 6)
  streamed = "".join(c.choices[0].text for c in client.completions.create(
      model="tiny", prompt="fox", max_tokens=6, temperature=0, echo=True, stream=True))
  assert streamed == out.choices[0].text
  bad = httpx.post(f"{client.base_url}completions",
                   json={"model": "tiny", "prompt": "a", "max_tokens": 0})
  assert bad.status_code == 400 and "for echo" in bad.json()["error"]["message"]


def test_32_concurrent_clients_all_get_their_answers(server, loaded):
  prompts = [TEXT[i:i + 3 + i % 5] for i in range(32)]

  async def ask(c, prompt):
    r = await c.post(f"{server.url}/v1/completions", json={
        "model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]

  async def main():
    async with httpx.AsyncClient(timeout=300) as c:
      return await asyncio.gather(*(ask(c, p) for p in prompts))

  def rows_and_steps():
    metrics = httpx.get(f"{server.url}/metrics").text
    value = lambda name: next(float(line.split()[-1]) for line in metrics.splitlines()
                              if line.startswith(name))
    return value("lm_batch_rows_sum"), value("lm_batch_rows_count")

  rows, steps = rows_and_steps()
  answers = asyncio.run(main())
  assert answers == [expected(loaded, p, 8) for p in prompts]
  more_rows, more_steps = rows_and_steps()
  # Decoded together (8 slots), not one by one: several completions per decode step.
  assert (more_rows - rows) / (more_steps - steps) >= 4


def test_metrics_count_requests_errors_and_latency(server, client):
  client.completions.create(model="tiny", prompt="a", max_tokens=3)
  httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "a", "n": 0})
  text = httpx.get(f"{server.url}/metrics").text
  for name in ("lm_requests_total", "lm_request_errors_total", "lm_queue_depth",
               "lm_time_to_first_token_seconds_bucket",
               "lm_time_per_output_token_seconds_bucket", "lm_generated_tokens_total"):
    assert name in text, name
  assert 'lm_requests_total{endpoint="/v1/completions",status="400"}' in text


def test_readiness_and_the_engine_s_own_metrics(server, client):
  deadline = time.time() + 120  # 503 until the warm-up compiles are done, then 200
  while (ready := httpx.get(f"{server.url}/readyz")).status_code == 503:
    assert ready.json() == {"ready": False, "model": "tiny"} and time.time() < deadline
    time.sleep(0.05)
  assert ready.status_code == 200 and ready.json() == {"ready": True, "model": "tiny"}
  prompt = TEXT * 2  # 90 characters: five full pages of 16, then cached
  for _ in range(2):
    client.completions.create(model="tiny", prompt=prompt[:40], max_tokens=2)
  metrics = {line.split()[0]: float(line.split()[-1])
             for line in httpx.get(f"{server.url}/metrics").text.splitlines()
             if line and not line.startswith("#")}
  for name in ("lm_running_requests", "lm_slot_occupancy", "lm_page_occupancy",
               "lm_preemptions_total", "lm_prompt_tokens_total", "lm_request_seconds_count"):
    assert name in metrics, name
  assert metrics["lm_prefix_cache_hits_total"] >= 2  # the second prompt's two full pages
  assert metrics["lm_prefix_cache_lookups_total"] >= metrics["lm_prefix_cache_hits_total"]
  assert metrics["lm_page_occupancy"] == 0.0 and metrics["lm_running_requests"] == 0.0


def test_a_full_queue_answers_429_and_recovers(loaded):
  s = Server(make_app(loaded, "tiny", max_batch=1, window_s=0.0, queue_limit=2, chunk=1))
  try:
    async def ask(c):
      r = await c.post(f"{s.url}/v1/completions", json={
          "model": "tiny", "prompt": "the", "max_tokens": 40, "temperature": 0})
      return r.status_code, r.json()

    async def main():
      async with httpx.AsyncClient(timeout=300) as c:
        return await asyncio.gather(*(ask(c) for _ in range(12)))

    results = asyncio.run(main())
    codes = [code for code, _ in results]
    assert 429 in codes and 200 in codes
    refused = next(body for code, body in results if code == 429)
    assert refused["error"]["code"] == "queue_full"
    r = httpx.post(f"{s.url}/v1/completions", json={"model": "tiny", "prompt": "a",
                                                    "max_tokens": 2}, timeout=60)
    assert r.status_code == 200
  finally:
    s.close()
