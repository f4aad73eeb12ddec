"""lm.plan: its parameter count and FLOPs against the real model and XLA's own count."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from conftest import REPO, tiny_config, user_env
from lm import metrics, plan, sharding
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
