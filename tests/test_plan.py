"""lm.plan: its parameter count and FLOPs against the real model and XLA's own count."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from conftest import REPO, tiny_config, user_env
from lm import metrics, plan, sharding
from lm.models import ModelConfig
from lm.train import Trainer

VARIANTS = [
    {},
    {"model.mlp": "swiglu", "model.norm": "rmsnorm", "model.positions": "rope"},
    {"model.use_bias": True, "model.tie_embeddings": False, "model.num_kv_heads": 1},
    {"model.use_bias": True, "model.mlp": "gelu_tanh", "model.num_layers": 3},
]


@pytest.mark.parametrize("overrides", VARIANTS)
def test_parameter_count_and_flops_match_the_real_model(overrides, one_device):
  config = tiny_config(**overrides)
  trainer = Trainer(config, 64, sharding.make_mesh(config.mesh, one_device))
  real = sum(x.size for x in jax.tree.leaves(trainer.abstract_state.params))
  p = plan.make_plan(config, "cpu", 1, 0.4, vocab=64)
  assert p.params == real
  assert p.flops_per_token == metrics.train_flops_per_token(
      trainer.abstract_state.params, trainer.model_cfg, config.data.seq_len)


def _closed_form(m, vocab, seq_len):
  """Parameters and training FLOPs per token of lm's Decoder, from the architecture alone."""
  d, f, h, k = m.d_model, m.d_ff, m.num_heads, m.num_kv_heads
  dh, bias, up = d // h, m.use_bias, 2 if m.mlp == "swiglu" else 1
  attention = d * h * dh + 2 * d * k * dh + h * dh * d
  params_attention = attention + (bias * (h * dh + 2 * k * dh + d))
  mlp = up * d * f + f * d
  params_mlp = mlp + bias * (up * f + d)
  norm = d * (2 if m.norm == "layernorm" and bias else 1)
  params = m.num_layers * (params_attention + params_mlp + 2 * norm) + norm + vocab * d
  params += m.max_len * d if m.positions == "learned" else 0
  params += 0 if m.tie_embeddings else d * vocab + (vocab if bias else 0)
  flops = 6 * (m.num_layers * (attention + mlp) + vocab * d) + 12 * m.num_layers * d * seq_len
  return params, flops


@pytest.mark.parametrize("overrides", VARIANTS)
def test_parameter_count_and_flops_match_a_closed_form(overrides):
  config = tiny_config(**overrides)
  p = plan.make_plan(config, "cpu", 1, 0.4, vocab=64)
  assert (p.params, p.flops_per_token) == _closed_form(config.model, 64, config.data.seq_len)


def test_flops_agree_with_xla_cost_analysis(one_device):
  config = tiny_config(**{"model.d_model": 128, "model.d_ff": 512, "model.num_heads": 4,
                          "model.num_kv_heads": 4, "data.seq_len": 32, "model.max_len": 32})
  trainer = Trainer(config, 256, sharding.make_mesh(config.mesh, one_device))
  b, s = config.train.batch_size, config.data.seq_len
  batch = {k: jax.ShapeDtypeStruct((b, s), jnp.float32 if k == "weights" else jnp.int32,
                                   sharding=trainer.batch_sharding)
           for k in ("inputs", "targets", "weights")}
  with trainer.on_mesh():
    compiled = trainer.lower_train_step(batch).compile()
  cost = compiled.cost_analysis()
  xla_flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
  planned = plan.make_plan(config, "cpu", 1, 0.4, vocab=256).flops_per_token * b * s
  # XLA also counts norms, softmax, the optimizer and other elementwise work.
  assert 0.9 < xla_flops / planned < 1.35, xla_flops / planned


