"""Train and eval steps: the schedule, learning, exact evaluation, and loss parity with numpy."""

import chex
import jax
import numpy as np
import optax
import pytest

from conftest import tiny_config
from lm import sharding, trees
from lm.data import make_data
from lm.train import TWIN_INIT_MIN_LAYERS, Trainer, learning_rate_schedule


def make_trainer(config, devices):
  data = make_data(config)
  mesh = sharding.make_mesh(config.mesh, devices)
  return Trainer(config, data.tokenizer.vocab_size, mesh), data


def test_schedule_matches_nanogpt_closed_form():
  t = tiny_config().train
  t.learning_rate, t.min_learning_rate, t.warmup_steps, t.num_steps = 1e-3, 1e-4, 100, 2000
  schedule = learning_rate_schedule(t)

  def nanogpt_lr(it):  # nanoGPT train.py get_lr
    if it < 100:
      return 1e-3 * (it + 1) / 101
    ratio = (it - 100) / (2000 - 100)
    return 1e-4 + 0.5 * (1.0 + np.cos(np.pi * ratio)) * (1e-3 - 1e-4)

  for step in (0, 1, 50, 99, 100, 101, 700, 1999, 2000):
    assert float(schedule(step)) == pytest.approx(nanogpt_lr(step), rel=1e-5)


def test_weight_decay_skips_norms_and_biases(one_device):
  trainer, _ = make_trainer(tiny_config(**{"model.use_bias": True}), one_device)
  params = jax.tree.map(np.ones_like, jax.device_get(trainer.init_state().params))
  zero_grads = jax.tree.map(np.zeros_like, params)
  opt_state = trainer.optimizer.init(params)
  updates, _ = trainer.optimizer.update(zero_grads, opt_state, params)
  # With zero gradients, only decoupled weight decay moves a parameter.
  assert float(np.abs(updates["layer_0"]["ln_1"]["scale"]).max()) == 0.0
  assert float(np.abs(updates["layer_0"]["mlp"]["wi"]["bias"]).max()) == 0.0
  assert float(np.abs(updates["layer_0"]["mlp"]["wi"]["kernel"]).min()) > 0.0
  assert float(np.abs(updates["embed"]["embedding"]).min()) > 0.0


def test_loss_falls_when_overfitting_one_batch(one_device):
  config = tiny_config(**{"train.num_steps": 60, "train.warmup_steps": 5,
                          "train.learning_rate": 1e-2, "train.min_learning_rate": 1e-2})
  trainer, data = make_trainer(config, one_device)
  state = trainer.init_state()
  batch = trainer.shard_batch(data.train_batches(8, 16, 0)[0])
  losses = []
  for _ in range(60):
    state, metrics = trainer.train_step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[0] > np.log(data.tokenizer.vocab_size) - 0.5  # starts near uniform
  assert losses[-1] < 0.3 * losses[0], losses[::10]
  assert int(state.step) == 60


