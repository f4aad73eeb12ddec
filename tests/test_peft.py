"""LoRA and BitFit (lm/models/lora.py, lm/peft.py): adapters start as the identity, merge
exactly, train alone with optimizer state for them only, checkpoint without the base, and
come back (resume, serving) from the base they point to."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_config

from lm import metrics, peft, pretrained, sharding, trees
from lm.checkpoint import Checkpointer
from lm.config import ConfigError, validate
from lm.errors import UserError
from lm.inference import load
from lm.loop import run
from lm.models import ModelConfig, lora
from lm import tasks
from lm.train import Trainer

VOCAB = 40


def model_config(scan, **fields):
  c = tiny_config(**{"model.scan_layers": scan, "model.use_bias": True, **fields})
  return ModelConfig.from_config(c.model, VOCAB, "cpu")


def batch(seed=0, b=3, length=10):
  rng = np.random.default_rng(seed)
  inputs = rng.integers(0, VOCAB, (b, length)).astype(np.int32)
  return {"inputs": inputs, "targets": np.roll(inputs, -1, 1),
          "weights": np.ones((b, length), np.float32),
          "label": rng.integers(0, 2, b).astype(np.int32),
          "example_weight": np.ones(b, np.float32)}


def forward(task, params, x):
  return jax.jit(task.apply)(params, x)


def adapted_and_plain(objective, scan, targets=r"attn/(query|value)$|mlp/wo$"):
  cfg = model_config(scan)
  adapters = lora.Adapters(rank=4, alpha=8.0, targets=targets)
  plain = tasks.make(objective, cfg, num_labels=2)
  adapted = tasks.make(objective, cfg, num_labels=2, adapters=adapters)
  tokens = jnp.zeros((1, 10), jnp.int32)
  base = jax.tree.map(np.asarray, nn.unbox(plain.init(jax.random.key(0), tokens)))
  with_adapters = nn.unbox(adapted.init(jax.random.key(1), tokens))
  factors, _ = peft.split(with_adapters, lora.is_adapter)
  return plain, adapted, base, jax.tree.map(np.asarray, factors)


@pytest.mark.parametrize("objective, scan", [("causal", False), ("classification", True)])
def test_adapters_with_b_zero_leave_the_outputs_identical(objective, scan):
  plain, adapted, base, factors = adapted_and_plain(objective, scan)
  paths = [tuple(k.key for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(factors)[0]]
  assert len(paths) == 2 * 3 * (1 if scan else 2)  # query, value, mlp/wo; stacked with scan
  assert not any(p[0].endswith("_head") for p in paths)  # heads train fully, never adapted
  for p, leaf in jax.tree_util.tree_flatten_with_path(factors)[0]:
    if p[-1].key == lora.B:
      assert not leaf.any()
  x = batch()
  # Bit for bit, op by op (under jit, the extra zero-valued terms may change XLA's fusions
  # and with them the last bit of unrelated sums).
  chex.assert_trees_all_equal(adapted.apply(peft.join(base, factors), x), plain.apply(base, x))


@pytest.mark.parametrize("objective, scan", [("causal", True), ("classification", False)])
def test_merged_weights_equal_the_adapters(objective, scan):
  plain, adapted, base, factors = adapted_and_plain(objective, scan)
  rng = np.random.default_rng(3)
  factors = jax.tree.map(lambda f: rng.normal(0, 0.3, f.shape).astype(np.float32), factors)
  full = peft.join(base, factors)
  merged = lora.merge(full, alpha=8.0)
  x = batch()
  chex.assert_trees_all_close(forward(plain, merged, x), forward(adapted, full, x), atol=1e-5)
  # The fold, against numpy: W + (alpha / r) A B, reshaped to the N-d kernel.
  layer = (lambda p: p["layers"]["block"]) if scan else (lambda p: p["layer_0"])
  if objective == "classification":
    layer = lambda p, inner=layer: inner(p["encoder"])
  q = layer(full)["attn"]["query"]
  a, b = (q["lora_a"][0], q["lora_b"][0]) if scan else (q["lora_a"], q["lora_b"])
  kernel = q["kernel"][0] if scan else q["kernel"]
  want = kernel + (8.0 / 4) * (a @ b).reshape(kernel.shape)
  got = layer(merged)["attn"]["query"]["kernel"]
  np.testing.assert_allclose(got[0] if scan else got, want, atol=1e-6)
  assert "lora_a" not in str(jax.tree_util.tree_structure(merged))


def peft_trainer(method, one_device, **fields):
  c = tiny_config(**{"model.use_bias": True, "peft.method": method, "peft.rank": 2,
                     "peft.targets": r"attn/(query|key|value|out)$", **fields})
  return Trainer(c, VOCAB, sharding.make_mesh(c.mesh, one_device))


@pytest.mark.parametrize("method", ["lora", "bitfit"])
def test_only_the_peft_parameters_train_and_the_base_stays_bit_identical(method, one_device):
  trainer = peft_trainer(method, one_device)
  state = trainer.init_state()
  trainable = jax.device_get(state.params)
  names = [tuple(k.key for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(trainable)[0]]
  wanted = (lambda p: lora.is_adapter(p)) if method == "lora" else (lambda p: p[-1] == "bias")
  assert names and all(wanted(p) for p in names)
  # Every other parameter is frozen: together they are the whole model.
  assert peft.count(trainable) + peft.count(trainer.frozen) == trainer.num_params
  assert trainer.num_trainable == peft.count(trainable) < trainer.num_params / 10
  # Adam's moments (mu, nu) exist for the trainable parameters only, and nothing else does.
  adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(
      x, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)]
  assert len(adam) == 1
  assert peft.count(adam[0].mu) == peft.count(adam[0].nu) == trainer.num_trainable
  # + the step counts of Adam and of the schedule
  assert peft.count(state.opt_state) == 2 * trainer.num_trainable + 2

  frozen_before = jax.device_get(trainer.frozen)
  for i in range(3):
    state, step_metrics = trainer.train_step(state, trainer.shard_batch(batch(i, b=8, length=16)))
  assert np.isfinite(float(step_metrics["loss"]))
  chex.assert_trees_all_equal(jax.device_get(trainer.frozen), frozen_before)
  after = jax.device_get(state.params)
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after),
                                                     jax.tree.leaves(trainable))]
  assert all(moved)


def test_flops_count_no_weight_gradients_for_frozen_kernels(one_device):
  trainer = peft_trainer("lora", one_device, **{"model.d_model": 128, "model.d_ff": 512,
                                                "data.seq_len": 32, "model.max_len": 32,
                                                "peft.rank": 8})
  b, s = trainer.config.train.batch_size, trainer.seq_len
  batch = {k: jax.ShapeDtypeStruct((b, s), jnp.float32 if k == "weights" else jnp.int32,
                                   sharding=trainer.batch_sharding)
           for k in ("inputs", "targets", "weights")}
  with trainer.on_mesh():
    cost = trainer.lower_train_step(batch).compile().cost_analysis()
  xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
  ours = metrics.train_flops_per_token(trainer.abstract_params, trainer.model_cfg, s,
                                       True, trainer.abstract_frozen) * b * s
  full = metrics.train_flops_per_token(trainer.abstract_params, trainer.model_cfg, s) * b * s
  assert 0.9 < xla / ours < 1.35, xla / ours  # XLA adds norms, softmax, the optimizer
  assert ours < 0.85 * full


def test_config_and_model_errors_name_the_field(one_device):
  c = tiny_config(**{"peft.method": "lora"})
  with pytest.raises(ConfigError, match="peft.method: lora fine-tunes a pretrained model"):
    validate(c, 1)
  c.init_from = "/somewhere"
  c.peft.targets = "attn/(query"
  with pytest.raises(ConfigError, match="peft.targets: 'attn/\\(query' is not a regular"):
    validate(c, 1)
  with pytest.raises(UserError, match="peft.targets: 'nothing' matches none"):
    peft_trainer("lora", one_device, **{"peft.targets": "nothing"})
  with pytest.raises(UserError, match="bitfit trains the bias vectors, and this model has none"):
    peft_trainer("bitfit", one_device, **{"model.use_bias": False})


@pytest.fixture(scope="module")
def base_workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("base"))
  c = tiny_config(**{"train.num_steps": 4, "train.eval_every": 4, "train.checkpoint_every": 4,
                     "sample.num_tokens": 0})
  run(c, workdir, devices=jax.devices()[:1])
  return workdir


def lora_config(base):
  c = tiny_config(**{"peft.method": "lora", "peft.rank": 4, "peft.dropout": 0.1,
                     "peft.targets": r"attn/(query|value)$", "train.learning_rate": 1e-2,
                     "train.eval_every": 100, "sample.num_tokens": 4})
  c.init_from = base
  return c


def test_a_lora_run_saves_adapters_resumes_and_serves_merged(base_workdir, tmp_path, one_device):
  whole = run(lora_config(base_workdir), str(tmp_path / "whole"), devices=one_device)
  assert whole.sample  # decoded with the adapters merged
  split = str(tmp_path / "split")
  run(lora_config(base_workdir), split, devices=one_device, stop_after=3)
  resumed = run(lora_config(base_workdir), split, devices=one_device)
  assert [resumed.train_losses[s] for s in (4, 5, 6)] == \
      [whole.train_losses[s] for s in (4, 5, 6)]

  # The checkpoint holds the adapters (and Adam's moments for them) and a pointer.
  checkpointer = Checkpointer(str(tmp_path / "whole"), keep=None)
  saved = checkpointer.manager.item_metadata(6)["state"].tree["params"]
  names = [tuple(k.key for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(saved)[0]]
  assert names and all(lora.is_adapter(n) for n in names)
  base_info = checkpointer.read_meta(6)["base"]
  checkpointer.close()
  assert base_info["pin"]["workdir"] == base_workdir

  # Served: the plain model with merged kernels; its logits equal the unmerged adapters'.
  loaded = load(str(tmp_path / "whole"))
  served = jax.device_get(loaded.params)
  here = sharding.replicated(loaded.mesh)
  base = trees.nest(pretrained.from_workdir(base_workdir).read(here))
  restored = trees.nest(pretrained.from_workdir(
      str(tmp_path / "whole"), ("checkpoints",)).read(here))
  assert "lora_a" not in str(jax.tree_util.tree_structure(served))
  # Untargeted weights are the base's, bit for bit.
  np.testing.assert_array_equal(served["layer_1"]["mlp"]["wi"]["kernel"],
                                base["layer_1"]["mlp"]["wi"]["kernel"])
  np.testing.assert_array_equal(served["embed"]["embedding"], base["embed"]["embedding"])
  chex.assert_trees_all_equal(served, restored)

  trainer = Trainer(lora_config(base_workdir), loaded.tokenizer.vocab_size, loaded.mesh)
  checkpointer = Checkpointer(str(tmp_path / "whole"), keep=None)
  factors = jax.device_get(checkpointer.restore_state(
      6, sharding.abstract_like(trainer.abstract_state, trainer.state_shardings)).params)
  checkpointer.close()
  assert any(np.abs(f).max() > 0 for f in jax.tree.leaves(factors))
  x = batch(length=12)
  x["inputs"] = x["inputs"] % loaded.tokenizer.vocab_size
  unmerged = forward(trainer.task, peft.join(base, factors), x)
  chex.assert_trees_all_close(forward(tasks.make("causal", trainer.model_cfg), served, x), unmerged,
                              atol=1e-5)


def test_a_changed_base_is_refused(base_workdir, one_device):
  here = sharding.replicated(sharding.make_mesh(tiny_config().mesh, one_device))
  source = pretrained.from_workdir(base_workdir)
  tensors = source.read(here)
  described = pretrained.describe_base(source, tensors)
  assert pretrained.read_base(described, here).keys() == tensors.keys()
  with pytest.raises(UserError, match="changed since the run started"):
    pretrained.read_base({**described, "fingerprint": "0" * 32}, here)
  tensors["embed/embedding"] = tensors["embed/embedding"] + 1e-7
  assert peft.fingerprint(tensors) != described["fingerprint"]
  # Layout-independent: stacked (scanned) copies of the same weights give the same digest.
  tensors = source.read(here)
  assert peft.fingerprint(trees.stack_layers(tensors)) == described["fingerprint"]
