"""Entry point: `python -m lm.main --config=experiments/base.py [--workdir=DIR] [--config.a.b=v]`.

Wires the config to lm.loop.run; every error a user can cause ends in one line on stderr
and exit status 2.
"""

import datetime
import logging as std_logging
import os
import sys

from absl import app, flags, logging
import ml_collections
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file (get_config()).")
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Run folder; resumes if it holds checkpoints. Default: a new "
                               "folder under ./runs/.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False,
                               "Discard what an earlier run left in --workdir (checkpoints, "
                               "metrics) instead of resuming from it.")
# Several processes (hosts) train one model through JAX's own distributed runtime. Give the
# three flags, or --distributed alone where JAX finds them itself (Cloud TPU VMs, SLURM).
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0's coordination service.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Initialise jax.distributed from the environment.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", None,
    "Folder of XLA's persistent compilation cache: a rerun of the same programs (a resumed "
    "or repeated run, a sweep's next trial) loads them instead of compiling. Default: "
    "$JAX_COMPILATION_CACHE_DIR, else $LM_CACHE_DIR/xla (~/.cache/lm/xla); '' turns it off.")

# Exit statuses: 0 done; 2 bad input (config, data, checkpoint, workdir); 3 the loss or
# gradients became NaN/Inf (train.nonfinite=stop); 75 preempted (SIGTERM/SIGINT): a
# checkpoint was saved, run the same command again (EX_TEMPFAIL, "try again").
EXIT_USER_ERROR, EXIT_NONFINITE, EXIT_PREEMPTED = 2, 3, 75


def fail(message, status=EXIT_USER_ERROR):
  print(f"lm: error: {message}", file=sys.stderr, flush=True)
  sys.exit(status)


def parse_flags(argv):
  """absl's parser, with config override errors (unknown field, bad value) on one line."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    text = str(e.args[0]) if isinstance(e, (AttributeError, KeyError)) and e.args else str(e)
    text = text.replace("\\'", "'").replace("\\n", " ")
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
      text = text[1:-1]
    if isinstance(e, (AttributeError, KeyError)):
      text = f"unknown config field {text}"
    fail(" ".join(text.split()))


def default_workdir(config_path):
  name = os.path.splitext(os.path.basename(config_path or "run"))[0]
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  path = os.path.join("runs", f"{name}-{stamp}")
  suffix = 1
  while os.path.exists(path):
    path = os.path.join("runs", f"{name}-{stamp}-{suffix}")
    suffix += 1
  return path


def loaded_config():
  """The --config experiment with its --config.* overrides, or one line and exit 2."""
  config = _CONFIG.value
  if config is None:
    fail("--config is required, e.g. --config=experiments/base.py")
  if not isinstance(config, ml_collections.ConfigDict):  # config_flags defers load errors
    path = config_flags.get_config_filename(flags.FLAGS["config"])
    try:
      config.keys()
      reason = f"get_config() returned {type(config).__name__}, not a ConfigDict"
    except Exception as e:  # pylint: disable=broad-except
      cause = e.__cause__ or e
      reason = " ".join(str(cause).splitlines()[-1].split())
    fail(f"--config={path}: cannot load the experiment: {reason}")
  return config


def use_compilation_cache(path):
  """Turns on JAX's persistent compilation cache in `path` (None: the default folder)."""
  import jax  # pylint: disable=import-outside-toplevel
  from lm.data.corpus import cache_dir  # pylint: disable=import-outside-toplevel
  if path is None:
    path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(cache_dir(), "xla")
  if not path:
    return
  jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    # JAX's default (1 s) would leave out a small model's evaluation and decoding programs.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.3)


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
  # A failed background save is reported by lm in one line; asyncio would add a traceback.
  std_logging.getLogger("asyncio").setLevel(std_logging.CRITICAL)
  from lm.errors import NonFiniteLoss, Preempted, UserError  # late: --help stays fast
  from lm.loop import run
  config = loaded_config()
  use_compilation_cache(_COMPILATION_CACHE.value)
  given = [f for f in (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID) if f.value is not None]
  if given and len(given) < 3:
    fail("--coordinator_address, --num_processes and --process_id go together")
  if given or _DISTRIBUTED.value:
    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU-only jobs
    try:
      jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    except Exception as e:  # pylint: disable=broad-except
      fail(f"jax.distributed.initialize failed: {' '.join(str(e).split())[:300]}")
  if _WORKDIR.value is None and (given or _DISTRIBUTED.value):
    fail("--workdir is required with several processes (they must share it)")
  workdir = _WORKDIR.value or default_workdir(
      config_flags.get_config_filename(flags.FLAGS["config"]))
  try:
    run(config, workdir, overwrite=_OVERWRITE.value)
  except UserError as e:
    fail(str(e))
  except NonFiniteLoss as e:
    fail(str(e), EXIT_NONFINITE)
  except Preempted as e:
    print(f"lm: {e}", file=sys.stderr, flush=True)
    sys.exit(EXIT_PREEMPTED)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
