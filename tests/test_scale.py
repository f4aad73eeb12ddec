"""Gradient accumulation, rematerialisation, bfloat16 and float16 compute, profiling."""

import glob
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from lm import loop, sharding
from lm.data import make_data
from lm.runtime import Profiler
from lm.train import LossScale, Trainer

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


HALF = {"train.num_steps": 30, "train.log_every": 1, "train.eval_every": 1000,
        "train.checkpoint_every": 1000, "sample.num_tokens": 0}


@pytest.fixture(scope="module")
def float32_run(tmp_path_factory):
  return loop.run(tiny_config(**HALF), str(tmp_path_factory.mktemp("f32")),
                  devices=jax.devices()[:1])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_compute_tracks_float32(dtype, float32_run, tmp_path, one_device):
  half = loop.run(tiny_config(**HALF, **{"model.dtype": dtype}), str(tmp_path / dtype),
                  devices=one_device)
  a = np.array([float32_run.train_losses[s] for s in sorted(float32_run.train_losses)])
  b = np.array([half.train_losses[s] for s in sorted(half.train_losses)])
  assert a[-1] < a[0] - 0.3 and b[-1] < b[0] - 0.3  # both learn
  # Stated tolerance: every step within 2% of the float32 loss.
  np.testing.assert_allclose(b, a, rtol=0.02)
  assert half.eval["validation"]["loss"] == pytest.approx(
      float32_run.eval["validation"]["loss"], rel=0.02)
  logged = [json.loads(line) for line in open(tmp_path / dtype / "metrics.jsonl")]
  scales = [m["train/loss_scale"] for m in logged if "train/loss_scale" in m]
  # float16 scales its loss (dynamically, from 2**15; nothing overflows here); bfloat16 has
  # float32's range and needs no scaling.
  assert scales == ([2.0 ** 15] * 30 if dtype == "float16" else [])


def test_loss_scale_halves_on_overflow_and_doubles_after_the_growth_interval():
  update = jax.jit(LossScale.update)
  scale = update(LossScale.initial(), jnp.array(False))
  assert float(scale.scale) == 2.0 ** 14 and int(scale.good_steps) == 0
  for _ in range(LossScale.GROWTH_INTERVAL - 1):
    scale = update(scale, jnp.array(True))
  assert float(scale.scale) == 2.0 ** 14
  assert int(scale.good_steps) == LossScale.GROWTH_INTERVAL - 1
  scale = update(scale, jnp.array(True))
  assert float(scale.scale) == 2.0 ** 15 and int(scale.good_steps) == 0
  floor = LossScale(scale=jnp.float32(1.0), good_steps=jnp.int32(7))
  assert float(update(floor, jnp.array(False)).scale) == 1.0


def test_an_overflowing_float16_step_is_skipped_and_halves_the_scale(one_device):
  config = tiny_config(**{"model.dtype": "float16"})
  data = make_data(config)
  trainer = Trainer(config, data.tokenizer.vocab_size, sharding.make_mesh(config.mesh,
                                                                         one_device))
  batch = trainer.shard_batch(dict(data.train_batches(8, config.data.seq_len, seed=0)[0]))
  start = trainer.init_state()
  before = jax.device_get(start.params)
  # 2**40 times the loss overflows float16 in the backward pass (its largest is 65504).
  state = start.replace(loss_scale=LossScale(scale=jnp.float32(2.0 ** 40),
                                             good_steps=jnp.int32(5)))
  state, metrics = trainer.train_step(state, batch)
  assert int(metrics["nonfinite"]) == 0 and int(metrics["skipped"]) == 1  # not an error
  assert np.isfinite(float(metrics["loss"]))
  assert float(state.loss_scale.scale) == 2.0 ** 39 and int(state.loss_scale.good_steps) == 0
  chex.assert_trees_all_equal(jax.device_get(state.params), before)
  # At a sane scale the same batch trains, with the unscaled loss.
  state, metrics = trainer.train_step(state.replace(loss_scale=LossScale.initial()), batch)
  assert int(metrics["skipped"]) == 1 and float(state.loss_scale.scale) == 2.0 ** 15
  assert not np.allclose(jax.device_get(state.params)["embed"]["embedding"],
                         before["embed"]["embedding"])


def test_profile_steps_writes_a_trace(tmp_path, one_device):
  config = tiny_config(**{"train.num_steps": 5, "train.profile_steps": 2,
                          "sample.num_tokens": 0})
  loop.run(config, str(tmp_path / "run"), devices=one_device)
  traces = glob.glob(os.path.join(tmp_path, "run", "profile", "**", "*.xplane.pb"),
                     recursive=True)
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0


def stack_layers(params, num_layers):
  """Looped-layer parameters in the scanned layout: layer_i -> layers/block[i]."""
  out = {k: v for k, v in params.items() if not k.startswith("layer_")}
  out["layers"] = {"block": jax.tree.map(lambda *a: np.stack(a),
                                         *[params[f"layer_{i}"] for i in range(num_layers)])}
  return out


