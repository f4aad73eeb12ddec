"""`python -m lm.main` end to end, as a user runs it: train, eval, checkpoint, sample, resume."""

import os
import re
import subprocess
import sys

from conftest import REPO, user_env

TINY = ["--config.train.num_steps=4", "--config.train.warmup_steps=2", "--config.train.log_every=2",
        "--config.train.eval_every=2", "--config.train.eval_steps=2",
        "--config.train.checkpoint_every=2", "--config.model.num_layers=1",
        "--config.model.d_model=32", "--config.model.d_ff=64", "--config.data.seq_len=32",
        "--config.model.max_len=32", "--config.sample.num_tokens=16",
        "--config.data.validation_fraction=0.02", "--config.data.test_fraction=0.02"]


def run_main(*args, cwd, **env):
  return subprocess.run(
      [sys.executable, "-m", "lm.main", f"--config={REPO}/experiments/base.py", *TINY, *args],
      cwd=cwd, env=user_env(PYTHONPATH=REPO, **env), capture_output=True, text=True,
      timeout=300)


def test_main_trains_evaluates_checkpoints_samples_and_resumes(tmp_path):
  cache = str(tmp_path / "xla")
  first = run_main(f"--compilation_cache={cache}", cwd=tmp_path)
  assert first.returncode == 0, first.stderr[-3000:]
  out = first.stdout
  workdir = re.search(r"lm: workdir (\S+)", out).group(1)
  assert os.path.dirname(workdir) == os.path.join(str(tmp_path), "runs")  # fresh default
  assert re.search(r"step +2 \| loss [\d.]+ \| [\d,]+ tok/s \| [\d.]+ ms/step \| MFU", out)
  assert re.search(r"step +2 \| eval loss [\d.]+ \| perplexity", out)
  assert re.search(r"final validation: loss [\d.]+ \| perplexity [\d.]+ over all", out)
  assert "sample (temperature" in out and "\ndef " in out
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  assert "Traceback" not in first.stderr

  assert {"jit_train_step", "jit_eval_step", "jit__prefill", "jit__decode"} <= {
      n.rsplit("-", 2)[0] for n in os.listdir(cache)}

  # JAX_LOG_COMPILES makes JAX report each persistent cache hit.
  longer = run_main(f"--workdir={workdir}", "--config.train.num_steps=6",
                    f"--compilation_cache={cache}", cwd=tmp_path, JAX_LOG_COMPILES="1")
  assert longer.returncode == 0, longer.stderr[-3000:]
  # The resumed run loads the programs it shares with the first (its train step differs:
  # the schedule's length is part of it).
  for name in ("jit_eval_step", "jit__prefill", "jit__decode"):
    assert f"Persistent compilation cache hit for '{name}'" in longer.stderr, name
  assert "resumed from step 4" in longer.stdout
  assert "step      6 | loss" in longer.stdout and "step      2 | loss" not in longer.stdout
