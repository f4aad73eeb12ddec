"""Training on a mesh: the train state, placed and compiled, around the pure steps.

    trainer = Trainer(config, vocab_size, mesh, num_labels)
    state = trainer.init_state()                         # or state_from_params(pretrained)
    state, metrics = trainer.train_step(state, trainer.shard_batch(host_batch))
    outputs = trainer.eval_step(state.params, batch)     # the task's sums / predictions

The model, task and parameter shardings come from lm/model_setup.py (ModelSetup), the
optimizer from lm/optim.py, the steps themselves from lm/steps.py (pure functions of the
state, the frozen base and the batch) and their compiled programs from lm/programs.py.
What a Trainer adds is the optimizer state's shardings, the frozen base of a PEFT run on
the mesh, and batch placement. Every step is compiled with explicit in/out shardings.
"""

import functools

import jax
import numpy as np
import optax

from lm import peft, sharding, steps
from lm.model_setup import INIT_COMPILER_OPTIONS, TWIN_INIT_MIN_LAYERS, ModelSetup
from lm.optim import LossScale, learning_rate_schedule, make_optimizer, uses_loss_scale
from lm.programs import Programs
from lm.steps import TrainState

__all__ = ["INIT_COMPILER_OPTIONS", "LossScale", "TWIN_INIT_MIN_LAYERS", "TrainState",
           "Trainer", "learning_rate_schedule", "make_optimizer", "uses_loss_scale"]


