"""A paged KV cache: every layer's keys and values live in pools of fixed-size pages, and a
page table per row says which pages hold its positions, in order. Memory then follows the
tokens in use, rows of any lengths share one pool, and a page that holds a shared prefix
(a system prompt) can sit in several rows' tables at once.

    pools = init_pools(cfg, num_pages, page_size)        # page 0: scratch, never allocated
    cache = {"table": [B, T] page ids, "lengths": [B] positions already cached,
             "counts": [B] tokens of this call to keep, "layers": pools}
    logits, cache = model.apply({"params": p}, tokens_BxL, cache=cache)

Row b's L tokens are its positions lengths[b]..; the first counts[b] of them are written to
its pages (the rest, padding, to the scratch page) and each attends to the row's earlier
positions through the table (lm/models/layers.py: paged_write, paged_gather: the pages are
gathered into a contiguous view, the portable way; a Pallas kernel could read them in
place). The returned cache has lengths + counts. The table's unused entries are 0.
"""

import functools
import hashlib
import collections

import jax
import jax.numpy as jnp
import numpy as np

from lm import decode


def init_pools(cfg, num_pages, page_size):
  """Zeroed key and value pools of `num_pages` pages of `page_size` positions per layer
  (stacked on a leading layer axis for a scanned model), in the cache dtype."""
  shape = (num_pages, cfg.num_kv_heads, page_size, cfg.head_dim)
  if cfg.scan_layers:
    return {k: jnp.zeros((cfg.num_layers,) + shape, cfg.cache_dtype) for k in ("k", "v")}
  return tuple({"k": jnp.zeros(shape, cfg.cache_dtype), "v": jnp.zeros(shape, cfg.cache_dtype)}
               for _ in range(cfg.num_layers))


