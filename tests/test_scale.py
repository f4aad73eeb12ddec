"""Gradient accumulation, rematerialisation, bfloat16 compute and profiling."""

import glob
import os

import jax
import numpy as np
import pytest

from conftest import tiny_config
from lm import loop, sharding
from lm.data import make_data
from lm.train import Trainer

STEPS = 3


def train(config, devices):
  data = make_data(config)
  trainer = Trainer(config, data.tokenizer.vocab_size, sharding.make_mesh(config.mesh, devices))
  state = trainer.init_state()
  batches = data.train_batches(config.train.batch_size, config.data.seq_len, seed=0)
  losses = []
  for step in range(STEPS):
    batch = dict(batches[step])
    # Uneven weights (as padding makes): micro-batch means would no longer average to the
    # batch mean, so accumulation must weigh by tokens to pass.
    batch["weights"] = batch["weights"] * (np.arange(len(batch["weights"])) % 3 != 0)[:, None]
    batch["weights"][1, 5:] = 0.0
    state, metrics = trainer.train_step(state, trainer.shard_batch(batch))
    losses.append(float(metrics["loss"]))
  return np.array(losses), jax.device_get(state.params)


@pytest.fixture(scope="module")
def reference():
  return train(tiny_config(), jax.devices()[:1])


@pytest.mark.parametrize("accum,mesh", [(2, (1, 1, 1)), (4, (1, 1, 1)), (2, (2, 2, 2))])
def test_gradient_accumulation_equals_the_large_batch(reference, accum, mesh):
  config = tiny_config(**{"train.grad_accum_steps": accum, "mesh.data": mesh[0],
                          "mesh.fsdp": mesh[1], "mesh.tensor": mesh[2]})
  losses, params = train(config, jax.devices()[:int(np.prod(mesh))])
  np.testing.assert_allclose(losses, reference[0], rtol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), params, reference[1])


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_changes_memory_not_results(reference, policy):
  losses, params = train(tiny_config(**{"model.remat": policy}), jax.devices()[:1])
  np.testing.assert_allclose(losses, reference[0], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), params, reference[1])


def test_bfloat16_compute_tracks_float32(tmp_path, one_device):
  base = {"train.num_steps": 30, "train.log_every": 1, "train.eval_every": 1000,
          "train.checkpoint_every": 1000, "sample.num_tokens": 0}
  f32 = loop.run(tiny_config(**base), str(tmp_path / "f32"), devices=one_device)
  bf16 = loop.run(tiny_config(**base, **{"model.dtype": "bfloat16"}), str(tmp_path / "bf16"),
                  devices=one_device)
  a = np.array([f32.train_losses[s] for s in sorted(f32.train_losses)])
  b = np.array([bf16.train_losses[s] for s in sorted(bf16.train_losses)])
  assert a[-1] < a[0] - 0.3 and b[-1] < b[0] - 0.3  # both learn
  # Stated tolerance: every step within 2% of the float32 loss.
  np.testing.assert_allclose(b, a, rtol=0.02)
  assert bf16.eval["validation"]["loss"] == pytest.approx(f32.eval["validation"]["loss"],
                                                          rel=0.02)


def test_profile_steps_writes_a_trace(tmp_path, one_device):
  config = tiny_config(**{"train.num_steps": 5, "train.profile_steps": 2,
                          "sample.num_tokens": 0})
  loop.run(config, str(tmp_path / "run"), devices=one_device)
  traces = glob.glob(os.path.join(tmp_path, "run", "profile", "**", "*.xplane.pb"),
                     recursive=True)
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
