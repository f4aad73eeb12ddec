"""Sampling from a decoder: greedy, temperature and top-k.

This first version recomputes the model over a window of at most `max_len` tokens for every
new token (no KV cache), but the whole loop runs on device in one jitted `lax.fori_loop`,
with static shapes and no host round trip per token.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def sample_logits(logits_BxV, rng, temperature, top_k):
  """Greedy when temperature == 0, else softmax(logits / temperature) over the top k."""
  if temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = logits_BxV / temperature
  if top_k and top_k < logits_BxV.shape[-1]:
    kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
  return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "num_tokens", "temperature", "top_k"))
def _generate(model, params, prompt_BxP, rng, num_tokens, temperature, top_k):
  b, p = prompt_BxP.shape
  total = p + num_tokens
  window = min(model.cfg.max_len, total)
  tokens_BxT = jnp.concatenate([prompt_BxP, jnp.zeros((b, num_tokens), jnp.int32)], axis=1)

  def body(i, tokens_BxT):
    start = jnp.clip(i - window, 0, total - window)
    window_BxW = jax.lax.dynamic_slice_in_dim(tokens_BxT, start, window, axis=1)
    logits_BxWxV = model.apply({"params": params}, window_BxW)
    logits_BxV = jax.lax.dynamic_index_in_dim(logits_BxWxV, i - 1 - start, axis=1,
                                              keepdims=False)
    next_B = sample_logits(logits_BxV, jax.random.fold_in(rng, i), temperature, top_k)
    return jax.lax.dynamic_update_slice_in_dim(tokens_BxT, next_B[:, None], i, axis=1)

  tokens_BxT = jax.lax.fori_loop(p, total, body, tokens_BxT)
  return tokens_BxT[:, p:]


def generate(model, params, prompt_ids, num_tokens, rng, temperature=1.0, top_k=0):
  """Continues each row of `prompt_ids` [B, P] by `num_tokens` ids; returns [B, num_tokens]."""
  prompt_BxP = jnp.asarray(np.atleast_2d(prompt_ids), jnp.int32)
  if prompt_BxP.shape[1] == 0:
    raise ValueError("generate: the prompt is empty; give at least one token")
  if num_tokens == 0:
    return np.zeros((prompt_BxP.shape[0], 0), np.int32)
  return np.asarray(_generate(model, params, prompt_BxP, rng, int(num_tokens),
                              float(temperature), int(top_k)))
