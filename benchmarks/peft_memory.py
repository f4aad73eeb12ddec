"""Full fine-tuning versus LoRA (and BitFit) of the imported MiniLM on SST-2: dev accuracy,
trainable parameters, optimizer-state bytes, peak RSS, checkpoint size and speed.

    python benchmarks/peft_memory.py [--methods=lora,full,bitfit] [--steps=0] [--root=DIR]

Each method is one `python -m lm.main` run in its own process (experiments/sst2_minilm.py,
experiments/sst2_minilm_lora.py, and sst2_minilm.py with peft.method=bitfit), so its peak
resident memory is its own (os.wait4). --steps=0 trains each experiment's full schedule (the
accuracy comparison, tens of minutes each on 2 CPU cores); a few dozen steps measure memory,
sizes and speed only. Prints one JSON line per method.
"""

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags, logging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = {
    "full": ("experiments/sst2_minilm.py", []),
    "lora": ("experiments/sst2_minilm_lora.py", []),
    "bitfit": ("experiments/sst2_minilm.py",
               ["--config.peft.method=bitfit", "--config.train.learning_rate=1e-3",
                "--config.train.min_learning_rate=1e-4", "--config.train.head_learning_rate=0",
                "--config.train.warmup_steps=100"]),
}

_METHODS = flags.DEFINE_string("methods", "lora,full,bitfit", "Comma-separated: " +
                               ", ".join(METHODS))
_STEPS = flags.DEFINE_integer("steps", 0, "Train steps per method; 0: the experiment's own.")
_ROOT = flags.DEFINE_string("root", "", "Where the workdirs go; '': a temporary folder.")


def _run(method, workdir):
  config, overrides = METHODS[method]
  command = [sys.executable, "-m", "lm.main", f"--config={os.path.join(REPO, config)}",
             f"--workdir={workdir}", "--overwrite", *overrides]
  if _STEPS.value:
    command += [f"--config.train.num_steps={_STEPS.value}",
                f"--config.train.eval_every={max(_STEPS.value // 2, 1)}",
                f"--config.train.warmup_steps={min(10, _STEPS.value)}"]
  start = time.perf_counter()
  with open(os.path.join(workdir + ".log"), "w", encoding="utf-8") as log:
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
  wall = time.perf_counter() - start
  with open(workdir + ".log", encoding="utf-8") as f:
    output = f.read()
  if process.returncode:
    sys.exit(f"{method} failed ({process.returncode}); see {workdir}.log:\n{output[-3000:]}")
  return output, usage.ru_maxrss * 1024, wall  # ru_maxrss is in KiB on Linux


def _folder_bytes(path):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _checkpoint_figures(workdir):
  """(trainable parameter count, optimizer-state bytes, newest checkpoint's bytes)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from lm.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  checkpointer = Checkpointer(workdir, keep=None)
  step = checkpointer.all_steps()[0]
  tree = checkpointer.manager.item_metadata(step)["state"].tree
  checkpointer.close()
  size = lambda t: sum(int(np.prod(m.shape)) * np.dtype(m.dtype).itemsize
                       for m in jax.tree.leaves(t))
  trainable = sum(int(np.prod(m.shape)) for m in jax.tree.leaves(tree["params"]))
  return trainable, size(tree["opt_state"]), _folder_bytes(
      os.path.join(workdir, "checkpoints", str(step)))


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  root = _ROOT.value or tempfile.mkdtemp(prefix="peft-benchmark-")
  os.makedirs(root, exist_ok=True)
  for method in _METHODS.value.split(","):
    workdir = os.path.join(root, method)
    output, peak_rss, wall = _run(method, workdir)
    total = int(re.search(r"model ([\d,]+) parameters", output).group(1).replace(",", ""))
    trainable, opt_bytes, checkpoint_bytes = _checkpoint_figures(workdir)
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      records = [json.loads(line) for line in f]
    evals = [r for r in records if "eval/accuracy" in r]
    best = max(evals, key=lambda r: r["eval/accuracy"])
    ms = [r["perf/ms_per_step"] for r in records if "perf/ms_per_step" in r][1:]  # no compile
    print(json.dumps({
        "benchmark": "peft_memory", "method": method, "steps": records[-1]["step"],
        "dev_accuracy": round(best["eval/accuracy"], 4), "best_step": best["step"],
        "trainable_params": trainable, "total_params": total,
        "trainable_fraction": round(trainable / total, 4),
        "optimizer_state_mib": round(opt_bytes / 2**20, 2),
        "checkpoint_mib": round(checkpoint_bytes / 2**20, 2),
        "peak_rss_mib": round(peak_rss / 2**20), "s_per_step": round(
            statistics.median(ms) / 1000, 3) if ms else None,
        "wall_s": round(wall), "workdir": workdir}), flush=True)


if __name__ == "__main__":
  app.run(main)
