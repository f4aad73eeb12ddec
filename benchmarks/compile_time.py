"""Compile seconds of the train step against depth, with and without model.scan_layers,
and of the initialiser.

    python benchmarks/compile_time.py --config=experiments/base.py [--layers=2,8,24,48]

Lowers and compiles the jitted train step (nothing runs) and prints one JSON line per
(layers, scan) setting. `init_compile_s` is the initialiser's compile time with the options
init_state uses (lm/model_setup.py, INIT_COMPILER_OPTIONS), `init_compile_default_s` at XLA's
default optimisation level.
"""

import json
import time

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file.")
_LAYERS = flags.DEFINE_string("layers", "2,8,24,48", "Comma-separated depths.")


def main(_):
  logging.set_verbosity(logging.WARNING)
  import jax
  import jax.numpy as jnp

  from lm import sharding
  from lm.train import Trainer

  for layers in (int(x) for x in _LAYERS.value.split(",")):
    for scan in (False, True):
      config = _CONFIG.value.copy_and_resolve_references()
      config.model.num_layers, config.model.scan_layers = layers, scan
      start = time.perf_counter()
      trainer = Trainer(config, 261, sharding.make_mesh(config.mesh, jax.devices()[:1]))
      b, s = config.train.batch_size, config.data.seq_len
      batch = {k: jax.ShapeDtypeStruct((b, s), jnp.float32 if k == "weights" else jnp.int32,
                                       sharding=trainer.batch_sharding)
               for k in ("inputs", "targets", "weights", "segment_ids", "positions")}
      lowered = trainer.lower_train_step(batch)
      traced = time.perf_counter()
      with trainer.on_mesh():
        lowered.compile()
      done = time.perf_counter()
      init = trainer.lower_init()
      init_start = time.perf_counter()
      init.compile()
      init_done = time.perf_counter()
      init.compile(compiler_options={"xla_backend_optimization_level": 3})
      print(json.dumps({"benchmark": "compile_time", "num_layers": layers, "scan_layers": scan,
                        "trace_lower_s": round(traced - start, 2),
                        "compile_s": round(done - traced, 2),
                        "total_s": round(done - start, 2),
                        "init_compile_s": round(init_done - init_start, 2),
                        "init_compile_default_s": round(time.perf_counter() - init_done, 2)}),
            flush=True)


if __name__ == "__main__":
  app.run(main)
