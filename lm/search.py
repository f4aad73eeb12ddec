"""Greedy and beam search for the encoder-decoder, in pure JAX (one jitted while loop).

The source is encoded once; the decoder then runs one token per step over its KV cache,
with the cross-attention keys and values computed on the first step and cached
(lm/models/encoder_decoder.py). Outputs stop at eos (kept out of the returned ids).

Beam search keeps `beam_size` live hypotheses per source. Each step scores every one-token
extension, takes the best 2 x beam_size (so that, even if every one ended in eos, beam_size
live ones remain), moves those among the best beam_size that end in eos to the finished
pool with their final score (so a beam of one is greedy search), and keeps the best
beam_size others live. A hypothesis' score is its log-probability over
the GNMT length penalty ((5 + length) / 6) ** alpha, length counting eos (alpha 0: plain
log-probability). A source is done when its worst finished score beats the best score its
live hypotheses could still reach; if nothing finished by max_len, the best live one is
returned.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lm.models.encoder_decoder import init_cache

NEG_INF = -1.0e9  # finite, so that arithmetic on it stays finite
_NOTHING = NEG_INF / 1e3  # below this, a score stands for "no hypothesis"


def length_penalty(length, alpha):
  return ((5.0 + length) / 6.0) ** alpha


def beam_search_core(step, cache, logits_NxV, reorder, batch, beam_size, max_len, eos_id,
                     alpha=0.0):
  """The search over any model. Rows N = batch * beam_size, row b * beam_size + k.

  step(tokens_N, cache) -> (logits_NxV, cache): the next token's logits after `tokens_N`.
  `logits_NxV`: the first token's logits (every beam of a source alike).
  reorder(cache, rows_N) -> the cache with row i taken from row rows_N[i].
  Returns (tokens [B, K, max_len] best first, scores [B, K], lengths [B, K] (eos
  included)), all finished hypotheses first."""
  b, k, t = batch, beam_size, max_len
  v = logits_NxV.shape[-1]
  first = jnp.arange(k) == 0  # identical beams at the start: keep one
  state = {
      "cache": cache, "logits": logits_NxV, "step": jnp.zeros((), jnp.int32),
      "live_seqs": jnp.zeros((b, k, t), jnp.int32),
      "live_logp": jnp.where(first, 0.0, NEG_INF) * jnp.ones((b, 1)),
      "fin_seqs": jnp.zeros((b, k, t), jnp.int32),
      "fin_scores": jnp.full((b, k), NEG_INF),
      "fin_lengths": jnp.zeros((b, k), jnp.int32),
  }

  def done(s):
    best_live = s["live_logp"].max(-1) / length_penalty(t, alpha)
    finished_all = s["fin_scores"].min(-1) >= best_live
    return (s["step"] >= t) | jnp.all(finished_all)

  def body(s):
    pos = s["step"]
    logp_BxKxV = jax.nn.log_softmax(s["logits"].astype(jnp.float32)).reshape(b, k, v)
    scores_BxKV = (s["live_logp"][:, :, None] + logp_BxKxV).reshape(b, k * v)
    top_scores, top_index = jax.lax.top_k(scores_BxKV, 2 * k)  # [B, 2K]
    beam_Bx2K, token_Bx2K = top_index // v, top_index % v
    seqs_Bx2KxT = jnp.take_along_axis(s["live_seqs"], beam_Bx2K[:, :, None], axis=1)
    seqs_Bx2KxT = seqs_Bx2KxT.at[:, :, pos].set(token_Bx2K)
    ends = token_Bx2K == eos_id
    # Finished: the old pool and the candidates among the best K that end here (as in
    # fairseq: so a beam of 1 is greedy search); keep the best K.
    finishing = ends & (jnp.arange(2 * k) < k)[None, :]
    fin_new = jnp.where(finishing, top_scores / length_penalty(pos + 1, alpha), NEG_INF)
    pool_scores = jnp.concatenate([s["fin_scores"], fin_new], axis=1)
    pool_seqs = jnp.concatenate([s["fin_seqs"], seqs_Bx2KxT], axis=1)
    pool_lengths = jnp.concatenate([s["fin_lengths"],
                                    jnp.full((b, 2 * k), pos + 1, jnp.int32)], axis=1)
    fin_scores, keep = jax.lax.top_k(pool_scores, k)
    # Live: the best K candidates that did not end.
    live_logp, pick = jax.lax.top_k(jnp.where(ends, NEG_INF, top_scores), k)
    rows_BxK = jnp.take_along_axis(beam_Bx2K, pick, axis=1) + jnp.arange(b)[:, None] * k
    tokens_N = jnp.take_along_axis(token_Bx2K, pick, axis=1).reshape(-1)
    logits, cache = step(tokens_N, reorder(s["cache"], rows_BxK.reshape(-1)))
    return {
        "cache": cache, "logits": logits, "step": pos + 1,
        "live_seqs": jnp.take_along_axis(seqs_Bx2KxT, pick[:, :, None], axis=1),
        "live_logp": live_logp,
        "fin_seqs": jnp.take_along_axis(pool_seqs, keep[:, :, None], axis=1),
        "fin_scores": fin_scores,
        "fin_lengths": jnp.take_along_axis(pool_lengths, keep, axis=1),
    }

  s = jax.lax.while_loop(lambda s: ~done(s), body, state)
  # A source with nothing finished returns its live hypotheses (cut at max_len).
  none = s["fin_scores"].max(-1) <= _NOTHING
  live_scores = s["live_logp"] / length_penalty(t, alpha)
  pick = lambda fin, live: jnp.where(none.reshape((b,) + (1,) * (fin.ndim - 1)), live, fin)
  return (pick(s["fin_seqs"], s["live_seqs"]), pick(s["fin_scores"], live_scores),
          pick(s["fin_lengths"], jnp.full((b, k), t, jnp.int32)))


def greedy_core(step, cache, logits_BxV, max_len, eos_id):
  """The most likely token at every step until eos: (tokens [B, max_len], lengths [B])."""
  b = logits_BxV.shape[0]

  def body(s):
    token_B = jnp.argmax(s["logits"], axis=-1).astype(jnp.int32)
    token_B = jnp.where(s["done"], 0, token_B)
    tokens = s["tokens"].at[:, s["step"]].set(token_B)
    lengths = s["lengths"] + (~s["done"]).astype(jnp.int32)
    done = s["done"] | (token_B == eos_id)
    logits, cache = step(token_B, s["cache"])
    return {"cache": cache, "logits": logits, "step": s["step"] + 1, "tokens": tokens,
            "lengths": lengths, "done": done}

  state = {"cache": cache, "logits": logits_BxV, "step": jnp.zeros((), jnp.int32),
           "tokens": jnp.zeros((b, max_len), jnp.int32), "lengths": jnp.zeros((b,), jnp.int32),
           "done": jnp.zeros((b,), jnp.bool_)}
  s = jax.lax.while_loop(lambda s: (s["step"] < max_len) & ~jnp.all(s["done"]), body, state)
  return s["tokens"], s["lengths"]


def _model_start(model, params, source_BxS, segments_BxS, rows, max_len, bos_id):
  """(step, cache, first logits) for an EncoderDecoder, with each source repeated `rows`
  times (its beams)."""
  v = {"params": params}
  memory_BxSxD = model.apply(v, source_BxS, segments_BxS, method="encode")
  memory_NxSxD = jnp.repeat(memory_BxSxD, rows, axis=0)
  segments_NxS = jnp.repeat(segments_BxS, rows, axis=0)
  n, s = segments_NxS.shape
  cache = init_cache(model.cfg, n, max_len, s)
  bos_Nx1 = jnp.full((n, 1), bos_id, jnp.int32)
  logits_Nx1xV, cache = model.apply(v, memory_NxSxD, segments_NxS, bos_Nx1, cache=cache,
                                    method="decode")

  def step(tokens_N, cache):
    logits_Nx1xV, cache = model.apply(v, None, segments_NxS, tokens_N[:, None], cache=cache,
                                      method="decode")
    return logits_Nx1xV[:, 0], cache

  return step, cache, logits_Nx1xV[:, 0]


def _reorder(cfg):
  axis = 1 if cfg.scan_layers else 0  # scanned caches stack layers first

  def reorder(cache, rows_N):
    layers = jax.tree.map(lambda x: jnp.take(x, rows_N, axis=axis), cache["layers"])
    return {**cache, "layers": layers}
  return reorder


@functools.partial(jax.jit, static_argnames=("model", "max_len", "bos_id", "eos_id"))
def _greedy(model, params, source_BxS, segments_BxS, max_len, bos_id, eos_id):
  step, cache, logits = _model_start(model, params, source_BxS, segments_BxS, 1, max_len,
                                     bos_id)
  return greedy_core(step, cache, logits, max_len, eos_id)


@functools.partial(jax.jit, static_argnames=("model", "max_len", "bos_id", "eos_id",
                                             "beam_size", "alpha"))
def _beam(model, params, source_BxS, segments_BxS, max_len, bos_id, eos_id, beam_size, alpha):
  step, cache, logits = _model_start(model, params, source_BxS, segments_BxS, beam_size,
                                     max_len, bos_id)
  return beam_search_core(step, cache, logits, _reorder(model.cfg), source_BxS.shape[0],
                          beam_size, max_len, eos_id, alpha)


def _cut(tokens, lengths, eos_id):
  out = []
  for row, n in zip(np.asarray(tokens), np.asarray(lengths)):
    ids = [int(x) for x in row[:n]]
    out.append(ids[:-1] if ids and ids[-1] == eos_id else ids)
  return out


def translate_ids(model, params, source_BxS, segments_BxS, max_len, bos_id, eos_id,
                  beam_size=1, alpha=0.0):
  """Output ids (eos removed) per source row: greedy when beam_size is 1 and alpha 0 (the
  same result, without the beam bookkeeping), else beam search's best hypothesis."""
  if beam_size == 1 and alpha == 0.0:
    tokens, lengths = _greedy(model, params, source_BxS, segments_BxS, max_len, bos_id,
                              eos_id)
    return _cut(tokens, lengths, eos_id)
  tokens, _, lengths = _beam(model, params, source_BxS, segments_BxS, max_len, bos_id,
                             eos_id, beam_size, float(alpha))
  return _cut(tokens[:, 0], lengths[:, 0], eos_id)