def test_the_command_prints_a_plan():
  out = subprocess.run([sys.executable, "-m", "lm.plan", f"--config={REPO}/experiments/base.py",
                        "--hardware=h200", "--devices=8", "--mfu=0.5"], cwd=REPO,
                       env=user_env(), capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert "parameters        1,083,136" in out.stdout and "fits in 141.00 GiB" in out.stdout


def test_causal_half_counts_half_of_causal_attention_and_nothing_else():
  """log.attention_flops=causal_half (MaxText's convention) takes half of the causal
  self-attention term, 12 * layers * d_model * seq_len per token, off a decoder's count;
  bidirectional attention (an encoder's) and the encoder-decoder's cross-attention count
  whole."""
  whole = tiny_config()
  half = tiny_config(**{"log.attention_flops": "causal_half"})
  m, s = whole.model, whole.data.seq_len
  assert (plan.make_plan(whole, "cpu", 1, 0.4, vocab=64).flops_per_token
          - plan.make_plan(half, "cpu", 1, 0.4, vocab=64).flops_per_token
          == 6 * m.num_layers * m.d_model * s)
  encoder = {"task.objective": "mlm"}
  assert (plan.make_plan(tiny_config(**encoder), "cpu", 1, 0.4, vocab=64).flops_per_token ==
          plan.make_plan(tiny_config(**encoder, **{"log.attention_flops": "causal_half"}),
                         "cpu", 1, 0.4, vocab=64).flops_per_token)
  cfg = ModelConfig.from_config(whole.model, 64, "cpu")
  source, target = 12, 20
  full = metrics.encoder_decoder_train_flops({}, cfg, source, target, tied_output=False)
  halved = metrics.encoder_decoder_train_flops({}, cfg, source, target, tied_output=False,
                                               causal_share=0.5)
  assert full - halved == 6 * cfg.num_layers * cfg.d_model * target * target


def test_the_plan_names_its_attention_convention():
  out = subprocess.run([sys.executable, "-m", "lm.plan", f"--config={REPO}/experiments/base.py",
                        "--config.log.attention_flops=causal_half"], cwd=REPO, env=user_env(),
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert "causal attention FLOPs counted at half (MaxText)" in out.stdout
  assert '"attention_flops": "causal_half"' in out.stdout


@pytest.mark.parametrize("remat,scores", [("none", 2), ("dots", 1), ("full", 0)])
def test_fused_attention_keeps_no_quadratic_term(remat, scores):
  """The planner's activation memory follows the kernels chosen for the hardware: the
  materialised ones (CPU) keep `scores` [H, S] blocks per token and layer in the compute
  dtype, the fused ones (TPU splash) one float32 log-sum-exp per head; under full remat
  only the recomputed block differs, by the whole 2 H S term."""
  config = tiny_config(**{"model.dtype": "bfloat16", "data.seq_len": 512,
                          "model.max_len": 512, "model.remat": remat})
  m, s = config.model, 512
  fused = plan.make_plan(config, "tpu_v5p", 1, 0.4, vocab=64)
  materialised = plan.make_plan(config, "cpu", 1, 0.4, vocab=64)
  assert (fused.kernels, fused.attention) == ("splash", "fused")
  assert (materialised.kernels, materialised.attention) == ("cpu", "materialised")
  tokens = config.train.batch_size * s
  per_token = (m.num_layers * (scores * m.num_heads * s * 2 - 4 * m.num_heads) if scores
               else 2 * m.num_heads * s * 2 - 4 * m.num_heads)
  assert materialised.activation_bytes - fused.activation_bytes == pytest.approx(
      tokens * per_token)


def test_attention_flops_follow_the_head_size_and_the_sliding_window():
  """12 x (heads x head size) x keys per layer and token: a local layer's keys are its
  window (Gemma's alternation: half the layers), a global layer's the whole sequence; with
  no parameters counted, that term is all there is."""
  config = tiny_config(**{"model.num_layers": 4, "data.seq_len": 32, "model.max_len": 32,
                          "model.positions": "rope", "model.head_size": 16,
                          "model.sliding_window": 8, "model.global_every": 2})
  cfg = ModelConfig.from_config(config.model, 64, "cpu")
  assert [cfg.is_local(i) for i in range(4)] == [True, False, True, False]
  assert (metrics.train_flops_per_token({}, cfg, 32, tied_output=False) ==
          12 * cfg.num_heads * 16 * (8 + 32 + 8 + 32))
  plain = ModelConfig.from_config(tiny_config(**{"data.seq_len": 32}).model, 64, "cpu")
  assert (metrics.train_flops_per_token({}, plain, 32, tied_output=False) ==
          12 * plain.num_layers * plain.d_model * 32)
