"""Train state and the pure, jitted train/eval steps on a mesh.

    state, metrics = trainer.train_step(state, batch)   # (state, batch) -> (state, metrics)
    outputs = trainer.eval_step(state.params, batch)     # the task's sums / predictions

Both are compiled once with explicit in/out shardings from lm/sharding.py. The dropout key
of step s is fold_in(key(seed), s), so nothing random lives outside the state's step count:
a resumed run continues exactly where the uninterrupted one would be.
"""

import concurrent.futures
import contextlib
import dataclasses
import functools
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lm import peft, sharding
from lm.models import ModelConfig, lora
from lm.trees import unstack_layers_tree
from lm import tasks


@flax.struct.dataclass
class LossScale:
  """Dynamic loss scaling, for float16 compute (as PyTorch's GradScaler): the loss is
  multiplied by `scale` before differentiation, so that small gradients survive float16,
  and the gradients divided by it after. A step whose gradients overflow is skipped and
  halves the scale (not below 1); GROWTH_INTERVAL finite steps in a row double it."""
  scale: jax.Array  # float32
  good_steps: jax.Array  # int32: finite steps since the scale last changed

  INITIAL = 2.0 ** 15
  GROWTH_INTERVAL = 2000

  @classmethod
  def initial(cls):
    return cls(scale=jnp.asarray(cls.INITIAL, jnp.float32),
               good_steps=jnp.zeros((), jnp.int32))

  def update(self, grads_finite):
    grow = grads_finite & (self.good_steps + 1 >= self.GROWTH_INTERVAL)
    scale = jnp.where(grads_finite, jnp.where(grow, self.scale * 2.0, self.scale),
                      jnp.maximum(self.scale / 2.0, 1.0))
    good_steps = jnp.where(grads_finite & ~grow, self.good_steps + 1, 0)
    return LossScale(scale=scale.astype(jnp.float32), good_steps=good_steps.astype(jnp.int32))


INIT_COMPILER_OPTIONS = {"cpu": {"xla_backend_optimization_level": 1}}  # by platform
TWIN_INIT_MIN_LAYERS = 8  # Trainer._init_params


def uses_loss_scale(config):
  """train.loss_scale: dynamic, or auto with float16 compute."""
  mode = config.train.get("loss_scale", "auto")
  return mode == "dynamic" or (mode == "auto" and config.model.dtype == "float16")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # the trainable parameters: all, or with config.peft the adapters/biases and head
  opt_state: Any
  skipped: jax.Array  # updates skipped so far: loss or gradients not finite, or overflowed
  loss_scale: Any = None  # a LossScale with float16 loss scaling, else None


def learning_rate_schedule(t):
  """Linear warm-up to learning_rate over warmup_steps, then cosine decay to
  min_learning_rate at num_steps (nanoGPT's schedule: step 0 already trains, at
  learning_rate / (warmup_steps + 1))."""
  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = t.learning_rate * (step + 1) / (t.warmup_steps + 1)
    progress = jnp.clip((step - t.warmup_steps) / max(t.num_steps - t.warmup_steps, 1), 0, 1)
    cosine = t.min_learning_rate + 0.5 * (1 + jnp.cos(jnp.pi * progress)) * (
        t.learning_rate - t.min_learning_rate)
    return jnp.where(step < t.warmup_steps, warm, cosine)
  return schedule


