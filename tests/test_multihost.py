"""Two processes (4 fake CPU devices each, gloo collectives) train as one 8-device job
through jax.distributed: the same losses as one process with 8 devices, Orbax checkpoints
written together, and a SIGTERM to both handled at one agreed step, then resumed."""

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, metrics_records, user_env

ARGS = ["--config.data.path=" + os.path.join(os.path.dirname(os.__file__), "argparse.py"),
        "--config.data.tokenizer=char", "--config.data.seq_len=16", "--config.model.max_len=16",
        "--config.model.num_layers=1", "--config.model.d_model=32", "--config.model.d_ff=64",
        "--config.train.batch_size=16", "--config.train.warmup_steps=2",
        "--config.train.log_every=1", "--config.train.eval_every=1000",
        "--config.train.eval_steps=2", "--config.sample.num_tokens=8",
        "--config.mesh.data=4", "--config.mesh.fsdp=2"]


def launch(workdir, devices, *args, process=None):
  cmd = [sys.executable, "-m", "lm.main", f"--config={REPO}/experiments/base.py",
         f"--workdir={workdir}", *ARGS, *args]
  if process is not None:
    cmd += [f"--coordinator_address=127.0.0.1:{process[0]}", "--num_processes=2",
            f"--process_id={process[1]}"]
  env = user_env(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                 JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def two_processes(workdir, *args):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  return [launch(workdir, 4, *args, process=(port, i)) for i in range(2)]


def losses(workdir):
  out = {}
  for record in metrics_records(workdir):
    if "train/loss" in record:
      out[record["step"]] = record["train/loss"]
  return out


def finish(process, timeout=300):
  stdout, stderr = process.communicate(timeout=timeout)
  return process.returncode, stdout, stderr


@pytest.mark.slow
def test_two_processes_equal_one_process_and_survive_sigterm(tmp_path):
  """Preempted mid-run and resumed, two processes give the losses of one process trained
  straight through (a constant learning rate after warm-up: the schedule does not depend
  on num_steps, which the runs differ in)."""
  constant = ["--config.train.learning_rate=1e-3", "--config.train.min_learning_rate=1e-3",
              "--config.train.checkpoint_every=1000"]
  # Preemption: SIGTERM to both; they stop at one agreed step, save it, and exit 75.
  workdir = str(tmp_path / "multi")
  procs = two_processes(workdir, "--config.train.num_steps=100000", *constant)
  deadline = time.time() + 240
  while time.time() < deadline:
    if os.path.exists(os.path.join(workdir, "metrics.jsonl")) and len(losses(workdir)) >= 3:
      break
    time.sleep(0.2)
  for p in procs:
    p.send_signal(signal.SIGTERM)
  results = [finish(p) for p in procs]
  assert [r[0] for r in results] == [75, 75], results[0][2][-2000:] + results[1][2][-2000:]
  saved = [int(r[2].split("saved a checkpoint at step ")[1].split(";")[0]) for r in results]
  assert saved[0] == saved[1]
  assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(saved[0])]

  # Resumed to two steps past it; beside it, one process of 8 devices, straight through.
  total = saved[0] + 2
  resumed = two_processes(workdir, f"--config.train.num_steps={total}", *constant)
  single = launch(str(tmp_path / "single"), 8, f"--config.train.num_steps={total}", *constant)
  results = [finish(p) for p in resumed]
  code, _, err = finish(single)
  assert code == 0, err[-3000:]
  assert [r[0] for r in results] == [0, 0], results[0][2][-3000:] + results[1][2][-3000:]
  assert f"resumed from step {saved[0]}" in results[0][1]
  assert "final validation" in results[0][1] and "sample (" in results[0][1]
  want, got = losses(str(tmp_path / "single")), losses(workdir)
  assert sorted(got) == list(range(1, total + 1)) == sorted(want)
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                             rtol=1e-5)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == [
      str(saved[0]), str(total)]