def test_scanned_layers_compute_what_the_loop_computes():
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from lm import decode, inspect  # pylint: disable=import-outside-toplevel
  from lm.models import Decoder, ModelConfig  # pylint: disable=import-outside-toplevel
  base = dict(vocab_size=50, num_layers=3, num_heads=4, num_kv_heads=2, d_model=32, d_ff=64,
              max_len=16, positions="rope", dropout=0.0)
  loop_model = Decoder(ModelConfig(**base))
  scan_model = Decoder(ModelConfig(**base, scan_layers=True, remat="full"))
  tokens = jnp.asarray([[3, 1, 4, 1, 5, 9, 2, 6]])
  params = nn.unbox(loop_model.init(jax.random.key(0), tokens)["params"])
  stacked = stack_layers(params, 3)
  np.testing.assert_allclose(scan_model.apply({"params": stacked}, tokens),
                             loop_model.apply({"params": params}, tokens), atol=1e-5)
  loss = lambda m, p: m.apply({"params": p}, tokens).astype(jnp.float32).std()
  g_loop = jax.grad(lambda p: loss(loop_model, p))(params)
  g_scan = jax.grad(lambda p: loss(scan_model, p))(stacked)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               g_scan, stack_layers(g_loop, 3))
  greedy = decode.Sampling(temperature=0.0)
  assert (decode.generate(scan_model, stacked, [[1, 2, 3], [7]], 9, greedy) ==
          decode.generate(loop_model, params, [[1, 2, 3], [7]], 9, greedy))
  np.testing.assert_allclose(inspect.attention_maps(scan_model, stacked, [3, 1, 4]),
                             inspect.attention_maps(loop_model, params, [3, 1, 4]), atol=1e-6)


def test_scanned_training_shards_the_stacked_parameters(tmp_path):
  config = tiny_config(**{"model.scan_layers": True, "mesh.data": 2, "mesh.fsdp": 2,
                          "mesh.tensor": 2, "train.num_steps": 4, "sample.num_tokens": 4})
  data = make_data(config)
  trainer = Trainer(config, data.tokenizer.vocab_size,
                    sharding.make_mesh(config.mesh, jax.devices()))
  state = trainer.init_state()
  kernel = state.params["layers"]["block"]["attn"]["query"]["kernel"]
  assert kernel.shape[0] == config.model.num_layers
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  result = loop.run(config, str(tmp_path / "run"), devices=jax.devices())
  assert result.train_losses[4] < result.train_losses[1] and result.sample


DISPATCH = {"train.num_steps": 24, "train.log_every": 5, "train.eval_every": 7,
            "train.checkpoint_every": 10, "sample.num_tokens": 0}


def test_dispatches_end_at_every_step_that_logs_evaluates_or_checkpoints():
  t = tiny_config(**DISPATCH, **{"train.steps_per_dispatch": 4}).train
  ends, step = [], 0
  while step < t.num_steps:
    step = loop._dispatch_end(step, t.num_steps, t, Profiler("unused", 3, 0))
    ends.append(step)
  # Multiples of 4, 5 (log), 7 (eval), 10 (checkpoint) and the last step, 24.
  assert ends == [4, 5, 7, 8, 10, 12, 14, 15, 16, 20, 21, 24]
  profiled = Profiler("unused", 3, 2)  # steps 3 and 4 alone in their dispatch(es)
  assert loop._dispatch_end(0, 24, t, profiled) == 2
  assert loop._dispatch_end(2, 24, t, profiled) == 4


def test_several_steps_per_dispatch_train_as_single_steps(tmp_path, one_device):
  runs = {n: loop.run(tiny_config(**DISPATCH, **{"train.steps_per_dispatch": n}),
                      str(tmp_path / str(n)), devices=one_device) for n in (1, 4)}
  single, stacked = runs[1], runs[4]
  assert sorted(stacked.train_losses) == list(range(1, 25))
  np.testing.assert_allclose([stacked.train_losses[s] for s in range(1, 25)],
                             [single.train_losses[s] for s in range(1, 25)], rtol=1e-5)
  assert stacked.eval["validation"]["loss"] == pytest.approx(
      single.eval["validation"]["loss"], rel=1e-5)
  for n in (1, 4):  # the same log lines, evaluations and checkpoints
    logged = [json.loads(line) for line in open(tmp_path / str(n) / "metrics.jsonl")]
    assert [m["step"] for m in logged if "train/loss" in m] == [5, 10, 15, 20, 24]
    assert [m["step"] for m in logged if "eval/loss" in m][:3] == [7, 14, 21]
    assert sorted(int(d) for d in os.listdir(tmp_path / str(n) / "checkpoints")
                  if d.isdigit()) == [10, 20, 24]