def make_optimizer(t, head_keys=()):
  """AdamW with global-norm clipping; weight decay on matrices and embeddings only.

  With train.head_learning_rate > 0, the updates of the parameters under `head_keys` are
  scaled by head_learning_rate / learning_rate: AdamW's update (weight decay included) is
  linear in the learning rate, so that is AdamW at the head's rate on the same schedule."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  parts = [optax.adamw(learning_rate_schedule(t), b1=t.b1, b2=t.b2, eps=1e-8,
                       weight_decay=t.weight_decay, mask=decay_mask)]
  if t.grad_clip > 0:
    parts.insert(0, optax.clip_by_global_norm(t.grad_clip))
  if t.head_learning_rate > 0 and head_keys:
    head_mask = lambda params: {k: jax.tree.map(lambda _, head=k in head_keys: head, v)
                                for k, v in params.items()}
    parts.append(optax.masked(optax.scale(t.head_learning_rate / t.learning_rate), head_mask))
  return parts[0] if len(parts) == 1 else optax.chain(*parts)


class Trainer:
  """Builds the model, optimizer and shardings from a config; owns the compiled steps."""

  def __init__(self, config, vocab_size, mesh, num_labels=0):
    self.config, self.mesh = config, mesh
    self.model_cfg = ModelConfig.from_config(config.model, vocab_size)
    self.task = self._make_task(self.model_cfg, num_labels)
    self.model = self.task.model  # the plain model: serve it lora.merge'd parameters
    self.peft_method = config.peft.method
    self.is_trainable = peft.trainable(self.peft_method, self.task.head_keys)
    self.optimizer = make_optimizer(config.train, self.task.head_keys)
    self.schedule = learning_rate_schedule(config.train)
    self.seq_len = config.data.seq_len
    seed_key = jax.random.key(config.train.seed)
    # (A third key once seeded sampling; kept so that init and dropout keys stay the same.)
    self.init_key, self.dropout_key, _ = jax.random.split(seed_key, 3)

    # The model's parameters split into the trainable ones (the state's params) and the
    # frozen rest (lm/peft.py; empty without config.peft), each sharded by its logical axes.
    abstract_boxed = jax.eval_shape(self._init_boxed_params, self.init_key)
    boxed_trainable, boxed_frozen = peft.split(abstract_boxed, self.is_trainable)
    peft.check_trainable(self.peft_method, boxed_trainable, self.task.head_keys, config)
    param_shardings = sharding.logical_shardings(boxed_trainable, mesh)
    self.frozen_shardings = sharding.logical_shardings(boxed_frozen, mesh)
    self.abstract_params = nn.unbox(abstract_boxed)  # all of them
    self.abstract_frozen = nn.unbox(boxed_frozen)
    abstract_opt_state = jax.eval_shape(self.optimizer.init, nn.unbox(boxed_trainable))
    opt_shardings = optax.tree_map_params(
        self.optimizer, lambda _, s: s, abstract_opt_state, param_shardings,
        transform_non_params=lambda _: sharding.replicated(mesh))
    self.loss_scaling = uses_loss_scale(config)
    self.state_shardings = TrainState(
        step=sharding.replicated(mesh), params=param_shardings, opt_state=opt_shardings,
        skipped=sharding.replicated(mesh),
        loss_scale=(LossScale(sharding.replicated(mesh), sharding.replicated(mesh))
                    if self.loss_scaling else None))
    self.abstract_state = jax.eval_shape(lambda k: self._init_state(k)[0], self.init_key)
    self.batch_sharding = sharding.batch_sharding(mesh)
    replicated = sharding.replicated(mesh)
    # The frozen parameters, on the mesh: set by init_state / state_from_params / set_base.
    self.frozen = {} if not self.peft_method else None

    # On a CPU the initialiser compiles at LLVM optimisation level 1 instead of 3: a third
    # faster to compile (most of it is one random-bits and erf_inv chain per parameter,
    # which the higher levels do not speed up), with bit-identical parameters and the same
    # run time (tests/test_train.py; benchmarks/README.md).
    self._init = jax.jit(
        self._init_state, out_shardings=(self.state_shardings, self.frozen_shardings),
        compiler_options=INIT_COMPILER_OPTIONS.get(mesh.devices.flat[0].platform))
    self._train_step = jax.jit(
        self._train_step_fn,
        in_shardings=(self.state_shardings, self.frozen_shardings, self.batch_sharding),
        out_shardings=(self.state_shardings, replicated), donate_argnums=0)
    # Several steps per dispatch: one lax.scan over batches stacked on a leading axis.
    self.stacked_batch_sharding = sharding.stacked_batch_sharding(mesh)
    self._train_steps = jax.jit(
        self._train_steps_fn,
        in_shardings=(self.state_shardings, self.frozen_shardings, self.stacked_batch_sharding),
        out_shardings=(self.state_shardings, replicated), donate_argnums=0)
    self._eval_step = jax.jit(self._eval_step_fn,
                              in_shardings=(param_shardings, self.frozen_shardings,
                                            self.batch_sharding),
                              out_shardings=replicated)
    self.compile_seconds = None  # all compilations of the train step so far
    self._compiled = {}  # batch shapes -> the train step compiled for them

  # Pure functions (traced once under the mesh and the logical axis rules).

  def _make_task(self, model_cfg, num_labels):
    return tasks.make_from_config(self.config, model_cfg, num_labels,
                                  peft.adapters(self.config.peft))

  def _init_boxed_params(self, key, task=None):
    tokens_BxL = jnp.zeros((1, self.seq_len), jnp.int32)
    return (task or self.task).init(key, tokens_BxL)

  def _init_params(self, key):
    """All the model's parameters, unboxed: what init_state starts from.

    From TWIN_INIT_MIN_LAYERS layers on, a model without model.scan_layers is initialised
    as its scanned twin (model.scan_layers, the same key) and the stacked layers are then
    split into layer_0, layer_1, ...: XLA then compiles one layer's initialiser instead of
    one per layer (48 layers of experiments/base.py: 28 s of compiling instead of 3.3).
    Shallower models keep their direct initialisation, and the parameters earlier
    versions of lm gave them."""
    cfg = self.model_cfg
    if cfg.scan_layers or cfg.num_layers < TWIN_INIT_MIN_LAYERS:
      return nn.unbox(self._init_boxed_params(key))
    twin = self._make_task(dataclasses.replace(cfg, scan_layers=True), self.task.num_labels)
    params = unstack_layers_tree(nn.unbox(self._init_boxed_params(key, twin)))
    if jax.tree.structure(params) != jax.tree.structure(self.abstract_params):
      raise AssertionError("the scanned twin's parameters do not unstack into the model's: "
                           f"{jax.tree.structure(params)} != "
                           f"{jax.tree.structure(self.abstract_params)}")
    return params

  def _init_state(self, key):
    """(train state, frozen parameters)."""
    params, frozen = peft.split(self._init_params(key), self.is_trainable)
    return self._fresh_state(params), frozen

  def _fresh_state(self, params):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.optimizer.init(params), skipped=jnp.zeros((), jnp.int32),
                      loss_scale=LossScale.initial() if self.loss_scaling else None)

  def _train_step_fn(self, state, frozen, batch):
    dropout_key = jax.random.fold_in(self.dropout_key, state.step)
    n = self.config.train.grad_accum_steps
    weights = batch.loss_weights()
    total_weight = jnp.maximum(jnp.sum(weights.astype(jnp.float32)), 1.0)

    scale = None if state.loss_scale is None else state.loss_scale.scale

    def mean_loss(params, micro_batch, key):  # differentiated by the trainable params only
      loss_sum, _ = self.task.loss(peft.join(frozen, params), micro_batch, key)
      loss = loss_sum / total_weight  # each micro-batch's share of the batch's mean loss
      return loss if scale is None else loss * scale

    if n == 1:
      loss, grads = jax.value_and_grad(mean_loss)(state.params, batch, dropout_key)
    else:
      # Micro-batch i takes rows i, i+n, i+2n, ...: spread over every data shard alike.
      def split(x):
        x = x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1)
        return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))

      def accumulate(carry, inputs):
        micro_batch, i = inputs
        loss, grads = jax.value_and_grad(mean_loss)(state.params, micro_batch,
                                                     jax.random.fold_in(dropout_key, i))
        return jax.tree.map(jnp.add, carry, (loss, grads)), None

      zeros = (jnp.zeros((), jnp.float32),
               jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params))
      (loss, grads), _ = jax.lax.scan(accumulate, zeros,
                                      (jax.tree.map(split, batch), jnp.arange(n)))
      grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    if scale is not None:
      loss = loss / scale
      grads = jax.tree.map(lambda g: g / scale.astype(g.dtype), grads)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A NaN/Inf loss or gradient never reaches the parameters or Adam's moments: the step
    # keeps the previous ones and is counted (the loop then skips on or stops, by config).
    # With loss scaling, gradients that overflow while the loss is finite are the scale's
    # doing: the step is skipped and the scale halved, and only at scale 1 is it an error.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    nonfinite = ~finite
    metrics = {}
    loss_scale = state.loss_scale
    if loss_scale is not None:
      overflow = jnp.isfinite(loss) & ~jnp.isfinite(grad_norm) & (scale > 1.0)
      nonfinite = nonfinite & ~overflow
      loss_scale = loss_scale.update(jnp.isfinite(grad_norm))
      metrics["loss_scale"] = loss_scale.scale
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    skipped = state.skipped + (~finite).astype(jnp.int32)
    metrics.update(loss=loss, grad_norm=grad_norm, learning_rate=self.schedule(state.step),
                   nonfinite=nonfinite.astype(jnp.int32), skipped=skipped)
    return TrainState(step=state.step + 1, params=keep(params, state.params),
                      opt_state=keep(opt_state, state.opt_state), skipped=skipped,
                      loss_scale=loss_scale), metrics

  def _train_steps_fn(self, state, frozen, batches):
    """len(batches) steps, one after another; their metrics stacked."""
    return jax.lax.scan(lambda s, batch: self._train_step_fn(s, frozen, batch), state, batches)

  def _eval_step_fn(self, params, frozen, batch):
    return self.task.eval_outputs(peft.join(frozen, params), batch)

  # Entry points.

  @contextlib.contextmanager
  def on_mesh(self):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.RULES):
      yield

  def init_state(self):
    # Without the axis rules: flax would constrain DenseGeneral's flat init kernels with the
    # N-d specs. out_shardings places the result.
    with jax.set_mesh(self.mesh):
      state, self.frozen = self._init(self.init_key)
    return state

  def set_base(self, params):
    """Places the frozen part of `params` (all the model's parameters, host arrays; the
    trainable leaves may be anything) on the mesh for the steps to use."""
    _, frozen = peft.split(params, self.is_trainable)
    with jax.set_mesh(self.mesh):
      self.frozen = jax.jit(lambda f: f, out_shardings=self.frozen_shardings)(frozen)

  def state_from_params(self, params):
    """A fresh train state (step 0, new optimizer state) around given parameters, e.g.
    pretrained ones (host arrays), placed on the mesh; their frozen part becomes the base."""
    self.set_base(params)
    params, _ = peft.split(params, self.is_trainable)
    with jax.set_mesh(self.mesh):
      return jax.jit(self._fresh_state, out_shardings=self.state_shardings)(params)

  def shard_batch(self, batch):
    """Places a host batch (this process's rows) onto the mesh as one global array."""
    return jax.tree.map(lambda v: jax.make_array_from_process_local_data(self.batch_sharding, v),
                        self.task.Batch.from_host(batch))

  def shard_batches(self, batches):
    """Places equally shaped host batches onto the mesh stacked: [n, B, ...] arrays for
    train_steps."""
    return jax.tree.map(
        lambda v: jax.make_array_from_process_local_data(self.stacked_batch_sharding, v),
        self.task.Batch.from_host({k: np.stack([b[k] for b in batches]) for k in batches[0]}))

  def train_step(self, state, batch):
    """One step; compiled once per batch shape (example batches cut to their length bucket
    bring a few shapes; packed text windows one)."""
    return self._run_compiled(self._train_step, "step", state, batch)

  def train_steps(self, state, batches):
    """len(batches) steps in one dispatch (a scan; batches from shard_batches): the same
    updates as that many train_step calls, with the host's per-call work paid once.
    Returns (state, metrics with a leading steps axis)."""
    return self._run_compiled(self._train_steps, "steps", state, batches)

  def _run_compiled(self, jitted, kind, state, batch):
    shapes = _program_key(kind, batch)
    with self.on_mesh():
      compiled = self._compiled.get(shapes)
      if not isinstance(compiled, jax.stages.Compiled):
        # Queued steps run on while XLA compiles: wait for them, so that the compile time
        # the loop takes out of its step times overlaps no training.
        jax.block_until_ready(state)
        start = time.perf_counter()
        if compiled is None:
          compiled = jitted.lower(state, self.frozen, batch).compile()
        else:  # compiling ahead (compile_ahead): wait for the rest
          compiled = compiled.result()
        self._compiled[shapes] = compiled
        self.compile_seconds = (self.compile_seconds or 0.0) + time.perf_counter() - start
      return compiled(state, self.frozen, batch)

  def compile_ahead(self, host_batch, size):
    """Starts compiling, on a background thread, the train step for `size` steps per
    dispatch (1: train_step) of batches shaped like `host_batch` (this process's rows),
    so that XLA compiles while the caller initialises or restores the state and opens the
    data; the first such dispatch then waits only for what is left. An error in the
    compilation is raised by that dispatch."""
    rows = len(next(iter(host_batch.values()))) * jax.process_count()
    lead, batch_sharding = ((size,), self.stacked_batch_sharding) if size > 1 else (
        (), self.batch_sharding)
    batch = self.task.Batch.from_host(
        {k: jax.ShapeDtypeStruct(lead + (rows,) + v.shape[1:], v.dtype, sharding=batch_sharding)
         for k, v in host_batch.items()})
    kind, jitted = ("steps", self._train_steps) if size > 1 else ("step", self._train_step)
    shapes = _program_key(kind, batch)
    if shapes in self._compiled:
      return
    state = sharding.abstract_like(self.abstract_state, self.state_shardings)
    frozen = sharding.abstract_like(self.abstract_frozen, self.frozen_shardings)

    def build():
      with self.on_mesh():  # the mesh and the axis rules are per thread
        return jitted.lower(state, frozen, batch).compile()

    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lm-compile")
    self._compiled[shapes] = pool.submit(build)
    pool.shutdown(wait=False)  # the thread ends with the compilation

  def lower_init(self):
    """The initialiser lowered (init_state's program, with INIT_COMPILER_OPTIONS): for
    compile-time benchmarks."""
    with jax.set_mesh(self.mesh):
      return self._init.lower(self.init_key)

  def lower_train_step(self, batch):
    """The train step lowered for `batch` (arrays or ShapeDtypeStructs with shardings) and
    an abstract state and base: for XLA's cost and memory analyses (benchmarks, tests)."""
    with self.on_mesh():
      return self._train_step.lower(sharding.abstract_like(self.abstract_state, self.state_shardings),
                                    sharding.abstract_like(self.abstract_frozen, self.frozen_shardings),
                                    self.task.Batch.from_host(batch))

  def eval_step(self, params, batch):
    """`params`: the trainable parameters (a state's), with the frozen base."""
    with self.on_mesh():
      return self._eval_step(params, self.frozen, batch)

  def full_params(self, params):
    """The model's whole parameter tree: the frozen base with the trainable `params`."""
    return peft.join(self.frozen, params)

  def servable_params(self, params):
    """The plain model's parameters (self.model, no adapters): LoRA folded in."""
    full = self.full_params(params)
    return lora.merge(full, self.config.peft.alpha) if self.peft_method == "lora" else full

  def evaluate(self, params, batches):
    """The task's metrics (lm/tasks/) over all the host `batches`: {"loss", ...}."""
    outputs = [self.eval_step(params, self.shard_batch(host_batch)) for host_batch in batches]
    return self.task.summarize(jax.device_get(outputs))  # one transfer, not one per batch

  @functools.cached_property
  def num_params(self):
    """Every parameter of the model (adapters included)."""
    return peft.count(self.abstract_params)

  @functools.cached_property
  def num_trainable(self):
    return peft.count(self.abstract_state.params)


def _program_key(kind, batch):
  """Which compiled train step serves `batch` (global arrays or ShapeDtypeStructs)."""
  return (kind, type(batch).__name__) + batch.shapes()
