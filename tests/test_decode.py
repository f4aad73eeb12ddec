"""Cached decoding against full recomputation, padding, sampling rules, stops and seeds."""

import dataclasses

import chex
import flax.linen as nn
import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
import pytest

from lm import sharding
from lm.decode import Sampling, argmax, decode, filter_logits, generate, outputs, prefill
from lm.decode import categorical, sample_logits
from lm.models import Decoder, ModelConfig
from lm.models.transformer import init_cache

GREEDY = Sampling(temperature=0.0)


def make_model(positions="rope", sharpen=30.0, **kw):
  cfg = ModelConfig(vocab_size=40, num_layers=2, num_heads=4, num_kv_heads=2, d_model=32,
                    d_ff=64, max_len=16, positions=positions, **kw)
  model = Decoder(cfg)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"])
  # Sharpen the output so greedy choices are well separated from ties.
  params["embed"]["embedding"] = params["embed"]["embedding"] * sharpen
  return model, params


_FULL = {}


def full_logits(model, params, tokens):
  """Logits of a whole forward pass. The tokens are right-padded to max_len, which changes
  none of their logits (the model is causal), so each model compiles once."""
  if id(model) not in _FULL:
    _FULL[id(model)] = (model, jax.jit(lambda p, x: model.apply({"params": p}, x)))
  padded = np.zeros((1, model.cfg.max_len), np.int32)
  padded[0, :len(tokens)] = tokens
  return np.asarray(_FULL[id(model)][1](params, padded))[0, :len(tokens)]


