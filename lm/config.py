"""Shared config defaults and validation.

Every experiment starts from `defaults()` and changes what it needs; `validate()` then checks
the result against the same schema, so a misspelt field, a wrong type or an impossible
combination stops the run at start with one line that names the field.
"""

import difflib
import importlib.util
import math
import os
import re

import ml_collections
from ml_collections import config_dict

from lm import tasks
from lm.errors import ConfigError, UserError
from lm.trees import flatten

DTYPES = ("float32", "bfloat16", "float16")


def load_experiment(path):
  """`get_config()` of an experiment file, e.g. experiments/base.py (as --config loads it)."""
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0],
                                                path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def defaults():
  """Every field lm knows, with its default. Experiments override these."""
  c = ml_collections.ConfigDict()
  # Start from a pretrained lm workdir (its best checkpoint, else its latest): its model
  # architecture and tokenizer are used, its parameters loaded, and a task head that it lacks
  # is initialised afresh. "": train from scratch.
  c.init_from = ""

  c.task = ml_collections.ConfigDict()
  # causal: decoder LM on text | mlm: encoder, masked LM on text | classification /
  # regression: encoder + pooled head on a labelled dataset | tagging: encoder + per-token
  # head on a tagged dataset | seq2seq: encoder-decoder on a parallel dataset (translation)
  # | span_corruption: encoder-decoder, T5's pretraining on text. See lm/tasks/.
  c.task.objective = "causal"
  c.task.num_labels = 0  # classification / tagging; 0: as many as the dataset has
  # cls: the first token (the tokenizer's bos, BERT's [CLS]), through the encoder's pooler
  # with model.pooler | mean: the mean over non-padding tokens
  c.task.pooling = "cls"
  # Of the training loss of token predictions (causal, mlm, seq2seq): the target becomes
  # (1 - e) one-hot + e uniform. Evaluation losses never smooth.
  c.task.label_smoothing = 0.0
  # seq2seq: the final validation and test figures include corpus BLEU and chrF (sacrebleu)
  # of beam-search translations: beam size (1: greedy) and GNMT length penalty alpha.
  c.task.beam_size = 4
  c.task.length_penalty = 0.6
  c.task.bleu_sentences = 0  # score only N sentences of each split, a quicker figure (0: all)

  # Parameter-efficient fine-tuning of init_from's model (lm/peft.py): "" trains every
  # parameter | lora: low-rank adapters on the dense projections `targets` names | bitfit:
  # the bias vectors only. The task head always trains.
  c.peft = ml_collections.ConfigDict()
  c.peft.method = ""
  c.peft.rank = 8
  c.peft.alpha = 16.0  # the adapters' output is scaled by alpha / rank
  c.peft.dropout = 0.0  # on the adapters' input, in training
  # re.search over each Dense's module path: encoder/layer_0/attn/{query,key,value,out},
  # .../mlp/{wi,wo} (wi_gate, wi_up with swiglu); decoders have no encoder/ prefix.
  c.peft.targets = r"attn/(query|value)$"

  c.model = ml_collections.ConfigDict()
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.num_kv_heads = 4  # < num_heads: grouped-query attention; 1: multi-query.
  c.model.d_model = 128
  c.model.d_ff = 512
  # None: the tokenizer's vocabulary size. Larger values pad the embedding table.
  c.model.vocab_size = config_dict.placeholder(int)
  # Token ids after the vocabulary: span corruption's sentinels (T5 keeps 100). An
  # encoder-decoder pretrained with them and one fine-tuned from it share the embedding.
  c.model.extra_tokens = 0
  c.model.max_len = 256
  c.model.dropout = 0.0
  c.model.dtype = "float32"  # compute dtype
  c.model.param_dtype = "float32"
  c.model.norm = "layernorm"  # layernorm | rmsnorm
  c.model.norm_eps = 1e-5
  c.model.norm_position = "pre"  # pre (GPT-2, Llama) | post (BERT: norm after each residual)
  c.model.positions = "learned"  # learned | rope
  c.model.rope_theta = 10000.0
  c.model.mlp = "gelu"  # gelu (exact, erf) | gelu_tanh (GPT-2's approximation) | swiglu
  c.model.use_bias = False
  c.model.tie_embeddings = True
  c.model.type_vocab_size = 0  # > 0: BERT's token-type (sentence A/B) embeddings
  c.model.pooler = False  # encoders: BERT's pooler, tanh(dense(first token)), for task heads
  # Activation rematerialisation per block: none | full (recompute the whole block in the
  # backward pass) | dots (keep matmul outputs, recompute the rest).
  c.model.remat = "none"
  c.model.scan_layers = False  # one nn.scan over stacked layers: compile time flat in depth

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 12
  # Micro-batches per step: the same update as one batch of batch_size, in 1/n the
  # activation memory (the micro-batches run one after another inside the jitted step).
  c.train.grad_accum_steps = 1
  # Train steps per dispatch from Python: n > 1 runs up to n steps as one compiled scan over
  # n batches, paying the host's per-call work once (on a CPU, small models train a third
  # faster or more). Logging, evaluation and checkpoints still happen at their steps: a
  # dispatch ends at each of them. The updates are those of single steps.
  c.train.steps_per_dispatch = 1
  c.train.num_steps = 1000
  c.train.learning_rate = 1e-3
  c.train.min_learning_rate = 1e-4  # end of the cosine decay
  c.train.warmup_steps = 100
  c.train.b1 = 0.9
  c.train.b2 = 0.99
  c.train.weight_decay = 0.1  # applied to matrices and embeddings, not to norms or biases
  c.train.grad_clip = 1.0  # global norm; 0 disables clipping
  c.train.head_learning_rate = 0.0  # > 0: the task head's own peak rate (same schedule)
  # > 0: stop after this many evaluations in a row without a better validation score
  # (lm/tasks/ says which score). The best checkpoint is kept in workdir/best either way.
  c.train.early_stopping = 0
  c.train.eval_every = 250
  # Batches per periodic eval of a language model; 0: the whole validation split. Task
  # scores (accuracy, F1, correlations) always cover the whole split.
  c.train.eval_steps = 20
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 3
  c.train.log_every = 50
  # A step whose loss or gradients are NaN/Inf never changes the parameters. Then
  # stop: end the run naming the step (checkpoints stay as they were); skip: go on, counted
  # in train/skipped_steps.
  c.train.nonfinite = "stop"  # stop | skip
  # float16 compute loses small gradients unless the loss is scaled: dynamic scaling starts
  # at 2**15, halves on an overflow (that step is skipped, counted in train/skipped_steps)
  # and doubles after 2,000 finite steps; train/loss_scale logs it. auto: dynamic with
  # model.dtype float16, none otherwise.
  c.train.loss_scale = "auto"  # auto | dynamic | none
  c.train.seed = 0  # the one seed: initialisation, data order, dropout and sampling
  # > 0: write a jax.profiler trace of this many steps (from the third step of the run) to
  # workdir/profile, for TensorBoard's profile plugin.
  c.train.profile_steps = 0

  c.data = ml_collections.ConfigDict()
  # Used when `path` is empty: python_stdlib (built in, offline), a TFDS catalog dataset:
  # tiny_shakespeare | lm1b | wmt14_translate | glue/sst2 | imdb_reviews (downloaded once),
  # or multi30k (format parallel; lm/data/downloads.py fetches it once).
  c.data.name = "python_stdlib"
  c.data.path = ""  # local data; overrides `name`. Its layout depends on `format`:
  # text: a text file or a folder of them | parallel: a folder of <split>.<language>[.gz]
  # files | labelled: a folder of <split>.tsv / <split>.csv files with a header line.
  c.data.format = "text"  # text | parallel | labelled
  c.data.data_dir = ""  # where built datasets are cached; "": ~/.cache/lm/tfds
  # byte | char | unigram | bpe (SentencePiece, trained on the train split) | pretrained
  # (init_from's own, e.g. an imported Hugging Face tokenizer)
  c.data.tokenizer = "byte"
  c.data.vocab_size = 4096  # for unigram / bpe
  c.data.seq_len = 128
  c.data.validation_fraction = 0.05  # of a text corpus (by character for a single file)
  c.data.test_fraction = 0.05
  c.data.source_language = "en"  # parallel: file suffixes (source -> target)
  c.data.target_language = "de"
  c.data.label_column = "label"  # labelled: header names; "" text_column: the other column
  c.data.text_column = ""
  c.data.num_threads = 2  # Grain threads tokenizing and assembling batches
  # > 0: batches of labelled / tagged / parallel examples are cut to their longest example
  # (source and target each), rounded up to a multiple of this (one compilation per
  # length); 0: always seq_len. Single-process runs only (processes would cut one global
  # batch differently).
  c.data.length_bucket = 16

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: every device not used by the other axes
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  c.log = ml_collections.ConfigDict()
  c.log.peak_flops = 0.0  # per device, for MFU; 0: look up the device kind

  c.sample = ml_collections.ConfigDict()
  c.sample.prompt = "\n"
  c.sample.num_tokens = 200
  c.sample.temperature = 0.8
  c.sample.top_k = 40  # 0: no top-k filtering
  return c