def numpy_window_loss(logits, targets, weights):
  logits = np.asarray(logits, np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  return (nll * weights).sum(), weights.sum()


def test_evaluate_is_the_exact_token_mean_over_the_split(one_device):
  config = tiny_config()
  trainer, data = make_trainer(config, one_device)
  params = trainer.init_state().params
  batches = data.eval_batches("validation", 8, 16)
  result = trainer.evaluate(params, iter(batches))
  loss, tokens = result["loss"], result["tokens"]
  host_params = jax.device_get(params)
  total = count = 0.0
  apply = jax.jit(lambda x: trainer.model.apply({"params": host_params}, x))
  for batch in batches:  # a second path: plain model.apply and numpy log-softmax
    logits = apply(batch["inputs"])
    s, n = numpy_window_loss(logits, batch["targets"], batch["weights"])
    total, count = total + s, count + n
  assert tokens == count == data.size("validation") - 1
  assert loss == pytest.approx(total / count, rel=1e-5)


def test_train_step_loss_and_gradient_match_a_direct_computation(one_device):
  config = tiny_config(**{"train.grad_clip": 0.0})
  trainer, data = make_trainer(config, one_device)
  state = trainer.init_state()
  host_batch = data.train_batches(8, 16, 0)[0]
  params = jax.device_get(state.params)

  def loss_fn(p):
    logits = trainer.model.apply({"params": p}, host_batch["inputs"])
    return optax.softmax_cross_entropy_with_integer_labels(logits,
                                                           host_batch["targets"]).mean()

  expected_loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
  _, metrics = trainer.train_step(state, trainer.shard_batch(host_batch))
  assert float(metrics["loss"]) == pytest.approx(float(expected_loss), rel=1e-5)
  assert float(metrics["grad_norm"]) == pytest.approx(float(optax.global_norm(grads)),
                                                      rel=1e-4)


def test_abstract_state_describes_the_real_state(one_device):
  trainer, _ = make_trainer(tiny_config(), one_device)
  state = trainer.init_state()
  chex.assert_trees_all_equal_shapes_and_dtypes(state, trainer.abstract_state)
  assert trainer.num_params == sum(x.size for x in jax.tree.leaves(state.params))


def test_cheaper_compiled_initialiser_gives_the_same_parameters(one_device):
  """The initialiser compiled at INIT_COMPILER_OPTIONS (the one init_state runs) and at
  XLA's default optimisation level (3; conftest sets 1 for the tests) give bit-identical
  parameters."""
  trainer, _ = make_trainer(tiny_config(), one_device)
  cheaper = trainer.init_state()
  default = trainer.lower_init().compile(
      compiler_options={"xla_backend_optimization_level": 3})(trainer.init_key)[0]
  chex.assert_trees_all_equal(cheaper.params, default.params)


def _flat(tree):
  return {"/".join(k.key for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_deep_models_initialise_through_their_scanned_twin():
  """From TWIN_INIT_MIN_LAYERS layers on, an unscanned model starts from its scanned twin's
  parameters split per layer (trees.stack_layers, a second code path, puts them back),
  with different values in every layer, on one device and on a data x FSDP x tensor mesh.
  Encoder-decoder, encoder and LoRA models map onto their own trees too."""
  n = TWIN_INIT_MIN_LAYERS
  devices = jax.devices()
  looped = Trainer(tiny_config(**{"model.num_layers": n}), 70,
                   sharding.make_mesh(tiny_config().mesh, devices[:1])).init_state().params
  scanned = Trainer(tiny_config(**{"model.num_layers": n, "model.scan_layers": True}), 70,
                    sharding.make_mesh(tiny_config().mesh, devices[:1])).init_state().params
  chex.assert_trees_all_equal(trees.stack_layers(_flat(looped)), _flat(scanned))
  first, second = looped["layer_0"], looped["layer_1"]
  assert not np.array_equal(first["mlp"]["wi"]["kernel"], second["mlp"]["wi"]["kernel"])
  meshed = tiny_config(**{"model.num_layers": n, "mesh.data": 2, "mesh.fsdp": 2,
                          "mesh.tensor": 2})
  on_mesh = Trainer(meshed, 70, sharding.make_mesh(meshed.mesh, devices[:8])).init_state()
  chex.assert_trees_all_equal(jax.device_get(on_mesh.params), jax.device_get(looped))
  for fields in ({"task.objective": "seq2seq"}, {"task.objective": "mlm"},
                 {"task.objective": "classification", "peft.method": "lora",
                  "peft.targets": r"attn/(query|value)$"}):
    config = tiny_config(**{"model.num_layers": n, **fields})
    trainer = Trainer(config, 70, sharding.make_mesh(config.mesh, devices[:1]), num_labels=3)
    assert "layer_7" in str(jax.tree.structure(trainer.abstract_params))


def test_compile_ahead_builds_the_programs_the_dispatches_run():
  """Train steps compiled on a background thread from batch shapes alone (on a data x FSDP
  x tensor mesh) are the ones the dispatches run (nothing compiles twice), and train as
  lazily compiled ones do."""
  config = tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  devices = jax.devices()[:8]
  ahead, data = make_trainer(config, devices)
  lazy, _ = make_trainer(config, devices)
  host = [data.train_batches(8, 16, 0)[k] for k in range(3)]
  ahead.compile_ahead(host[0], 3)
  ahead.compile_ahead(host[0], 1)
  results = []
  for trainer in (ahead, lazy):
    state = trainer.init_state()
    state, stacked = trainer.train_steps(state, trainer.shard_batches(host))
    state, single = trainer.train_step(state, trainer.shard_batch(host[0]))
    results.append((state.params, stacked["loss"], single["loss"]))
  compiled = list(ahead.programs._compiled.values())  # pylint: disable=protected-access
  assert len(compiled) == 2 and all(isinstance(c, jax.stages.Compiled) for c in compiled)
  chex.assert_trees_all_close(results[0], results[1])
