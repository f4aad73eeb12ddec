"""Activation memory of the compiled train step under each remat policy (and with gradient
accumulation), from XLA's own memory analysis: no step is run.

    python benchmarks/remat_memory.py --config=experiments/base.py [--accum=1,4]

Prints one JSON line per setting: temporary (activation) bytes, argument bytes, compile s.
"""

import json
import time

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file.")
_ACCUM = flags.DEFINE_string("accum", "1,4", "Comma-separated grad_accum_steps values.")


def main(_):
  logging.set_verbosity(logging.WARNING)
  import jax
  import jax.numpy as jnp

  from lm import sharding
  from lm.train import Trainer

  for accum in (int(a) for a in _ACCUM.value.split(",")):
    for policy in ("none", "dots", "full"):
      config = _CONFIG.value.copy_and_resolve_references()
      config.model.remat, config.train.grad_accum_steps = policy, accum
      trainer = Trainer(config, 256, sharding.make_mesh(config.mesh, jax.devices()[:1]))
      b, length = config.train.batch_size, config.data.seq_len
      batch = {k: jax.ShapeDtypeStruct((b, length), jnp.int32 if k != "weights" else jnp.float32,
                                       sharding=trainer.batch_sharding)
               for k in ("inputs", "targets", "weights", "segment_ids", "positions")}
      start = time.perf_counter()
      with trainer.on_mesh():
        compiled = trainer.lower_train_step(batch).compile()
      seconds = time.perf_counter() - start
      memory = compiled.memory_analysis()
      print(json.dumps({"benchmark": "remat_memory", "remat": policy, "grad_accum_steps": accum,
                        "batch_size": b, "seq_len": length,
                        "num_layers": config.model.num_layers,
                        "temp_mib": round(memory.temp_size_in_bytes / 2**20, 2),
                        "argument_mib": round(memory.argument_size_in_bytes / 2**20, 2),
                        "compile_s": round(seconds, 2)}), flush=True)


if __name__ == "__main__":
  app.run(main)