_CHOICES = {
    "model.dtype": DTYPES,
    "model.param_dtype": DTYPES,
    "model.norm": ("layernorm", "rmsnorm"),
    "model.norm_position": ("pre", "post"),
    "task.objective": tasks.OBJECTIVES,
    "task.pooling": ("cls", "mean"),
    "peft.method": ("", "lora", "bitfit"),
    "model.positions": ("learned", "rope"),
    "model.mlp": ("gelu", "gelu_tanh", "swiglu"),
    "model.remat": ("none", "full", "dots"),
    "data.format": ("text", "parallel", "labelled", "tagged"),
    "data.tokenizer": ("byte", "char", "unigram", "bpe", "pretrained"),
    "train.nonfinite": ("stop", "skip"),
    "train.loss_scale": ("auto", "dynamic", "none"),
}

_POSITIVE = (
    "model.num_layers", "model.num_heads", "model.num_kv_heads", "model.d_model",
    "model.d_ff", "model.max_len", "train.batch_size", "train.num_steps",
    "train.grad_accum_steps", "train.steps_per_dispatch", "peft.rank", "peft.alpha",
    "task.beam_size",
    "train.learning_rate", "train.eval_every", "train.checkpoint_every",
    "train.keep_checkpoints", "train.log_every", "data.seq_len", "data.vocab_size",
    "data.num_threads",
)

