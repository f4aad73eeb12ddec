"""Preference tuning (lm/tasks/preference.py): the DPO, cDPO and IPO losses, rewards and
gradients against numpy's closed forms; policy = reference gives log 2 and a step prefers
the chosen reply; LoRA-DPO's reference is the base itself (no second copy), full
fine-tuning's a frozen copy; the token KL against numpy; runs of both resume exactly."""

import json
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from lm import loop, sharding
from lm.data import conversations, packing
from lm.data.tokenizers import ByteTokenizer
from lm.errors import ConfigError, UserError
from lm.model_setup import ModelSetup
from lm.models import ModelConfig, lora
from lm.tasks import preference

BETA = 0.3


def _numpy_losses(pc, pr, rc, rr, beta, loss, smoothing):
  h = (pc - rc) - (pr - rr)
  log_sigmoid = lambda x: -np.log1p(np.exp(-x))
  if loss == "ipo":
    return (h - 1 / (2 * beta)) ** 2
  return -(1 - smoothing) * log_sigmoid(beta * h) - smoothing * log_sigmoid(-beta * h)


@pytest.mark.parametrize("loss,smoothing", [("dpo", 0.0), ("dpo", 0.1), ("ipo", 0.0)])
def test_losses_rewards_and_gradients_match_numpy(loss, smoothing):
  rng = np.random.default_rng(0)
  pc, pr, rc, rr = (rng.normal(-20, 5, 6) for _ in range(4))
  losses, chosen, rejected = preference.preference_losses(pc, pr, rc, rr, BETA, loss, smoothing)
  np.testing.assert_allclose(losses, _numpy_losses(pc, pr, rc, rr, BETA, loss, smoothing),
                             rtol=1e-5)
  np.testing.assert_allclose(chosen, BETA * (pc - rc), rtol=1e-5)
  np.testing.assert_allclose(rejected, BETA * (pr - rr), rtol=1e-5)
  grad = jax.grad(lambda p: jnp.sum(preference.preference_losses(
      p, pr, rc, rr, BETA, loss, smoothing)[0]))(jnp.asarray(pc))
  h = (pc - rc) - (pr - rr)
  sigmoid = lambda x: 1 / (1 + np.exp(-x))
  if loss == "ipo":
    expected = 2 * (h - 1 / (2 * BETA))
  else:  # d/dh of -(1-e) log s(bh) - e log s(-bh)
    expected = -(1 - smoothing) * BETA * sigmoid(-BETA * h) + smoothing * BETA * sigmoid(BETA * h)
  np.testing.assert_allclose(grad, expected, rtol=1e-4)


def test_sequence_log_probs_sum_the_weighted_targets():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, (2, 5))
  weights = np.asarray([[0, 0, 1, 1, 0], [1, 1, 1, 1, 1]], np.float32)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected = [sum(logp[b, i, targets[b, i]] * weights[b, i] for i in range(5)) for b in range(2)]
  np.testing.assert_allclose(preference.sequence_log_probs(logits, targets, weights), expected,
                             rtol=1e-5)


def _pairs_file(path, n=24):
  with open(path, "w", encoding="utf-8") as f:
    for i in range(n):
      good, bad = ("yes", "no") if i % 2 == 0 else ("no", "yes")
      f.write(json.dumps({"prompt": f"Is {i} even?", "chosen": good, "rejected": bad}) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def base_workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("dpo") / "base")
  loop.run(tiny_config(**{"train.num_steps": 3, "sample.num_tokens": 0, "data.seq_len": 128,
                          "model.max_len": 128}), workdir, devices=jax.devices()[:1])
  return workdir


def _dpo_config(base, pairs, **overrides):
  config = tiny_config(**{"task.objective": "dpo", "data.format": "preference",
                          "data.path": pairs, "data.seq_len": 128, "model.max_len": 128,
                          "peft.method": "lora", "peft.rank": 4, "task.beta": BETA,
                          "train.learning_rate": 1e-2, "train.warmup_steps": 1,
                          "train.num_steps": 6, "train.eval_every": 3,
                          "train.checkpoint_every": 100, "sample.num_tokens": 0, **overrides})
  config.init_from = base
  return config


