"""The model a config describes, on a mesh: its task, parameter shardings and abstract
parameters. No optimizer and no train step: loading a checkpoint for decoding or export
(lm/inference.py, lm/interop/hf.py) needs only this, and lm/train.py builds on it.

    setup = ModelSetup(config, vocab_size, mesh, num_labels)
    params = setup.place(setup.init_params(key), setup.param_shardings)   # all of them
    trainable, frozen = setup.split(params)                               # config.peft

With config.peft, the model's parameters split into the trainable ones (the adapters or
biases, and the task head) and the frozen rest (lm/peft.py); without it, all train and the
frozen part is empty. Each part is sharded by its parameters' logical axes (lm/sharding.py).
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm import peft, sharding, tasks
from lm.models import ModelConfig, lora
from lm.trees import unstack_layers_tree

INIT_COMPILER_OPTIONS = {"cpu": {"xla_backend_optimization_level": 1}}  # by platform
TWIN_INIT_MIN_LAYERS = 8  # ModelSetup.init_params


class ModelSetup:
  """Model, task, shardings and abstract parameters of a config; built without compiling."""

  def __init__(self, config, vocab_size, mesh, num_labels=0, platform=None):
    """`platform`: the devices' ("cpu", "gpu", "tpu"), by default the mesh's; an abstract
    mesh (lowering for another platform, lm.plan --lower) needs it given. The model's
    kernels are chosen for it (config.model.kernels)."""
    self.config, self.mesh = config, mesh
    self.platform = platform or sharding.platform(mesh)
    self.model_cfg = ModelConfig.from_config(config.model, vocab_size, self.platform)
    self.task = self._make_task(self.model_cfg, num_labels)
    self.model = self.task.model  # the plain model: serve it lora.merge'd parameters
    self.peft_method = config.peft.method
    self.is_trainable = peft.trainable(self.peft_method, self.task.head_keys)
    self.seq_len = config.data.seq_len
    seed_key = jax.random.key(config.train.seed)
    # (A third key once seeded sampling; kept so that init and dropout keys stay the same.)
    self.init_key, self.dropout_key, _ = jax.random.split(seed_key, 3)

    abstract_boxed = jax.eval_shape(self._init_boxed_params, self.init_key)
    boxed_trainable, boxed_frozen = peft.split(abstract_boxed, self.is_trainable)
    peft.check_trainable(self.peft_method, boxed_trainable, self.task.head_keys, config)
    self.param_shardings = sharding.logical_shardings(boxed_trainable, mesh)
    self.all_shardings = peft.join(sharding.logical_shardings(boxed_frozen, mesh),
                                   self.param_shardings)
    self.abstract_params = nn.unbox(abstract_boxed)  # all of them
    self.abstract_trainable = nn.unbox(boxed_trainable)
    # A task's frozen copy of the initial model (task.reference_key) joins the frozen part.
    self.reference_key = self.task.reference_key
    if self.reference_key:
      boxed_frozen = {**boxed_frozen, self.reference_key: abstract_boxed}
    self.frozen_shardings = sharding.logical_shardings(boxed_frozen, mesh)
    self.abstract_frozen = nn.unbox(boxed_frozen)

  def _make_task(self, model_cfg, num_labels):
    return tasks.make_from_config(self.config, model_cfg, num_labels,
                                  peft.adapters(self.config.peft))

  def _init_boxed_params(self, key, task=None):
    tokens_BxL = jnp.zeros((1, self.seq_len), jnp.int32)
    return (task or self.task).init(key, tokens_BxL)

  def init_params(self, key):
    """All the model's parameters, unboxed (traceable: lm/train.py jits it).

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

  @property
  def init_compiler_options(self):
    """XLA options of the initialiser's program on this mesh's platform: on a CPU, LLVM
    level 1 instead of 3 compiles a third faster (most of it is one random-bits and erf_inv
    chain per parameter, which the higher levels do not speed up), with bit-identical
    parameters and the same run time (tests/test_train.py; benchmarks/README.md)."""
    return INIT_COMPILER_OPTIONS.get(self.platform)

  def initial_params(self):
    """init_params(init_key) on the mesh: the parameters a fresh run starts from."""
    with sharding.set_mesh(self.mesh):
      return jax.jit(self.init_params, out_shardings=self.all_shardings,
                     compiler_options=self.init_compiler_options)(self.init_key)

  def split(self, params):
    """(trainable, frozen) parts of the model's whole parameter tree; with a task's
    reference_key, the frozen part also holds all of `params` under that key."""
    trainable, frozen = peft.split(params, self.is_trainable)
    if self.reference_key:
      frozen = {**frozen, self.reference_key: params}
    return trainable, frozen

  def model_params(self, joined):
    """The model's parameters of a join of the frozen and trainable parts (without the
    task's reference copy)."""
    return {k: v for k, v in joined.items() if k != self.reference_key}

  def place(self, tree, shardings):
    """`tree` (host or device arrays) on the mesh with `shardings`."""
    with sharding.set_mesh(self.mesh):
      return jax.jit(lambda t: t, out_shardings=shardings)(tree)

  def servable(self, full_params):
    """The plain model's parameters (self.model, no adapters): LoRA folded in."""
    full_params = self.model_params(full_params)
    if self.peft_method == "lora":
      return lora.merge(full_params, self.config.peft.alpha)
    return full_params

  @functools.cached_property
  def num_params(self):
    """Every parameter of the model (adapters included)."""
    return peft.count(self.abstract_params)
