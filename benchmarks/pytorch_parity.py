"""Step-by-step parity of lm with the PyTorch reference, from the same initial weights.

    python benchmarks/pytorch_parity.py --data=../shared/data/tiny_shakespeare/input.txt \
        --torch_python=/path/to/python-with-torch [--steps=30]

Trains experiments/shakespeare_char.py in lm for `steps` steps, saves lm's initial
parameters, has benchmarks/pytorch_reference.py train from them on the same batches, and
prints one JSON line with both loss curves' largest difference. Equal implementations agree
to float32 rounding (about 1e-6); a real difference in the model, the optimizer, the
schedule or the data shows up within a few steps.
"""

import json
import os
import subprocess
import sys
import tempfile

from absl import app, flags, logging

_DATA = flags.DEFINE_string("data", None, "Tiny Shakespeare input.txt.")
_TORCH_PYTHON = flags.DEFINE_string("torch_python", sys.executable,
                                    "A Python interpreter that has torch installed.")
_STEPS = flags.DEFINE_integer("steps", 30, "Steps to compare.")
HERE = os.path.dirname(os.path.abspath(__file__))


def main(_):
  logging.set_verbosity(logging.WARNING)
  import jax
  import numpy as np

  from lm import sharding
  from lm.config import load_experiment
  from lm.data import make_data
  from lm.train import Trainer

  config = load_experiment(os.path.join(HERE, "..", "experiments", "shakespeare_char.py"))
  config.data.path = _DATA.value
  data = make_data(config)
  trainer = Trainer(config, data.tokenizer.vocab_size,
                    sharding.make_mesh(config.mesh, jax.devices()[:1]))
  state = trainer.init_state()
  params = jax.device_get(state.params)
  flat = {"/".join(k.key for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  batches = data.train_batches(config.train.batch_size, config.data.seq_len, config.train.seed)
  lm_losses, windows = [], []
  for step in range(_STEPS.value):
    batch = batches[step]
    windows.append(np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1))
    state, metrics = trainer.train_step(state, trainer.shard_batch(batch))
    lm_losses.append(float(metrics["loss"]))

  with tempfile.TemporaryDirectory() as tmp:
    init = os.path.join(tmp, "init.npz")
    np.savez(init, **flat)
    given = os.path.join(tmp, "batches.npz")
    np.savez(given, windows=np.stack(windows))
    out = subprocess.run(
        [_TORCH_PYTHON.value, os.path.join(HERE, "pytorch_reference.py"), f"--data={_DATA.value}",
         f"--steps={_STEPS.value}", f"--decay_steps={config.train.num_steps}", f"--init={init}", f"--print_losses={_STEPS.value}", f"--batches={given}",
         f"--seed={config.train.seed}", f"--lr={config.train.learning_rate}",
         f"--min_lr={config.train.min_learning_rate}"],
        capture_output=True, text=True, check=True).stdout
  torch_losses = [json.loads(line)["loss"] for line in out.splitlines()
                  if '"loss"' in line and '"step"' in line]
  diffs = [abs(a - b) for a, b in zip(lm_losses, torch_losses)]
  print(json.dumps({"benchmark": "pytorch_parity", "steps": _STEPS.value,
                    "max_abs_loss_diff": max(diffs), "lm_last": lm_losses[-1],
                    "torch_last": torch_losses[-1]}))


if __name__ == "__main__":
  flags.mark_flag_as_required("data")
  app.run(main)
