"""Config defaults and validation, both derived from the one schema (lm/schema.py).

Every experiment starts from `defaults()` and changes what it needs; `validate()` then checks
the result against the same schema, so a misspelt field, a wrong type or an impossible
combination stops the run at start with one line that names the field. The per-field checks
(type, choices, bounds) come from the schema; the combinations of fields are checked here.
"""

import difflib
import importlib.util
import math
import os
import re

import ml_collections
from ml_collections import config_dict

from lm import schema, tasks
from lm.errors import ConfigError, UserError
from lm.trees import flatten

DTYPES = schema.DTYPES


def load_experiment(path):
  """`get_config()` of an experiment file, e.g. experiments/base.py (as --config loads it)."""
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0],
                                                path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def defaults():
  """Every field lm knows, with its default (lm/schema.py). Experiments override these."""
  c = ml_collections.ConfigDict()
  for field in schema.FIELDS:
    section, _, key = field.name.rpartition(".")
    target = c
    if section:
      if section not in c:
        c[section] = ml_collections.ConfigDict()
      target = c[section]
    target[key] = (config_dict.placeholder(field.type) if field.default is None
                   else field.default)
  return c


_REGISTRIES = {"objectives": tasks.OBJECTIVES}  # schema.Registry choices


def _check_field(field, value):
  """The field's type, choices and bound."""
  expected = field.value_type
  if value is None:
    if field.default is not None:
      raise ConfigError(field.name, f"must be a {expected.__name__}, got None")
    return
  if expected is int and isinstance(value, bool):
    raise ConfigError(field.name, f"must be an int, got {value!r}")
  if expected is tuple and isinstance(value, list):  # a tuple read back from JSON
    value = tuple(value)
  if not isinstance(value, expected) and not (
      expected is float and isinstance(value, int) and not isinstance(value, bool)):
    raise ConfigError(field.name, f"must be a {expected.__name__}, got {value!r}")
  choices = field.choices
  if isinstance(choices, schema.Registry):
    choices = _REGISTRIES[choices.name]
  if choices is not None and value not in choices:
    raise ConfigError(field.name, f"must be one of {', '.join(choices)}; got {value!r}")
  if field.bound == schema.POSITIVE and not value > 0:
    raise ConfigError(field.name, f"must be > 0, got {value!r}")
  if field.bound == schema.NON_NEGATIVE and value < 0:
    raise ConfigError(field.name, f"must be >= 0, got {value!r}")
  if field.bound == schema.UNIT and not 0.0 <= value < 1.0:
    raise ConfigError(field.name, f"must be in [0, 1), got {value}")


def _unknown(name, known):
  close = difflib.get_close_matches(name, list(known), n=1)
  hint = f"; did you mean {close[0]}?" if close else ""
  return ConfigError(name, f"unknown field{hint}")


def validate(config, num_devices):
  """Raises ConfigError naming the first bad field; returns the config otherwise."""
  _check_fields(config)
  _check_model(config)
  _check_training(config)
  _check_task(config)
  _check_mesh(config, num_devices)
  return config


def _check_fields(config):
  """Every field known, present, and of its type, choices and bounds (lm/schema.py)."""
  sections = {f.name.split(".")[0] for f in schema.FIELDS}
  for section in config.keys():
    if not isinstance(config[section], ml_collections.ConfigDict) and section not in sections:
      raise _unknown(section, sections)
  flat = flatten(config, ".")
  for name, value in flat.items():
    if name not in schema.BY_NAME:
      raise _unknown(name, schema.BY_NAME)
  for field in schema.FIELDS:
    if field.name not in flat:
      raise ConfigError(field.name, "missing; start experiments from lm.config.defaults()")
    _check_field(field, flat[field.name])


def _check_model(config):
  """The model's fields against each other, and against the objective's architecture."""
  m = config.model
  if not m.head_size and m.d_model % m.num_heads:
    raise ConfigError("model.d_model",
                      f"{m.d_model} is not divisible by model.num_heads={m.num_heads}")
  if m.num_heads % m.num_kv_heads:
    raise ConfigError("model.num_kv_heads",
                      f"{m.num_kv_heads} does not divide model.num_heads={m.num_heads}")
  head_size = m.head_size or m.d_model // m.num_heads
  if m.positions == "rope" and head_size % 2:
    raise ConfigError("model.positions", f"rope needs an even head size, got {head_size}")
  if m.global_every and not m.sliding_window:
    raise ConfigError("model.global_every", "alternates local layers with global ones: "
                      "set model.sliding_window too")
  if m.global_every and m.scan_layers:
    raise ConfigError("model.scan_layers", "one scanned layer serves every layer, and "
                      f"model.global_every={m.global_every} makes layers differ; set "
                      "scan_layers=False")
  if m.rope_local_theta and not m.sliding_window:
    raise ConfigError("model.rope_local_theta", "is the local layers' RoPE base: set "
                      "model.sliding_window too")
  if m.vocab_size is not None and m.vocab_size <= 0:
    raise ConfigError("model.vocab_size", f"must be > 0 or None, got {m.vocab_size}")
  if tasks.get(config.task.objective).architecture == "encoder_decoder":
    decoder_only = {"norm_position": ("sandwich",), "sliding_window": None,
                    "attn_softcap": None, "final_softcap": None}
    for key, values in decoder_only.items():
      if (m[key] in values) if values else m[key]:
        raise ConfigError(f"model.{key}", f"{m[key]!r} is not taken by encoder-decoders "
                          "(decoders and encoders take it)")
  if m.pooler and config.task.pooling != "cls":
    raise ConfigError("task.pooling", "model.pooler pools the first token; use cls with it")


