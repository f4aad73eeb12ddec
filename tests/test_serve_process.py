"""`python -m lm.serve` as a process: the API key, the body size limit, and SIGTERM (new
requests refused, the stream in flight ended with a finish reason, exit status 0)."""

import json
import signal
import socket
import subprocess
import sys
import time

import httpx
import jax
import pytest
from conftest import REPO, tiny_config, user_env

from lm import loop


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("serve") / "run")
  loop.run(tiny_config(**{"train.num_steps": 2, "sample.num_tokens": 0, "data.seq_len": 64,
                          "model.max_len": 128}), workdir, devices=jax.devices()[:1])
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  process = subprocess.Popen(
      [sys.executable, "-m", "lm.serve", f"--workdir={workdir}", f"--port={port}",
       "--max_body_bytes=2000", "--drain_s=0.2", "--max_batch=2"],
      cwd=REPO, env=user_env(LM_API_KEY="sesame"), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  url = f"http://127.0.0.1:{port}"
  deadline = time.time() + 180
  while True:
    assert process.poll() is None and time.time() < deadline, process.stderr.read()
    try:
      if httpx.get(f"{url}/readyz").status_code == 200:
        break
    except httpx.TransportError:
      pass
    time.sleep(0.2)
  yield process, url
  if process.poll() is None:
    process.kill()


def _completion(url, key="sesame", **body):
  headers = {"Authorization": f"Bearer {key}"} if key else {}
  return httpx.post(f"{url}/v1/completions", headers=headers,
                    json={"model": "run", "prompt": "def ", "max_tokens": 4, **body})


def test_the_api_key_guards_the_api_and_bodies_have_a_limit(served):
  _, url = served
  assert httpx.get(f"{url}/healthz").status_code == 200  # liveness stays open
  for key in (None, "wrong"):
    r = _completion(url, key=key)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
  assert httpx.get(f"{url}/metrics").status_code == 401
  assert _completion(url).status_code == 200
  r = _completion(url, prompt="x" * 3000)
  assert r.status_code == 413 and "2000 bytes" in r.json()["error"]["message"]


def test_sigterm_ends_the_stream_in_flight_and_exits_0(served):
  process, url = served
  headers = {"Authorization": "Bearer sesame"}
  body = {"model": "run", "prompt": "def ", "max_tokens": 100, "stream": True,
          "temperature": 1.0}
  reasons = []
  with httpx.stream("POST", f"{url}/v1/completions", headers=headers, json=body,
                    timeout=120) as stream:
    for line in stream.iter_lines():
      if line.startswith("data: {"):
        if not reasons:
          process.send_signal(signal.SIGTERM)
          reasons.append(None)
        reasons.append(json.loads(line[6:])["choices"][0]["finish_reason"])
  assert reasons[-1] in ("abort", "length", "stop")  # ended with a reason, not cut
  stdout, _ = process.communicate(timeout=60)
  assert process.returncode == 0 and "draining" in stdout and "lm: stopped" in stdout