_NON_NEGATIVE = (
    "train.min_learning_rate", "train.warmup_steps", "task.length_penalty",
    "train.head_learning_rate", "train.early_stopping", "task.num_labels",
    "task.bleu_sentences", "model.type_vocab_size", "data.length_bucket", "model.extra_tokens",
    "train.weight_decay", "train.grad_clip",
    "train.eval_steps", "train.profile_steps", "log.peak_flops", "sample.num_tokens",
    "sample.temperature",
    "sample.top_k", "data.validation_fraction", "data.test_fraction",
)


def _check_schema(flat, schema, schema_types):
  for name, value in flat.items():
    if name not in schema:
      close = difflib.get_close_matches(name, list(schema), n=1)
      hint = f"; did you mean {close[0]}?" if close else ""
      raise ConfigError(name, f"unknown field{hint}")
    expected = schema_types[name]
    if value is None:
      if schema[name] is not None:
        raise ConfigError(name, f"must be a {expected.__name__}, got None")
      continue
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
      continue
    if expected is int and isinstance(value, bool):
      raise ConfigError(name, f"must be an int, got {value!r}")
    if not isinstance(value, expected):
      raise ConfigError(name, f"must be a {expected.__name__}, got {value!r}")


def validate(config, num_devices):
  """Raises ConfigError naming the first bad field; returns the config otherwise."""
  schema_dict = defaults()
  schema = flatten(schema_dict, ".")
  schema_types = {}
  for name, value in schema.items():
    if value is None:  # placeholders carry their type on the FieldReference
      section, key = name.split(".")
      schema_types[name] = schema_dict[section].get_ref(key).get_type()
    else:
      schema_types[name] = type(value)
  for section in config.keys():
    if not isinstance(config[section], ml_collections.ConfigDict) and section not in schema:
      close = difflib.get_close_matches(section, [n.split(".")[0] for n in schema], n=1)
      hint = f"; did you mean {close[0]}?" if close else ""
      raise ConfigError(section, f"unknown field{hint}")
  flat = flatten(config, ".")
  _check_schema(flat, schema, schema_types)
  for name in schema:
    if name not in flat:
      raise ConfigError(name, "missing; start experiments from lm.config.defaults()")

  for name, choices in _CHOICES.items():
    if flat[name] not in choices:
      raise ConfigError(name, f"must be one of {', '.join(choices)}; got {flat[name]!r}")
  for name in _POSITIVE:
    if not flat[name] > 0:
      raise ConfigError(name, f"must be > 0, got {flat[name]!r}")
  for name in _NON_NEGATIVE:
    if flat[name] < 0:
      raise ConfigError(name, f"must be >= 0, got {flat[name]!r}")

  m, t, d = config.model, config.train, config.data
  if m.d_model % m.num_heads:
    raise ConfigError("model.d_model",
                      f"{m.d_model} is not divisible by model.num_heads={m.num_heads}")
  if m.num_heads % m.num_kv_heads:
    raise ConfigError("model.num_kv_heads",
                      f"{m.num_kv_heads} does not divide model.num_heads={m.num_heads}")
  if m.positions == "rope" and (m.d_model // m.num_heads) % 2:
    raise ConfigError("model.positions",
                      f"rope needs an even head size, got {m.d_model // m.num_heads}")
  if not 0.0 <= config.task.label_smoothing < 1.0:
    raise ConfigError("task.label_smoothing",
                      f"must be in [0, 1), got {config.task.label_smoothing}")
  if not 0.0 <= m.dropout < 1.0:
    raise ConfigError("model.dropout", f"must be in [0, 1), got {m.dropout}")
  if m.vocab_size is not None and m.vocab_size <= 0:
    raise ConfigError("model.vocab_size", f"must be > 0 or None, got {m.vocab_size}")
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
  if not (0 <= t.b1 < 1 and 0 <= t.b2 < 1):
    raise ConfigError("train.b1" if not 0 <= t.b1 < 1 else "train.b2", "must be in [0, 1)")

  if config.peft.method:
    if not config.init_from:
      raise ConfigError("peft.method", f"{config.peft.method} fine-tunes a pretrained model; "
                        "set config.init_from to one (an lm workdir, or hf:FOLDER)")
    if not 0.0 <= config.peft.dropout < 1.0:
      raise ConfigError("peft.dropout", f"must be in [0, 1), got {config.peft.dropout}")
    try:
      re.compile(config.peft.targets)
    except re.error as e:
      raise ConfigError("peft.targets", f"{config.peft.targets!r} is not a regular "
                        f"expression ({e})") from None

  tasks.get(config.task.objective).check_config(config)

  if m.pooler and config.task.pooling != "cls":
    raise ConfigError("task.pooling", "model.pooler pools the first token; use cls with it")

  if config.sample.num_tokens and not config.sample.prompt:
    raise ConfigError("sample.prompt", "must not be empty when sample.num_tokens > 0")

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
  return config


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
