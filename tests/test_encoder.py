"""Encoder, heads, losses and scores: against numpy / scipy and hand computations."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from lm import objectives, scores
from lm.models.heads import EncoderWithHead, HeadSpec
from lm.models.transformer import Encoder, ModelConfig
from lm import tasks

CFG = ModelConfig(vocab_size=50, num_layers=2, num_heads=4, num_kv_heads=4, d_model=32,
                  d_ff=64, max_len=16, use_bias=True)


def _tokens(b=3, length=12, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, length), 5, CFG.vocab_size)


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_padding_and_other_segments_do_not_change_an_examples_outputs(norm_position):
  cfg = ModelConfig(**{**CFG.__dict__, "norm_position": norm_position})
  model = Encoder(cfg)
  tokens = _tokens()
  # Row 0: 7 real tokens then padding; row 1: two packed segments; row 2: no padding.
  segments = np.ones((3, 12), np.int32)
  segments[0, 7:] = 0
  segments[1, 5:] = 2
  params = model.init(jax.random.key(1), tokens, segment_ids_BxL=segments)
  out, _ = model.apply(params, tokens, segment_ids_BxL=segments)
  changed = np.array(tokens)
  changed[0, 7:] = 9  # other padding content
  changed[1, 5:] = 11  # another second segment
  out2, _ = model.apply(params, changed, segment_ids_BxL=segments)
  chex.assert_trees_all_close(out[0, :7], out2[0, :7], atol=1e-6)
  chex.assert_trees_all_close(out[1, :5], out2[1, :5], atol=1e-6)
  # Row 1's first segment alone gives the same outputs: nothing leaks across segments.
  alone, _ = model.apply(params, tokens[1:2, :5], segment_ids_BxL=np.ones((1, 5), np.int32))
  chex.assert_trees_all_close(out[1:2, :5], alone, atol=1e-5)
  # Bidirectional: the last real token changes the first token's output.
  later = np.array(tokens)
  later[2, -1] = (later[2, -1] + 1) % cfg.vocab_size
  assert not np.allclose(out[2, 0], model.apply(params, later, segment_ids_BxL=segments)[0][2, 0])


def _layer_norm(x, p, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _gelu(x):
  return 0.5 * x * (1 + scipy.special.erf(x / np.sqrt(2)))


def test_post_norm_encoder_equals_a_numpy_bert():
  """BERT's layout, written out in numpy from the same parameters."""
  cfg = ModelConfig(**{**CFG.__dict__, "norm_position": "post", "type_vocab_size": 2,
                       "norm_eps": 1e-12, "pooler": True})
  tokens = np.array(_tokens(2, 10))
  types = np.zeros_like(tokens)
  types[:, 5:] = 1
  segments = np.ones_like(tokens)
  segments[1, 8:] = 0
  params = nn.unbox(Encoder(cfg).init(jax.random.key(2), tokens, None, segments, types))
  # Random biases and norm scales, so that each of them is checked too.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  params = jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape)
                                        for x, k in zip(leaves, keys)])
  out, pooled = Encoder(cfg).apply(params, tokens, None, segments, types)

  p = jax.tree.map(np.asarray, params["params"])
  length = tokens.shape[1]
  x = (p["embed"]["embedding"][tokens] + p["pos_embed"]["embedding"][np.arange(length)] +
       p["type_embed"]["embedding"][types])
  x = _layer_norm(x, p["ln_embed"], cfg.norm_eps)
  dh = cfg.head_dim
  for i in range(cfg.num_layers):
    layer = p[f"layer_{i}"]
    a = layer["attn"]
    q = np.einsum("bld,dhk->blhk", x, a["query"]["kernel"]) + a["query"]["bias"]
    k = np.einsum("bld,dhk->blhk", x, a["key"]["kernel"]) + a["key"]["bias"]
    v = np.einsum("bld,dhk->blhk", x, a["value"]["kernel"]) + a["value"]["bias"]
    logits = np.einsum("blhk,bshk->bhls", q, k) / np.sqrt(dh)
    logits = np.where(segments[:, None, None, :] > 0, logits, -1e30)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    h = np.einsum("bhls,bshk->blhk", probs, v)
    h = np.einsum("blhk,hkd->bld", h, a["out"]["kernel"]) + a["out"]["bias"]
    x = _layer_norm(x + h, layer["ln_1"], cfg.norm_eps)
    m = layer["mlp"]
    h = _gelu(x @ m["wi"]["kernel"] + m["wi"]["bias"]) @ m["wo"]["kernel"] + m["wo"]["bias"]
    x = _layer_norm(x + h, layer["ln_2"], cfg.norm_eps)
  real = segments > 0
  np.testing.assert_allclose(np.asarray(out)[real], x[real], atol=2e-4, rtol=2e-4)
  expected_pooled = np.tanh(x[:, 0] @ p["pooler"]["kernel"] + p["pooler"]["bias"])
  np.testing.assert_allclose(np.asarray(pooled), expected_pooled, atol=2e-4, rtol=2e-4)