class Trainer:
  """A ModelSetup with an optimizer: places the train state and runs the compiled steps."""

  def __init__(self, config, vocab_size, mesh, num_labels=0, platform=None):
    self.setup = setup = ModelSetup(config, vocab_size, mesh, num_labels, platform)
    self.config, self.mesh = config, mesh
    self.model_cfg, self.task, self.model = setup.model_cfg, setup.task, setup.model
    self.seq_len, self.init_key = setup.seq_len, setup.init_key
    self.abstract_params, self.abstract_frozen = setup.abstract_params, setup.abstract_frozen
    self.frozen_shardings = setup.frozen_shardings
    self.optimizer = make_optimizer(config.train, self.task.head_keys)
    self.loss_scaling = uses_loss_scale(config)
    self.spec = steps.StepSpec(self.task, self.optimizer, learning_rate_schedule(config.train),
                               setup.dropout_key, config.train.grad_accum_steps)

    replicated = sharding.replicated(mesh)
    opt_shardings = optax.tree_map_params(
        self.optimizer, lambda _, s: s,
        jax.eval_shape(self.optimizer.init, setup.abstract_trainable), setup.param_shardings,
        transform_non_params=lambda _: replicated)
    self.state_shardings = TrainState(
        step=replicated, params=setup.param_shardings, opt_state=opt_shardings,
        skipped=replicated,
        loss_scale=LossScale(replicated, replicated) if self.loss_scaling else None)
    self.abstract_state = jax.eval_shape(lambda k: self._init_state(k)[0], self.init_key)
    self.batch_sharding = sharding.batch_sharding(mesh)
    self.stacked_batch_sharding = sharding.stacked_batch_sharding(mesh)
    # The frozen parameters, on the mesh: set by init_state / state_from_params / set_base.
    self.frozen = None if jax.tree.leaves(setup.abstract_frozen) else {}

    self._init = jax.jit(
        self._init_state, out_shardings=(self.state_shardings, self.frozen_shardings),
        compiler_options=setup.init_compiler_options)
    state_in = (self.state_shardings, self.frozen_shardings)
    self._train_step = jax.jit(
        functools.partial(steps.train_step, self.spec),
        in_shardings=state_in + (self.batch_sharding,), out_shardings=(self.state_shardings,
                                                                      replicated),
        donate_argnums=0)
    # Several steps per dispatch: one lax.scan over batches stacked on a leading axis.
    self._train_steps = jax.jit(
        functools.partial(steps.train_steps, self.spec),
        in_shardings=state_in + (self.stacked_batch_sharding,),
        out_shardings=(self.state_shardings, replicated), donate_argnums=0)
    self._eval_step = jax.jit(functools.partial(steps.eval_step, self.task),
                              in_shardings=(setup.param_shardings, self.frozen_shardings,
                                            self.batch_sharding),
                              out_shardings=replicated)
    self.programs = Programs(self.on_mesh)

  def _init_state(self, key):
    """(train state, frozen parameters), traced by the initialiser."""
    params, frozen = self.setup.split(self.setup.init_params(key))
    return self._fresh_state(params), frozen

  def _fresh_state(self, params):
    return steps.fresh_state(self.optimizer, params,
                             LossScale.initial() if self.loss_scaling else None)

  def on_mesh(self):
    """The mesh and the logical axis rules, for tracing and running the steps."""
    return sharding.on_mesh(self.mesh)

  # The state.

  def init_state(self):
    # Without the axis rules: flax would constrain DenseGeneral's flat init kernels with the
    # N-d specs. out_shardings places the result.
    with sharding.set_mesh(self.mesh):
      state, self.frozen = self._init(self.init_key)
    return state

  def set_base(self, params):
    """Places the frozen part of `params` (all the model's parameters, host arrays; the
    trainable leaves may be anything) on the mesh for the steps to use."""
    self.frozen = self.setup.place(self.setup.split(params)[1], self.frozen_shardings)

  def state_from_params(self, params):
    """A fresh train state (step 0, new optimizer state) around given parameters, e.g.
    pretrained ones (host arrays), placed on the mesh; their frozen part becomes the base."""
    self.set_base(params)
    params, _ = self.setup.split(params)
    with sharding.set_mesh(self.mesh):
      return jax.jit(self._fresh_state, out_shardings=self.state_shardings)(params)

  def full_params(self, params):
    """The model's whole parameter tree: the frozen base with the trainable `params`."""
    return self.setup.model_params(peft.join(self.frozen, params))

  def servable_params(self, params):
    """The plain model's parameters (self.model, no adapters): LoRA folded in."""
    return self.setup.servable(self.full_params(params))

  # Batches.

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

  def abstract_batch(self, host_batch, size=0):
    """The global batch (size > 0: `size` of them stacked) that shard_batch(es) makes of
    batches shaped like `host_batch`, as ShapeDtypeStructs with their shardings."""
    rows = len(next(iter(host_batch.values()))) * jax.process_count()
    lead, batch_sharding = ((size,), self.stacked_batch_sharding) if size else (
        (), self.batch_sharding)
    return self.task.Batch.from_host(
        {k: jax.ShapeDtypeStruct(lead + (rows,) + v.shape[1:], v.dtype, sharding=batch_sharding)
         for k, v in host_batch.items()})

  # The steps.

  def train_step(self, state, batch):
    """One step; compiled once per batch shape (example batches cut to their length bucket
    bring a few shapes; packed text windows one)."""
    return self.programs.run(self._train_step, "step", state, self.frozen, batch)

  def train_steps(self, state, batches):
    """len(batches) steps in one dispatch (a scan; batches from shard_batches): the same
    updates as that many train_step calls, with the host's per-call work paid once.
    Returns (state, metrics with a leading steps axis)."""
    return self.programs.run(self._train_steps, "steps", state, self.frozen, batches)

  @property
  def compile_seconds(self):
    """All compilations of the train step so far (None before the first)."""
    return self.programs.compile_seconds

  def _abstract_state_and_base(self):
    return (sharding.abstract_like(self.abstract_state, self.state_shardings),
            sharding.abstract_like(self.abstract_frozen, self.frozen_shardings))

  def compile_ahead(self, host_batch, size):
    """Starts compiling, on a background thread, the train step for `size` steps per
    dispatch (1: train_step) of batches shaped like `host_batch` (this process's rows),
    so that XLA compiles while the caller initialises or restores the state and opens the
    data; the first such dispatch then waits only for what is left."""
    kind, jitted = ("steps", self._train_steps) if size > 1 else ("step", self._train_step)
    batch = self.abstract_batch(host_batch, size if size > 1 else 0)
    self.programs.ahead(jitted, kind, *self._abstract_state_and_base(), batch)

  def lower_init(self):
    """The initialiser lowered (init_state's program, with INIT_COMPILER_OPTIONS): for
    compile-time benchmarks."""
    with sharding.set_mesh(self.mesh):
      return self._init.lower(self.init_key)

  def lower_train_step(self, batch):
    """The train step lowered for `batch` (arrays or ShapeDtypeStructs with shardings) and
    an abstract state and base: for XLA's cost and memory analyses (benchmarks, tests)."""
    with self.on_mesh():
      return self._train_step.lower(*self._abstract_state_and_base(),
                                    self.task.Batch.from_host(batch))

  def eval_step(self, params, batch):
    """`params`: the trainable parameters (a state's), with the frozen base."""
    with self.on_mesh():
      return self._eval_step(params, self.frozen, batch)

  def evaluate(self, params, batches):
    """The task's metrics (lm/tasks/) over all the host `batches`: {"loss", ...}."""
    outputs = [self.eval_step(params, self.shard_batch(host_batch)) for host_batch in batches]
    return self.task.summarize(jax.device_get(outputs))  # one transfer, not one per batch

  @property
  def num_params(self):
    """Every parameter of the model (adapters included)."""
    return self.setup.num_params

  @functools.cached_property
  def num_trainable(self):
    return peft.count(self.abstract_state.params)