def test_policy_equal_to_reference_gives_log_2_and_a_step_prefers_the_chosen(tmp_path):
  tokenizer = ByteTokenizer()
  pair = conversations.encode_pair([{"role": "user", "content": "Is 4 even?"}], "yes", "no",
                                   tokenizer)
  batch = packing.pair_rows([pair], [0], 128, tokenizer.pad_id)
  cfg = ModelConfig(vocab_size=tokenizer.vocab_size, num_layers=2, num_heads=4,
                    num_kv_heads=2, d_model=32, d_ff=64, max_len=128, positions="rope")
  task = preference.DPO(cfg, adapters=lora.Adapters(rank=4, targets=r"attn/(query|value)$"),
                        options={"beta": BETA})
  params = nn.unbox(task.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  assert any(lora.is_adapter(tuple(k.key for k in p))
             for p, _ in jax.tree_util.tree_flatten_with_path(params)[0])
  loss, count = jax.jit(task.loss)(params, batch)
  assert count == 1 and float(loss) == pytest.approx(math.log(2), abs=1e-6)  # B = 0: pi = ref
  adapters_only = lambda path: lora.is_adapter(path)
  grads = jax.jit(jax.grad(lambda p: task.loss(p, batch)[0]))(params)
  moved = jax.tree_util.tree_map_with_path(
      lambda path, p, g: p - 0.5 * g if adapters_only(tuple(k.key for k in path)) else p,
      params, grads)
  after = task.summarize([jax.device_get(jax.jit(task.eval_outputs)(moved, batch))])
  assert after["reward_chosen"] > after["reward_rejected"] and after["loss"] < math.log(2)


def test_lora_dpo_holds_one_copy_of_the_base(base_workdir, tmp_path, one_device):
  """The parameters on device: the frozen base once and the adapters; the reference is no
  third tree (it is the base with the adapters off)."""
  config = _dpo_config(base_workdir, _pairs_file(tmp_path / "p.jsonl"))
  mesh = sharding.make_mesh(config.mesh, one_device)
  setup = ModelSetup(config, ByteTokenizer().vocab_size, mesh)
  plain = config.copy_and_resolve_references()
  plain.peft.method, plain.task.objective, plain.data.format = "", "causal", "text"
  base = ModelSetup(plain, ByteTokenizer().vocab_size, mesh)
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  assert count(setup.abstract_frozen) == count(base.abstract_params)  # the base, once
  trainable = jax.tree_util.tree_flatten_with_path(setup.abstract_trainable)[0]
  assert trainable and all(lora.is_adapter(tuple(k.key for k in p)) for p, _ in trainable)


def test_full_fine_tuning_dpo_holds_a_frozen_copy_of_the_base(base_workdir, tmp_path,
                                                               one_device):
  """Without adapters every model weight trains, and the frozen tree is the reference: one
  copy of the base, beside the policy's trainable copy."""
  config = _dpo_config(base_workdir, _pairs_file(tmp_path / "p.jsonl"), **{"peft.method": ""})
  mesh = sharding.make_mesh(config.mesh, one_device)
  setup = ModelSetup(config, ByteTokenizer().vocab_size, mesh)
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  assert count(setup.abstract_trainable) == count(setup.abstract_params)
  assert list(setup.abstract_frozen) == [preference.REFERENCE]
  assert (jax.tree.structure(setup.abstract_frozen[preference.REFERENCE])
          == jax.tree.structure(setup.abstract_params))


def test_token_kl_matches_numpy():
  rng = np.random.default_rng(2)
  p_logits, q_logits = rng.normal(size=(2, 2, 3, 7)).astype(np.float32)
  p = np.exp(p_logits) / np.exp(p_logits).sum(-1, keepdims=True)
  q = np.exp(q_logits) / np.exp(q_logits).sum(-1, keepdims=True)
  np.testing.assert_allclose(preference.token_kl(p_logits, q_logits),
                             (p * np.log(p / q)).sum(-1), rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(preference.token_kl(p_logits, p_logits), np.zeros((2, 3)),
                              atol=1e-6)


@pytest.mark.parametrize("method", ["lora", ""])
def test_dpo_trains_evaluates_and_resumes_exactly(base_workdir, tmp_path, one_device, method):
  config = _dpo_config(base_workdir, _pairs_file(tmp_path / "p.jsonl"),
                       **{"peft.method": method})
  if not method:
    config.train.learning_rate = 1e-3  # every weight moves
  straight = loop.run(config, str(tmp_path / "a"), devices=one_device)
  first = loop.run(config, str(tmp_path / "b"), devices=one_device, stop_after=3)
  second = loop.run(config, str(tmp_path / "b"), devices=one_device)
  assert {**first.train_losses, **second.train_losses} == straight.train_losses
  assert straight.train_losses[1] == pytest.approx(math.log(2), abs=1e-5)  # pi = ref
  assert straight.train_losses[6] < straight.train_losses[1]
  evaluation = straight.eval["validation"]
  assert set(evaluation) >= {"reward_chosen", "reward_rejected", "reward_margin",
                             "reward_accuracy", "kl_per_token"}
  assert evaluation["kl_per_token"] > 0  # the policy has left the reference


def test_bad_preference_input_is_one_line(base_workdir, tmp_path, one_device):
  pairs = tmp_path / "same.jsonl"
  pairs.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n" +
                   json.dumps({"prompt": "p", "chosen": "a", "rejected": "a"}) + "\n",
                   encoding="utf-8")
  with pytest.raises(UserError, match="same.jsonl line 2: chosen equals rejected"):
    loop.run(_dpo_config(base_workdir, str(pairs)), str(tmp_path / "r"), devices=one_device)
  no_reference = _dpo_config(base_workdir, _pairs_file(tmp_path / "p.jsonl"),
                             **{"peft.method": ""})
  no_reference.init_from = ""
  with pytest.raises(ConfigError, match="init_from"):
    loop.run(no_reference, str(tmp_path / "s"), devices=one_device)
  assert not (tmp_path / "r" / "checkpoints").exists()
