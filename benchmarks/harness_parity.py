"""lm-evaluation-harness parity: lm's model ("lm") and lm-eval's own `hf` model on
SmolLM2-135M-Instruct, the same local tasks, in one process, one after the other.

    python benchmarks/harness_parity.py [--tasks=lm_sst2,lm_truthfulqa_pairs,...]
        [--limits=lm_gsm_symbolic=100,lm_squad=500,lm_gutenberg=3] [--max_length=2048]
        [--batch_size=16] [--root=runs] [--data_dir=../shared/data]

lm reads runs/smollm2 (the GGUF imported by lm.interop.hf import; made if missing);
transformers reads the same GGUF file itself (its own dequantisation and tokenizer), in
float32, like lm. Both get the same max_length and batch size. Prints one JSON line per task
and backend (scores, stderr, wall time), then one per task comparing them: the score
difference, the largest per-request log-likelihood difference (loglikelihood tasks), the
share of identical generations (generate_until tasks).
"""

import json
import os
import sys
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "experiments"))
from smollm_sft_squad import smollm2_file  # noqa: E402  pylint: disable=wrong-import-position

_TASKS = flags.DEFINE_string("tasks", "lm_sst2,lm_truthfulqa_pairs,lm_gsm_symbolic,lm_squad,"
                             "lm_gutenberg", "Comma-separated harness tasks.")
_LIMITS = flags.DEFINE_string("limits", "lm_gsm_symbolic=100,lm_squad=500,lm_gutenberg=3",
                              "task=N: the first N documents of a task (others: all).")
_MAX_LENGTH = flags.DEFINE_integer("max_length", 2048, "Both models' context for scoring.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Requests per batch, both models.")
_ROOT = flags.DEFINE_string("root", "runs", "Where the SmolLM2 import is (or goes).")
_DATA = flags.DEFINE_string("data_dir", None, "The local tasks' data (default ../shared/data).")
_BACKENDS = flags.DEFINE_string("backends", "lm,hf", "Which models to run, in order.")


def _lm_model(workdir):
  from lm import harness  # pylint: disable=import-outside-toplevel
  return harness.HarnessModel(workdir=workdir, batch_size=_BATCH.value,
                              max_length=_MAX_LENGTH.value)


def _hf_model(gguf):
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from lm_eval.models.huggingface import HFLM  # pylint: disable=import-outside-toplevel
  folder, name = os.path.split(gguf)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      folder, gguf_file=name, dtype=torch.float32).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=_BATCH.value,
              max_length=_MAX_LENGTH.value, device="cpu")


def _per_request(samples):
  """{doc_id: [response per request]} of one task's logged samples."""
  return {s["doc_id"]: s["filtered_resps"] for s in samples}


def _compare(task, a, b):
  """How far the two backends' per-request answers are apart."""
  out = {"task": task, "compare": "lm vs hf"}
  ra, rb = _per_request(a), _per_request(b)
  common = sorted(set(ra) & set(rb))
  lls, same = [], []
  for doc in common:
    for x, y in zip(ra[doc], rb[doc]):
      if isinstance(x, (list, tuple)):  # (log-likelihood, is_greedy)
        lls.append(abs(float(x[0]) - float(y[0])))
      elif isinstance(x, (int, float)):  # rolling log-likelihood
        lls.append(abs(float(x) - float(y)))
      else:  # generated text
        same.append(x == y)
  if lls:
    out["max_loglikelihood_diff"] = max(lls)
    out["mean_loglikelihood_diff"] = sum(lls) / len(lls)
    out["requests"] = len(lls)
  if same:
    out["identical_generations"] = sum(same) / len(same)
    out["requests"] = len(same)
  return out


def main(argv):
  del argv
  from lm import harness  # pylint: disable=import-outside-toplevel
  from lm.interop import hf  # pylint: disable=import-outside-toplevel
  gguf = smollm2_file()
  workdir = os.path.join(_ROOT.value, "smollm2")
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    hf.import_checkpoint(gguf, workdir)
  limits = dict(item.split("=") for item in _LIMITS.value.split(",") if item)
  tasks = [t for t in _TASKS.value.split(",") if t]
  samples = {}
  for backend in _BACKENDS.value.split(","):
    started = time.time()
    model = _lm_model(workdir) if backend == "lm" else _hf_model(gguf)
    load_s = time.time() - started
    for task in tasks:
      started = time.time()
      result = harness.run(model, [task], limit=int(limits[task]) if task in limits else None,
                           data_dir=_DATA.value, samples=True)
      wall = time.time() - started
      samples[backend, task] = result.pop("samples")[task]
      print(json.dumps({"task": task, "backend": backend, **result[task],
                        "wall_s": round(wall, 1), "load_s": round(load_s, 1),
                        "max_length": _MAX_LENGTH.value, "batch_size": _BATCH.value,
                        "dtype": "float32"}), flush=True)
  for task in tasks:
    if ("lm", task) in samples and ("hf", task) in samples:
      print(json.dumps(_compare(task, samples["lm", task], samples["hf", task])), flush=True)


if __name__ == "__main__":
  app.run(main)