def host_greedy(model, params, prompt, num_tokens):
  """A full forward pass per token; the context keeps growing until max_len, then restarts
  from its last half (the rule `generate` documents)."""
  max_len = model.cfg.max_len
  ctx, out = list(prompt)[-max_len:], []
  for _ in range(num_tokens):
    if len(ctx) == max_len:
      ctx = ctx[-(max_len // 2):]
    ctx.append(int(full_logits(model, params, ctx)[-1].argmax()))
    out.append(ctx[-1])
  return out


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_cached_logits_equal_full_recomputation(positions):
  model, params = make_model(positions, sharpen=1.0)
  tokens = [5, 3, 9, 1, 7, 2, 8, 6, 4, 11]
  cache = init_cache(model.cfg, 1, 16)
  step = jax.jit(lambda p, x, c: model.apply({"params": p}, x, cache=c))
  logits, cache = step(params, jnp.asarray([tokens[:4]]), cache)
  cached = list(np.asarray(logits)[0])
  for t in tokens[4:]:  # then one token at a time
    logits, cache = step(params, jnp.asarray([[t]]), cache)
    cached.append(np.asarray(logits)[0, 0])
  np.testing.assert_allclose(np.stack(cached), full_logits(model, params, tokens), atol=2e-5)
  # A prefill asks for the last position's logits only.
  last, _ = model.apply({"params": params}, jnp.asarray([tokens]), last_only=True,
                        cache=init_cache(model.cfg, 1, 16))
  chex.assert_shape(last, (1, 1, 40))
  np.testing.assert_allclose(np.asarray(last)[0, 0], full_logits(model, params, tokens)[-1],
                             atol=2e-5)


@pytest.mark.parametrize("global_every", [0, 2])
def test_sliding_window_holds_in_cached_decoding_past_the_window(global_every):
  """A 3-token window (every layer local, or Gemma's alternation): cached logits equal full
  recomputation for 10 tokens, and left-padded rows decode as they do alone."""
  model, params = make_model("rope", sharpen=1.0, sliding_window=3, global_every=global_every,
                             attn_softcap=0.5, final_softcap=2.0)
  tokens = [5, 3, 9, 1, 7, 2, 8, 6, 4, 11]
  windowless, _ = make_model("rope", sharpen=1.0)
  assert np.abs(full_logits(model, params, tokens) -
                full_logits(windowless, params, tokens)).max() > 1e-3
  cache = init_cache(model.cfg, 1, 16)
  step = jax.jit(lambda p, x, c: model.apply({"params": p}, x, cache=c))
  logits, cache = step(params, jnp.asarray([tokens[:2]]), cache)
  cached = list(np.asarray(logits)[0])
  for t in tokens[2:]:
    logits, cache = step(params, jnp.asarray([[t]]), cache)
    cached.append(np.asarray(logits)[0, 0])
  np.testing.assert_allclose(np.stack(cached), full_logits(model, params, tokens), atol=2e-5)
  sharp, sharp_params = make_model("rope", sliding_window=3, global_every=global_every)
  prompts = [[7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [4, 4, 2, 1, 3]]
  together = generate(sharp, sharp_params, prompts, 5, GREEDY)
  assert together == [generate(sharp, sharp_params, [p], 5, GREEDY)[0] for p in prompts]
  assert together == [host_greedy(sharp, sharp_params, p, 5) for p in prompts]


def test_bfloat16_cached_logits_track_full_recomputation():
  """With bfloat16 compute (the cache is float32 on CPU, see ModelConfig.cache_dtype)."""
  model, params = make_model("rope", sharpen=1.0, dtype="bfloat16")
  tokens = [5, 3, 9, 1, 7, 2, 8, 6]
  cache = init_cache(model.cfg, 1, 16)
  step = jax.jit(lambda p, x, c: model.apply({"params": p}, x, cache=c))
  logits, cache = step(params, jnp.asarray([tokens[:3]]), cache)
  cached = list(np.asarray(logits)[0])
  for t in tokens[3:]:
    logits, cache = step(params, jnp.asarray([[t]]), cache)
    cached.append(np.asarray(logits)[0, 0])
  full = full_logits(model, params, tokens)
  assert np.max(np.abs(np.stack(cached) - full)) < 0.05 * np.max(np.abs(full))


def test_argmax_is_numpys_first_maximum():
  rng = np.random.default_rng(0)
  logits = rng.integers(0, 5, (64, 37)).astype(np.float32)  # many ties
  logits[3] = -np.inf
  logits[4, :] = 2.0
  np.testing.assert_array_equal(np.asarray(argmax(jnp.asarray(logits))), logits.argmax(-1))


@pytest.mark.parametrize("num_tokens", [6, 30])  # 30 runs past max_len = 16
def test_greedy_generation_equals_a_host_loop(num_tokens):
  model, params = make_model()
  prompt = [3, 1, 4, 1, 5]
  out = generate(model, params, [prompt], num_tokens, GREEDY)
  assert out == [host_greedy(model, params, prompt, num_tokens)]


def test_every_window_shares_one_compiled_prefill_and_decode():
  from lm import decode as decode_module  # pylint: disable=import-outside-toplevel
  cfg = ModelConfig(vocab_size=40, num_layers=1, num_heads=2, num_kv_heads=2, d_model=16,
                    d_ff=32, max_len=64)
  model = Decoder(cfg)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  programs = lambda: (decode_module._prefill._cache_size(),  # pylint: disable=protected-access
                      decode_module._decode._cache_size())  # pylint: disable=protected-access
  before = programs()
  # Windows of 61, 32, 32 and 13 tokens from 3-, 32-, 32- and 32-token contexts.
  out = generate(model, params, [[1, 2, 3]], 138, GREEDY)
  assert len(out[0]) == 138
  assert np.subtract(programs(), before).tolist() == [1, 1]
  # The same tokens as windows each sized to fit: padding changes nothing.
  ids = [1, 2, 3]
  while len(ids) < 3 + 138:
    context = ids if len(ids) < 64 else ids[-32:]
    ids += generate(model, params, [context], min(64 - len(context), 3 + 138 - len(ids)),
                    GREEDY)[0]
  assert out[0] == ids[3:]


def test_left_padding_changes_no_row():
  model, params = make_model("learned")
  prompts = [[7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [4, 4, 2]]
  together = generate(model, params, prompts, 5, GREEDY)
  assert together == [generate(model, params, [p], 5, GREEDY)[0] for p in prompts]
  # The logits too: a left-padded row's last position equals the row run alone.
  cache = init_cache(model.cfg, 2, 12, start_B=jnp.asarray([6, 0]))
  batch = jnp.asarray([[0, 0, 0, 0, 0, 0, 4, 4, 2, 9, 9, 9], list(range(12))])
  logits, _ = model.apply({"params": params}, batch[:, :9], cache=cache)
  np.testing.assert_allclose(np.asarray(logits)[0, -1],
                             full_logits(model, params, [4, 4, 2])[-1], atol=2e-5)


def test_filter_logits_keeps_exactly_the_top_k_and_nucleus():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 50)).astype(np.float32) * 3
  top_k, top_p = np.array([5, 0, 3]), np.array([1.0, 0.7, 0.9])
  kept = np.isfinite(np.asarray(filter_logits(jnp.asarray(logits), jnp.asarray(top_k),
                                              jnp.asarray(top_p, jnp.float32))))
  for row in range(3):  # numpy reference: sort, keep the smallest prefix with mass >= p
    order = np.argsort(-logits[row])
    probs = np.exp(logits[row][order] - logits[row].max())
    probs /= probs.sum()
    n_p = int(np.searchsorted(np.cumsum(probs), top_p[row] - 1e-6) + 1) if top_p[row] < 1 else 50
    n = min(n_p, top_k[row] or 50)
    assert set(np.flatnonzero(kept[row])) == set(order[:n])


def test_filter_logits_with_ties_equals_a_sorting_reference():
  rng = np.random.default_rng(1)
  logits = np.round(rng.normal(size=(12, 1000)) * 2, 1).astype(np.float32)  # many ties
  logits[0, :500] = -np.inf
  top_k = np.array([0, 1, 7, 50, 999, 0, 0, 0, 3, 20, 1000, 0])
  top_p = np.array([0.9, 1.0, 1.0, 0.5, 1.0, 0.05, 0.3, 0.999, 0.8, 0.2, 0.97, 1.0])
  kept = np.isfinite(np.asarray(filter_logits(jnp.asarray(logits), jnp.asarray(top_k),
                                              jnp.asarray(top_p, jnp.float32))))
  for row in range(12):  # the k-th best value and the nucleus's last value, ties included
    values = np.sort(logits[row])[::-1]
    kth = values[top_k[row] - 1] if 0 < top_k[row] < 1000 else -np.inf
    probs = np.exp(values.astype(np.float64) - values[0])
    probs /= probs.sum()
    before = np.cumsum(probs) - probs
    pth = values[np.flatnonzero(before < top_p[row])[-1]] if top_p[row] < 1 else -np.inf
    np.testing.assert_array_equal(kept[row], logits[row] >= max(kth, pth), err_msg=str(row))


def test_categorical_draws_follow_the_softmax():
  probs = np.array([0.05, 0.0, 0.4, 0.25, 0.0, 0.3])
  logits = jnp.asarray(np.where(probs > 0, np.log(np.maximum(probs, 1e-30)) + 3.0, -np.inf),
                       jnp.float32)[None]
  keys = jax.random.split(jax.random.key(1), 20000)
  draws = np.asarray(jax.vmap(lambda k: categorical(k[None], logits)[0])(keys))
  np.testing.assert_allclose(np.bincount(draws, minlength=6) / len(draws), probs, atol=0.012)


def test_samples_never_leave_the_allowed_set():
  logits = jnp.log(jnp.asarray([[0.4, 0.3, 0.15, 0.1, 0.05]] * 2))
  keys = jax.random.split(jax.random.key(0), 3000)
  draw = jax.vmap(lambda k: sample_logits(logits, jnp.stack([k, k]), jnp.ones(2),
                                          jnp.asarray([2, 0]), jnp.asarray([1.0, 0.65])))
  draws = np.asarray(draw(keys))
  assert set(np.unique(draws[:, 0])) == {0, 1}  # top-k 2
  assert set(np.unique(draws[:, 1])) == {0, 1}  # top-p 0.65: 0.4 + 0.3 covers it
  assert np.mean(draws[:, 0] == 0) == pytest.approx(0.4 / 0.7, abs=0.03)
  greedy = sample_logits(logits, jnp.stack([keys[0]] * 2), jnp.zeros(2), jnp.zeros(2, int),
                         jnp.ones(2))
  assert list(np.asarray(greedy)) == [0, 0]


def test_repetition_penalty_follows_the_ctrl_rule():
  model, params = make_model(sharpen=3.0)
  prompt = [3, 1, 4, 1, 5]
  logits = full_logits(model, params, prompt)[-1]
  penalised = np.where(np.isin(np.arange(40), prompt),
                       np.where(logits > 0, logits / 4.0, logits * 4.0), logits)
  out = generate(model, params, [prompt], 1, Sampling(temperature=0.0, repetition_penalty=4.0))
  assert out == [[int(penalised.argmax())]]


def test_stop_tokens_end_their_row_only():
  model, params = make_model()
  prompts = [[3, 1, 4], [9, 9, 2]]
  free = generate(model, params, prompts, 8, GREEDY)
  stop = free[0][2]
  stopped = generate(model, params, prompts, 8, GREEDY, stop_ids=(stop,))
  first = free[0].index(stop)
  assert stopped[0] == free[0][:first + 1]
  assert stopped[1] == (free[1][:free[1].index(stop) + 1] if stop in free[1] else free[1])


def test_each_row_has_its_own_seed():
  model, params = make_model(sharpen=0.3)
  hot = Sampling(temperature=1.5, top_p=0.95)
  alone = generate(model, params, [[1, 2]], 10, dataclasses.replace(hot, seed=7))
  batch = generate(model, params, [[5, 6, 7], [1, 2]], 10,
                   [dataclasses.replace(hot, seed=3), dataclasses.replace(hot, seed=7)])
  assert batch[1] == alone[0]
  other = generate(model, params, [[1, 2]], 10, dataclasses.replace(hot, seed=8))
  assert other != alone


def test_chunked_decoding_equals_one_call():
  model, params = make_model()
  state = prefill(model, params, [[3, 1, 4]], 8, [GREEDY])
  for _ in range(7):
    state = decode(model, params, state, 1)
  assert outputs(state, 1) == generate(model, params, [[3, 1, 4]], 8, GREEDY)


def test_empty_prompt_is_rejected():
  model, params = make_model()
  with pytest.raises(ValueError, match="at least one token"):
    generate(model, params, [[]], 3)


def test_kv_cache_is_sharded_by_the_logical_rules():
  model, params = make_model()  # 2 kv heads
  prompts = [[3, 1, 4], [9, 2], [5, 5, 5, 5], [7]]
  alone = generate(model, params, prompts, 6, GREEDY)
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 2, "fsdp": 1, "tensor": 2}),
                            jax.devices()[:4])
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    state = prefill(model, params, prompts, 8, [GREEDY] * 4)
    spec = state.cache["layers"][0]["k"].sharding.spec  # [B, K, S, Dh]
    assert spec[0] in ("data", ("data", "fsdp"), ("data",)) and spec[1] == "tensor"
    assert generate(model, params, prompts, 6, GREEDY) == alone