def test_mlm_loss_counts_the_masked_positions_only():
  task = tasks.make("mlm", CFG)
  tokens = _tokens(2, 10)
  params = task.init(jax.random.key(0), tokens)
  targets = np.array(_tokens(2, 10, seed=1))
  weights = np.zeros((2, 10), np.float32)
  weights[0, [1, 4]] = 1
  weights[1, 7] = 1
  batch = {"inputs": tokens, "targets": targets, "weights": weights}
  loss_sum, weight_sum = task.loss(params, batch)
  logits = np.asarray(task.apply(params, batch), np.float64)
  log_probs = logits - scipy.special.logsumexp(logits, axis=-1, keepdims=True)
  picked = np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(loss_sum), -(picked * weights).sum(), rtol=1e-5)
  assert float(weight_sum) == 3
  other = targets.copy()
  other[weights == 0] = 0  # targets where nothing is masked do not matter
  assert float(task.loss(params, {**batch, "targets": other})[0]) == float(loss_sum)
  outputs = jax.device_get(task.eval_outputs(params, batch))
  hits = (logits.argmax(-1) == targets) * weights
  assert float(outputs["correct_sum"]) == hits.sum()


def test_classification_pooling_and_heads_shapes():
  tokens = _tokens(3, 8)
  segments = np.ones((3, 8), np.int32)
  segments[0, 3:] = 0
  for spec, shape in [(HeadSpec("classification", 3, "cls"), (3, 3)),
                      (HeadSpec("classification", 1, "mean"), (3, 1)),
                      (HeadSpec("tagging", 5), (3, 8, 5)),
                      (HeadSpec("mlm"), (3, 8, CFG.vocab_size))]:
    model = EncoderWithHead(CFG, spec)
    params = model.init(jax.random.key(0), tokens, None, segments)
    chex.assert_shape(model.apply(params, tokens, None, segments), shape)
    keys = set(params["params"])
    assert keys == {"encoder", f"{spec.kind}_head"}
  # Mean pooling averages the non-padding hidden states: check through a linear head.
  model = EncoderWithHead(CFG, HeadSpec("classification", 2, "mean"))
  params = nn.unbox(model.init(jax.random.key(0), tokens, None, segments))
  hidden, _ = Encoder(CFG).apply({"params": params["params"]["encoder"]}, tokens, None,
                                 segments)
  head = params["params"]["classification_head"]["out"]
  mask = segments[..., None]
  pooled = (np.asarray(hidden) * mask).sum(1) / mask.sum(1)
  expected = pooled @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
  chex.assert_trees_all_close(model.apply(params, tokens, None, segments), expected, atol=1e-5)


def test_losses_equal_numpy():
  logits = np.array([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3], [1.0, 1.0, -3.0]], np.float32)
  labels = np.array([0, 2, 1])
  weights = np.array([1.0, 1.0, 0.0], np.float32)
  log_probs = logits - scipy.special.logsumexp(logits, axis=-1, keepdims=True)
  expected = -(log_probs[np.arange(3), labels] * weights).sum()
  loss, weight = objectives.classification_loss(jnp.asarray(logits), labels, weights)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
  assert float(weight) == 2
  predictions = np.array([0.5, 2.0, -1.0])
  targets = np.array([1.0, 1.5, 3.0])
  loss, weight = objectives.regression_loss(predictions, targets, weights)
  np.testing.assert_allclose(float(loss), 0.25 + 0.25, rtol=1e-6)
  # Label smoothing e: targets (1 - e) one-hot + e / V.
  e = 0.1
  soft = np.full((3, 3), e / 3)
  soft[np.arange(3), labels] += 1 - e
  expected = -(soft * log_probs).sum(-1) @ weights
  loss, _ = objectives.token_loss(jnp.asarray(logits)[None], labels[None], weights[None],
                                  label_smoothing=e)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_scores_equal_hand_computations_and_scipy():
  predictions = np.array([0, 1, 1, 2, 2, 2, 0])
  labels = np.array([0, 1, 2, 2, 2, 0, 0])
  assert scores.accuracy(predictions, labels) == pytest.approx(5 / 7)
  # Per class (tp, fp, fn): 0: (2, 0, 1) -> 4/5; 1: (1, 1, 0) -> 2/3; 2: (2, 1, 1) -> 2/3.
  assert scores.macro_f1(predictions, labels, 3) == pytest.approx((4 / 5 + 2 / 3 + 2 / 3) / 3)
  # A class absent from both is left out, as scikit-learn does by default.
  assert scores.macro_f1(predictions, labels, 5) == pytest.approx((4 / 5 + 2 / 3 + 2 / 3) / 3)
  rng = np.random.default_rng(0)
  x = rng.normal(size=50)
  y = x + rng.normal(size=50)
  y[:10] = y[0]  # ties
  assert scores.pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y)[0], abs=1e-12)
  assert scores.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y)[0], abs=1e-12)
