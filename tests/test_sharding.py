"""Meshes on 8 fake CPU devices: same losses as one device; shardings follow the rules."""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from conftest import tiny_config
from lm import sharding
from lm.data import make_data
from lm.train import Trainer

STEPS = 3


def losses_on_mesh(mesh_shape, devices):
  config = tiny_config(**{"mesh.data": mesh_shape[0], "mesh.fsdp": mesh_shape[1],
                          "mesh.tensor": mesh_shape[2], "model.vocab_size": 96})
  data = make_data(config)
  trainer = Trainer(config, data.tokenizer.vocab_size, sharding.make_mesh(config.mesh, devices))
  state = trainer.init_state()
  batches = data.train_batches(8, 16, seed=0)
  losses = []
  for step in range(STEPS):
    state, metrics = trainer.train_step(state, trainer.shard_batch(batches[step]))
    losses.append(float(metrics["loss"]))
  eval_loss = trainer.evaluate(state.params,
                               iter(data.eval_batches("validation", 8, 16)[:3]))["loss"]
  return np.array(losses + [eval_loss]), state


@pytest.fixture(scope="module")
def single_device_losses():
  return losses_on_mesh((1, 1, 1), jax.devices()[:1])[0]


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_every_mesh_gives_the_single_device_losses(mesh_shape, single_device_losses):
  assert len(jax.devices()) == 8
  losses, _ = losses_on_mesh(mesh_shape, jax.devices())
  np.testing.assert_allclose(losses, single_device_losses, rtol=2e-5)


def test_parameters_and_optimizer_state_are_sharded_by_the_rules():
  _, state = losses_on_mesh((2, 2, 2), jax.devices())
  layer = state.params["layer_0"]
  assert layer["attn"]["query"]["kernel"].sharding.spec == P("fsdp", "tensor", None)
  assert layer["attn"]["key"]["kernel"].sharding.spec == P("fsdp", "tensor", None)
  assert layer["attn"]["out"]["kernel"].sharding.spec == P("tensor", None, "fsdp")
  assert layer["mlp"]["wi"]["kernel"].sharding.spec == P("fsdp", "tensor")
  assert layer["mlp"]["wo"]["kernel"].sharding.spec == P("tensor", "fsdp")
  assert layer["ln_1"]["scale"].sharding.spec == P("fsdp")
  assert state.params["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
  assert state.params["pos_embed"]["embedding"].sharding.spec == P(None, "fsdp")
  # Adam's moments live where their parameters live.
  mu = optax.tree_utils.tree_get(state.opt_state, "mu")
  assert mu["layer_0"]["mlp"]["wi"]["kernel"].sharding.spec == P("fsdp", "tensor")
  # A parameter is stored in pieces: each device holds 1/4 of an (fsdp, tensor) matrix.
  kernel = layer["mlp"]["wi"]["kernel"]
  assert kernel.addressable_shards[0].data.shape == (kernel.shape[0] // 2, kernel.shape[1] // 2)


def test_dimensions_that_do_not_divide_stay_replicated():
  mesh = sharding.make_mesh(tiny_config(**{"mesh.data": 1, "mesh.fsdp": 2,
                                           "mesh.tensor": 4}).mesh, jax.devices())
  import flax.linen as nn
  leaf = nn.Partitioned(jax.ShapeDtypeStruct((6, 10), np.float32), names=("embed", "vocab"))
  (spec,) = [s.spec for s in jax.tree.leaves(sharding.logical_shardings({"w": leaf}, mesh))]
  assert spec == P("fsdp", None)  # 6 splits over fsdp=2; 10 does not split over tensor=4
