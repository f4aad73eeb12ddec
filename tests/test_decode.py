"""Sampling: the on-device loop against a plain host loop, and the sampling rules."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.decode import generate, sample_logits
from lm.models import Decoder, ModelConfig


@pytest.fixture(scope="module")
def model_and_params():
  cfg = ModelConfig(vocab_size=40, num_layers=2, num_heads=2, num_kv_heads=1, d_model=32,
                    d_ff=64, max_len=12)
  model = Decoder(cfg)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 12), jnp.int32))["params"])
  # Sharpen the output so greedy choices are well separated from ties.
  params["embed"]["embedding"] = params["embed"]["embedding"] * 30
  return model, params


def host_greedy(model, params, prompt, num_tokens):
  """One full forward pass per token over the last max_len tokens, argmax on the host."""
  tokens = list(prompt)
  for _ in range(num_tokens):
    window = np.asarray(tokens[-model.cfg.max_len:])[None]
    logits = np.asarray(model.apply({"params": params}, window))
    tokens.append(int(logits[0, -1].argmax()))
  return tokens[len(prompt):]


@pytest.mark.parametrize("num_tokens", [5, 20])  # 20 runs past max_len = 12
def test_greedy_equals_a_host_loop(model_and_params, num_tokens):
  model, params = model_and_params
  prompt = [3, 1, 4, 1, 5]
  out = generate(model, params, np.asarray([prompt]), num_tokens, jax.random.key(0),
                 temperature=0.0)
  assert out.shape == (1, num_tokens)
  assert list(out[0]) == host_greedy(model, params, prompt, num_tokens)


def test_top_k_one_is_greedy_and_seeds_repeat(model_and_params):
  model, params = model_and_params
  prompt = np.asarray([[7, 8, 9], [1, 2, 3]])
  greedy = generate(model, params, prompt, 10, jax.random.key(0), temperature=0.0)
  top1 = generate(model, params, prompt, 10, jax.random.key(5), temperature=1.0, top_k=1)
  np.testing.assert_array_equal(greedy, top1)
  flat = {**params, "embed": {"embedding": params["embed"]["embedding"] / 30}}
  a = generate(model, flat, prompt, 10, jax.random.key(1), temperature=1.5)
  b = generate(model, flat, prompt, 10, jax.random.key(1), temperature=1.5)
  c = generate(model, flat, prompt, 10, jax.random.key(2), temperature=1.5)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_sample_logits_respects_top_k_and_temperature():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 4000)
  draws = np.asarray(jax.vmap(lambda k: sample_logits(logits, k, 1.0, 2))(keys))[:, 0]
  assert set(np.unique(draws)) == {0, 1}
  assert np.mean(draws == 0) == pytest.approx(0.5 / 0.8, abs=0.03)  # renormalised top-2
  draws = np.asarray(jax.vmap(lambda k: sample_logits(logits, k, 1.0, 0))(keys))[:, 0]
  np.testing.assert_allclose(np.bincount(draws, minlength=4) / 4000, [0.5, 0.3, 0.15, 0.05],
                             atol=0.03)


def test_empty_prompt_is_rejected(model_and_params):
  model, params = model_and_params
  with pytest.raises(ValueError, match="prompt is empty"):
    generate(model, params, np.zeros((1, 0), np.int32), 3, jax.random.key(0))