def _check_training(config):
  """Data splits, schedule, PEFT and the closing sample."""
  m, t, d = config.model, config.train, config.data
  if d.seq_len > m.max_len:
    raise ConfigError("data.seq_len", f"{d.seq_len} exceeds model.max_len={m.max_len}")
  if d.validation_fraction <= 0:
    raise ConfigError("data.validation_fraction", "must be > 0: evaluation needs data")
  if d.validation_fraction + d.test_fraction >= 1:
    raise ConfigError("data.test_fraction",
                      "validation_fraction + test_fraction must leave data for training")
  if t.min_learning_rate > t.learning_rate:
    raise ConfigError("train.min_learning_rate",
                      f"{t.min_learning_rate} exceeds train.learning_rate={t.learning_rate}")
  if t.warmup_steps > t.num_steps:
    raise ConfigError("train.warmup_steps",
                      f"{t.warmup_steps} exceeds train.num_steps={t.num_steps}")
  if config.peft.method:
    if not config.init_from:
      raise ConfigError("peft.method", f"{config.peft.method} fine-tunes a pretrained model; "
                        "set config.init_from to one (an lm workdir, or hf:FOLDER)")
    try:
      re.compile(config.peft.targets)
    except re.error as e:
      raise ConfigError("peft.targets", f"{config.peft.targets!r} is not a regular "
                        f"expression ({e})") from None
  if d.mixture:
    from lm.data import mixture  # pylint: disable=import-outside-toplevel
    if d.format != "chat" or d.path:
      raise ConfigError("data.mixture", "mixes chat datasets: set data.format=chat and leave "
                        "data.path empty (each source has its own path)")
    mixture.check(d.mixture)
  if config.sample.num_tokens and not config.sample.prompt:
    raise ConfigError("sample.prompt", "must not be empty when sample.num_tokens > 0")


def _check_task(config):
  """The objective's own checks, and the evaluations that decode (which need a decoder)."""
  objective = config.task.objective
  tasks.get(objective).check_config(config)
  decodes = tasks.get(objective).architecture == "decoder"
  if config.task.eval_generate:
    if not decodes:
      raise ConfigError("task.eval_generate", "scores what a decoder generates; "
                        f"{objective} trains no decoder")
    if not config.task.eval_data:
      raise ConfigError("task.eval_data", f"names the {config.task.eval_generate} file "
                        "task.eval_generate scores")
  if config.eval.harness_tasks:
    if not decodes:
      raise ConfigError("eval.harness_tasks", "lm-evaluation-harness scores a decoder; "
                        f"{objective} trains no decoder")
    if any(not name.strip() for name in config.eval.harness_tasks.split(",")):
      raise ConfigError("eval.harness_tasks", f"{config.eval.harness_tasks!r}: task names, "
                        "comma-separated")


def _check_mesh(config, num_devices):
  """The mesh fits the devices, and the batch splits over its data axes."""
  t = config.train
  mesh_shape = resolve_mesh_shape(config.mesh, num_devices)
  data_shards = mesh_shape[0] * mesh_shape[1]
  if t.batch_size % data_shards:
    raise ConfigError("train.batch_size",
                      f"{t.batch_size} is not divisible by mesh.data*mesh.fsdp={data_shards}")
  if t.batch_size % (t.grad_accum_steps * data_shards):
    raise ConfigError("train.grad_accum_steps",
                      f"train.batch_size={t.batch_size} does not split into "
                      f"{t.grad_accum_steps} micro-batches of a multiple of "
                      f"mesh.data*mesh.fsdp={data_shards} rows")


def resolve_mesh_shape(mesh, num_devices):
  """(data, fsdp, tensor) with a -1 entry filled in; checks the product is num_devices."""
  names = ("data", "fsdp", "tensor")
  sizes = [mesh[n] for n in names]
  for n, s in zip(names, sizes):
    if s == 0 or s < -1:
      raise ConfigError(f"mesh.{n}", f"must be a positive size or -1, got {s}")
  free = [n for n, s in zip(names, sizes) if s == -1]
  if len(free) > 1:
    raise ConfigError(f"mesh.{free[1]}", "only one mesh axis may be -1")
  fixed = math.prod(s for s in sizes if s != -1)
  if free:
    if num_devices % fixed:
      raise ConfigError(f"mesh.{free[0]}",
                        f"-1 cannot fill the mesh: {num_devices} devices, "
                        f"other axes use {fixed}")
    sizes = [num_devices // fixed if s == -1 else s for s in sizes]
  elif fixed != num_devices:
    raise ConfigError("mesh",
                      f"data*fsdp*tensor = {fixed} but there {'is' if num_devices == 1 else 'are'} "
                      f"{num_devices} device{'' if num_devices == 1 else 's'}")
  return tuple(sizes)
