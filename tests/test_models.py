"""Decoder model: shapes, dtypes, causality, RoPE, axis names (attention itself:
tests/test_kernels.py)."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.models import Decoder, ModelConfig
from lm.models import layers
from lm.models.layers import rotary

VOCAB = 50


def make(**kw):
  cfg = ModelConfig(vocab_size=VOCAB, num_layers=2, num_heads=4, num_kv_heads=2, d_model=32,
                    d_ff=64, max_len=24, **kw)
  model = Decoder(cfg)
  tokens = jax.random.randint(jax.random.key(1), (3, 16), 0, VOCAB)
  params = nn.unbox(model.init(jax.random.key(0), tokens)["params"])
  return model, params, tokens


@pytest.mark.parametrize("variant", [
    dict(),
    dict(positions="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=False, use_bias=True),
    dict(mlp="gelu_tanh", dropout=0.1),
])
def test_logits_shape_and_dtype(variant):
  model, params, tokens = make(**variant)
  logits = model.apply({"params": params}, tokens)
  chex.assert_shape(logits, (3, 16, VOCAB))
  chex.assert_type(logits, jnp.float32)
  chex.assert_tree_all_finite(logits)


def test_compute_dtype_separate_from_param_dtype():
  model, params, tokens = make(dtype="bfloat16", param_dtype="float32")
  chex.assert_trees_all_equal_dtypes(params, jax.tree.map(lambda x: x.astype(jnp.float32),
                                                          params))
  logits = model.apply({"params": params}, tokens)
  chex.assert_type(logits, jnp.float32)
  f32_model = Decoder(model.cfg.__class__(**{**model.cfg.__dict__, "dtype": "float32"}))
  reference = f32_model.apply({"params": params}, tokens)
  np.testing.assert_allclose(logits, reference, atol=0.1)  # bf16 rounding, same function
  assert not np.allclose(logits, reference, atol=1e-6)  # but really computed in bf16


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_causality(positions):
  """Changing token t changes no logit before t, and does change logits from t on."""
  model, params, tokens = make(positions=positions)
  t = 9
  changed = tokens.at[:, t].set((tokens[:, t] + 1) % VOCAB)
  a = model.apply({"params": params}, tokens)
  b = model.apply({"params": params}, changed)
  np.testing.assert_array_equal(a[:, :t], b[:, :t])
  assert np.abs(a[:, t:] - b[:, t:]).max() > 1e-4


def test_segment_ids_isolate_documents():
  model, params, tokens = make()
  segments = jnp.asarray([[0] * 8 + [1] * 8] * 3)
  positions = jnp.asarray([list(range(8)) * 2] * 3)
  packed = model.apply({"params": params}, tokens, positions, segments)
  second_alone = model.apply({"params": params}, tokens[:, 8:])
  np.testing.assert_allclose(packed[:, 8:], second_alone, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
  q = jax.random.normal(jax.random.key(0), (1, 1, 1, 16))
  k = jax.random.normal(jax.random.key(1), (1, 1, 1, 16))

  def score(pq, pk):
    rq = rotary(q, jnp.asarray([[pq]]), 10000.0)
    rk = rotary(k, jnp.asarray([[pk]]), 10000.0)
    return float(jnp.sum(rq * rk))

  assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-4)
  assert score(0, 0) == pytest.approx(float(jnp.sum(q * k)), abs=1e-5)  # no rotation at 0
  assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)
  np.testing.assert_allclose(jnp.linalg.norm(rotary(q, jnp.asarray([[7]]), 1e4)),
                             jnp.linalg.norm(q), rtol=1e-5)  # a rotation keeps the norm


def test_every_parameter_has_logical_axis_names():
  cfg = ModelConfig(vocab_size=VOCAB, num_layers=1, num_heads=2, num_kv_heads=1, d_model=16,
                    d_ff=32, max_len=8, use_bias=True, tie_embeddings=False, mlp="swiglu")
  boxed = Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  for leaf in leaves:
    assert len(leaf.names) == leaf.value.ndim
  layer = boxed["layer_0"]["attn"]
  assert layer["query"]["kernel"].names == ("embed", "heads", "kv")
  assert layer["key"]["kernel"].names == ("embed", "kv_heads", "kv")
  assert boxed["embed"]["embedding"].names == ("vocab", "embed")
  assert boxed["lm_head"]["kernel"].names == ("embed", "vocab")


def test_tied_embeddings_share_the_table():
  model, params, tokens = make(tie_embeddings=True)
  assert "lm_head" not in params
  logits = model.apply({"params": params}, tokens)
  # Zeroing one embedding row silences that vocabulary entry's logit everywhere.
  params["embed"]["embedding"] = params["embed"]["embedding"].at[7].set(0.0)
  logits = model.apply({"params": params}, tokens)
  np.testing.assert_allclose(logits[..., 7], 0.0, atol=1e-6)


def test_dropout_is_active_only_in_training():
  model, params, tokens = make(dropout=0.5)
  eval_a = model.apply({"params": params}, tokens)
  eval_b = model.apply({"params": params}, tokens)
  np.testing.assert_array_equal(eval_a, eval_b)
  train = model.apply({"params": params}, tokens, deterministic=False,
                      rngs={"dropout": jax.random.key(3)})
  assert np.abs(train - eval_a).max() > 1e-3


def test_exact_gelu_and_its_gradient_match_float64_erf():
  import math  # pylint: disable=import-outside-toplevel
  x = np.linspace(-12.0, 12.0, 4801)
  erf = np.vectorize(math.erf)
  want = 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))
  want_grad = (0.5 * (1.0 + erf(x / math.sqrt(2.0))) +
               x * np.exp(-x * x / 2) / math.sqrt(2 * math.pi))
  x32 = jnp.asarray(x, jnp.float32)
  np.testing.assert_allclose(layers.gelu(x32), want, atol=2e-6, rtol=1e-6)
  np.testing.assert_allclose(jax.vmap(jax.grad(layers.gelu))(x32), want_grad, atol=2e-6,
                             rtol=1e-6)
  np.testing.assert_allclose(layers.gelu(x32, approximate=True),
                             jax.nn.gelu(x32, approximate=True))