def pages_for(tokens, page_size):
  """Pages that hold `tokens` positions."""
  return -(-int(tokens) // page_size)


class Pages:
  """The pool's page ids on the host: free pages, reference counts, and the prefix cache.

  A full page of a prompt is registered under a digest of its tokens and of every token
  before it (a chain: the same page content after another prefix is another page). A row
  that starts with the same tokens takes those pages instead of computing them again
  (`lookup`). A released page that is registered stays cached, least recently used first
  in line to be taken again (`take` evicts it only when no page is free)."""

  def __init__(self, num_pages, page_size):
    if num_pages < 2:
      raise ValueError("a paged cache needs at least 2 pages (page 0 is scratch)")
    self.num_pages, self.page_size = num_pages, page_size
    self.free = collections.deque(range(1, num_pages))
    self.refs = [0] * num_pages
    self.digest_of, self.page_of = {}, {}
    self.idle = collections.OrderedDict()  # registered pages nobody holds, oldest first
    self.lookups = self.hits = 0

  @property
  def available(self):
    return len(self.free) + len(self.idle)

  @property
  def in_use(self):
    return self.num_pages - 1 - self.available

  def take(self):
    if self.free:
      page = self.free.popleft()
    else:
      page, _ = self.idle.popitem(last=False)
      del self.page_of[self.digest_of.pop(page)]
    self.refs[page] = 1
    return page

  def release(self, page):
    self.refs[page] -= 1
    if self.refs[page] == 0:
      if page in self.digest_of:
        self.idle[page] = None
      else:
        self.free.append(page)

  def lookup(self, digest):
    """The page registered under `digest`, now held once more; None if there is none."""
    self.lookups += 1
    page = self.page_of.get(digest)
    if page is None:
      return None
    self.hits += 1
    if self.refs[page] == 0:
      del self.idle[page]
    self.refs[page] += 1
    return page

  def register(self, page, digest):
    if digest not in self.page_of and page not in self.digest_of:
      self.page_of[digest], self.digest_of[page] = page, digest


def page_digests(tokens, page_size):
  """The chained digest of each full page of `tokens`."""
  out, digest = [], b""
  for start in range(0, len(tokens) - page_size + 1, page_size):
    chunk = np.asarray(tokens[start:start + page_size], np.int64).tobytes()
    digest = hashlib.sha1(digest + chunk).digest()
    out.append(digest)
  return out


def _cache(pools, unembed, table, lengths, counts):
  cache = {"table": table, "lengths": lengths, "counts": counts, "layers": pools}
  if unembed is not None:
    cache["unembed"] = unembed
  return cache


TOP_LOGPROBS = 20  # the most alternatives a request may ask log-probabilities of


def _sample(logits_BxV, seen_BxV, seeds_B, counts_B, temperature_B, top_k_B, top_p_B,
            penalty_B, want_top_B):
  """decode's sampling of one token per row (the row's key folded with its token count),
  and the model's log-probabilities (before penalty, temperature and filters): of the
  token [B], and where a row wants them (want_top_B) of the TOP_LOGPROBS likeliest
  (ids and values [B, TOP_LOGPROBS]; zeros when no row does)."""
  logp_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
  logits_BxV = decode._penalise(logits_BxV, seen_BxV, penalty_B)  # pylint: disable=protected-access
  keys_B = jax.vmap(jax.random.fold_in)(jax.vmap(jax.random.key)(seeds_B), counts_B)
  token_B = decode.sample_logits(logits_BxV, keys_B, temperature_B, top_k_B, top_p_B)
  chosen_B = jnp.take_along_axis(logp_BxV, token_B[:, None], axis=1)[:, 0]
  b, k = token_B.shape[0], min(TOP_LOGPROBS, logp_BxV.shape[-1])
  top = jax.lax.cond(jnp.any(want_top_B), lambda x: tuple(jax.lax.top_k(x, k)[::-1]),
                     lambda x: (jnp.zeros((b, k), jnp.int32), jnp.zeros((b, k), jnp.float32)),
                     logp_BxV)
  return token_B, (chosen_B, top[0], top[1])


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("pools", "seen"))
def decode_step(model, params, pools, unembed, seen, table, lengths, last, live, seeds,
                counts, temperature, top_k, top_p, penalty, want_top):
  """One token for every live row: `last` [S] (the newest token, not cached yet) is
  written at position lengths[s] and the next token sampled. Rows not live change
  nothing (their write goes to the scratch page). Returns (pools, seen, tokens [S],
  log-probabilities: _sample's)."""
  cache = _cache(pools, unembed, table, lengths, live.astype(jnp.int32))
  logits_Sx1xV, cache = model.apply({"params": params}, last[:, None], cache=cache)
  token_S, logprobs = _sample(logits_Sx1xV[:, 0], seen, seeds, counts, temperature, top_k,
                              top_p, penalty, want_top)
  rows = jnp.arange(token_S.shape[0])
  seen = seen.at[rows, token_S].max(live)
  return cache["layers"], seen, token_S, logprobs


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("pools", "seen"))
def prefill_chunk(model, params, pools, unembed, seen, table, lengths, tokens, counts, slots,
                  seeds, generated, temperature, top_k, top_p, penalty, want_top):
  """For each row r: counts[r] tokens of tokens [R, C] (the rest padding) of slot
  slots[r]'s context, at positions lengths[r]... Returns (pools, seen, tokens [R]: each
  row's token sampled after its chunk's last one, as its generated[r]-th: what a sequence
  whose whole context is now cached starts with; and their log-probabilities, _sample's).
  Rows with counts 0 and a slot past the last change nothing."""
  cache = _cache(pools, unembed, table, lengths, counts)
  logits_RxCxV, cache = model.apply({"params": params}, tokens, cache=cache)
  last_R = jnp.maximum(counts - 1, 0)
  logits_RxV = jnp.take_along_axis(logits_RxCxV, last_R[:, None, None], axis=1)[:, 0]
  rows_RxV = seen.at[slots].get(mode="fill", fill_value=False)
  token_R, logprobs = _sample(logits_RxV, rows_RxV, seeds, generated, temperature, top_k,
                              top_p, penalty, want_top)
  rows_RxV = rows_RxV.at[jnp.arange(token_R.shape[0]), token_R].set(True)
  seen = seen.at[slots].set(rows_RxV, mode="drop")
  return cache["layers"], seen, token_R, logprobs


@functools.partial(jax.jit, donate_argnames=("seen",))
def reset_seen(seen, slot, tokens, count):
  """Row `slot` of the seen tokens (the repetition penalty's): exactly the first `count`
  of `tokens` [N] (a sequence's whole context, as decoding it alone starts with)."""
  valid_N = jnp.arange(tokens.shape[0]) < count
  return seen.at[slot].set(jnp.zeros(seen.shape[1], jnp.bool_).at[tokens].max(valid_N))


@functools.partial(jax.jit, static_argnames=("model",))
def unembedding(model, params, pools):
  """What the model keeps in its cache between calls besides the pools (the tied output
  projection E^T with the CPU kernels), or None."""
  cache = _cache(pools, None, jnp.zeros((1, 1), jnp.int32), jnp.zeros((1,), jnp.int32),
                 jnp.zeros((1,), jnp.int32))
  _, cache = model.apply({"params": params}, jnp.zeros((1, 1), jnp.int32), cache=cache)
  return cache.get("unembed")
