"""lm as a model of EleutherAI's lm-evaluation-harness (`lm-eval` 0.4), registered as "lm".

    python -m lm.harness --model lm --model_args workdir=runs/smollm2 --tasks lm_sst2 \
        --include_path lm/harness_tasks --metadata '{"data_dir": "../shared/data"}'

`python -m lm.harness` is lm-eval's own command line with this model registered (lm-eval
0.4.13 finds only the models its own package imports, so its `lm_eval` script cannot see
one from outside). `python -m lm.evaluate --harness=TASKS` and `config.eval.harness_tasks`
run the same through lm-eval's Python API.

The three request types, as lm-eval's `hf` model answers them, so scores compare:
  loglikelihood          context and continuation tokenized as `hf` does (TemplateLM), the
                         rows sorted by length and scored in batches of one jitted forward
                         pass that normalises only the continuations' positions. A row that
                         is a prefix of a longer one (one context's one-token choices,
                         repeated requests) is read from the longer row's pass; a long
                         context with several longer continuations runs once, its KV cache
                         copied to each continuation.
  loglikelihood_rolling  a document in disjoint windows of the model's context (lm-eval's
                         get_rolling_token_windows), each window after its predecessor's tail.
  generate_until         batched cached decoding (lm/decode.py), greedy unless the task
                         samples; decoding goes in chunks and a row ends at its first stop
                         string, which the reply does not include.
"""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as harness_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (handle_stop_sequences, normalize_gen_kwargs,
                                  postprocess_generated_text)

from lm import chat_template as templates
from lm import decode, sharding
from lm.errors import UserError
from lm.models.transformer import init_cache

DEFAULT_BATCH = 16
DECODE_CHUNK = 16  # tokens decoded between two looks for stop strings
TOKENS_PER_BATCH = 16_384  # rows x width of one scoring pass
# A context whose continuations (two or more, not all of one token) are this much shorter
# than it, and which is at least SHARED_CONTEXT_MIN tokens, runs once with a KV cache that
# its continuations then share (HarnessModel(share_contexts=False) turns this off).
SHARED_CONTEXT_MIN, SHARED_CONTEXT_RATIO = 64, 2


def _picked(logits_BxLxV, rows_Q, positions_Q, tokens_Q):
  """log p(token) and whether the token is the argmax, at each query (row, position,
  token) of `logits`: only the queried positions' logits are normalised."""
  picked_QxV = logits_BxLxV[rows_Q, positions_Q].astype(jnp.float32)
  target_Q = jnp.take_along_axis(picked_QxV, tokens_Q[:, None], axis=-1)[:, 0]
  return (target_Q - jax.nn.logsumexp(picked_QxV, axis=-1),
          jnp.argmax(picked_QxV, axis=-1) == tokens_Q)


def _token_scores(model, params, inputs_BxL, rows_Q, positions_Q, tokens_Q):
  """_picked of the rows' logits: position p predicts the token after the row's p-th."""
  return _picked(model.apply({"params": params}, inputs_BxL), rows_Q, positions_Q, tokens_Q)


@functools.lru_cache(maxsize=8)
def _scorer(model, mesh):
  """_token_scores jitted for `mesh`: rows split over its data axes, the (small) results
  replicated, so that every host reads them whole."""
  return jax.jit(functools.partial(_token_scores, model),
                 out_shardings=sharding.replicated(mesh))


def _global(array, mesh_sharding):
  """A host array that every process holds whole, as one global array on the mesh."""
  return jax.make_array_from_callback(array.shape, mesh_sharding, lambda index: array[index])


@functools.partial(jax.jit, static_argnames=("model",))
def _shared_context_scores(model, params, context_1xP, start_1, continuations_NxC, rows_Q,
                           positions_Q, tokens_Q):
  """One context's KV cache, computed once and copied to every continuation row, which then
  runs over it: log p and argmax-ness of each query (row, position j, token), position j of
  a row predicting its continuation's token j (j = 0 from the context's last position)."""
  n, c = continuations_NxC.shape
  cache = init_cache(model.cfg, 1, context_1xP.shape[1] + c, start_B=start_1)
  last_1x1xV, cache = model.apply({"params": params}, context_1xP, cache=cache,
                                  last_only=True)
  axis = 1 if model.cfg.scan_layers else 0
  cache = {**cache, "start": jnp.repeat(cache["start"], n),
           "layers": jax.tree.map(lambda x: jnp.repeat(x, n, axis=axis), cache["layers"])}
  logits_NxCxV, _ = model.apply({"params": params}, continuations_NxC, cache=cache)
  logits_NxCxV = jnp.concatenate(
      [jnp.broadcast_to(last_1x1xV, (n, 1, last_1x1xV.shape[-1])), logits_NxCxV[:, :-1]], 1)
  return _picked(logits_NxCxV, rows_Q, positions_Q, tokens_Q)


def _queries(asked, mesh):
  """(row, position, token) triples as three int32 arrays padded to a power of two (few
  compiles), replicated on the mesh."""
  picks = np.zeros((3, decode.bucket(len(asked), 64)), np.int32)
  picks[:, :len(asked)] = np.asarray(asked, np.int32).reshape(-1, 3).T
  return [_global(x, sharding.replicated(mesh)) for x in picks]


_HASH_MOD, _HASH_BASE = (1 << 61) - 1, 1_000_003


def _rolling_hash(tokens):
  """The hash of every prefix of `tokens`: [h(tokens[:1]), h(tokens[:2]), ...]."""
  out, h = [], 0
  for t in tokens:
    h = (h * _HASH_BASE + int(t) + 1) % _HASH_MOD
    out.append(h)
  return out


def _plan(sequences):
  """The rows to run, longest first, and for every sequence (its row, its length there): a
  sequence that is a prefix of a longer one already planned (a context's one-token choices,
  repeated requests) is read from that row, where the causal model gives the shared
  positions the same logits. Prefixes are found by a rolling hash, checked token by token."""
  order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
  rows, prefixes, where = [], {}, [None] * len(sequences)
  for i in order:
    seq = list(sequences[i])
    hashes = _rolling_hash(seq)
    hit = prefixes.get((len(seq), hashes[-1]))
    if hit is not None and rows[hit][:len(seq)] == seq:
      where[i] = (hit, len(seq))
      continue
    rows.append(seq)
    for length, h in enumerate(hashes, start=1):
      prefixes.setdefault((length, h), len(rows) - 1)
    where[i] = (len(rows) - 1, len(seq))
  return rows, where


class HarnessModel(TemplateLM):
  """An lm model behind lm-eval's LM interface: a workdir (`workdir=`, optional `step=`),
  or an lm.inference.Loaded (`loaded=`: the training loop's own parameters)."""

  def __init__(self, workdir=None, step=None, loaded=None, batch_size=DEFAULT_BATCH,
               max_length=None, max_gen_toks=256, share_contexts=True, **unused):
    super().__init__()
    if loaded is None:
      if not workdir:
        raise UserError("the lm harness model needs workdir=DIR (a run's workdir)")
      from lm import inference  # pylint: disable=import-outside-toplevel
      loaded = inference.load(str(workdir), None if step in (None, "") else int(step),
                              devices=jax.devices())
    self.loaded = loaded
    self.model, self.params, self.tok = loaded.model, loaded.params, loaded.tokenizer
    self.batch = DEFAULT_BATCH if batch_size in (None, "", "auto") else int(
        str(batch_size).split(":")[0])
    self._max_length = min(int(max_length or self.model.cfg.max_len), self.model.cfg.max_len)
    self.max_gen_toks = int(max_gen_toks)
    self.share_contexts = str(share_contexts).lower() not in ("false", "0", "no")
    self.workdir = str(workdir or loaded.workdir or "lm")
    self.batch = self._whole_rows(self.batch)

  # What lm-eval asks of every model ---------------------------------------------------

  @property
  def eot_token_id(self):
    return self.tok.eos_id

  @property
  def prefix_token_id(self):
    """What an empty context and each rolling window start from: bos, as `hf` takes it."""
    return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

  @property
  def max_length(self):
    return self._max_length

  @property
  def tokenizer_name(self):
    return f"lm:{self.workdir}"

  def tok_encode(self, string, add_special_tokens=None, **kwargs):
    """The text's ids. With add_special_tokens, or by default for a tokenizer lm trained
    (whose every training text starts with bos), bos first as the model saw texts;
    otherwise as `hf` encodes them by default, without special tokens."""
    if add_special_tokens or (add_special_tokens is None and self.tok.texts_start_with_bos):
      return self.tok.prompt_ids(string)
    return self.tok.encode(string).tolist()

  def tok_decode(self, ids):
    return self.tok.decode(ids)

  def chat_template(self, chat_template=False):
    return self.tok.chat_template if chat_template else None

  def apply_chat_template(self, chat_history, add_generation_prompt=True):
    """The conversation as the checkpoint's chat template renders it; without a generation
    prompt the last message is left open (transformers' continue_final_message)."""
    text = templates.render(self.tok.chat_template, chat_history, add_generation_prompt,
                            self.tok.special_tokens(), source=f"the chat template of "
                            f"{self.workdir}")
    if not add_generation_prompt and chat_history:
      last = chat_history[-1]["content"].strip()
      at = text.rfind(last)
      if last and at >= 0:
        text = text[:at + len(last)]
    return text

  # Scoring ---------------------------------------------------------------------------

  def _loglikelihood_tokens(self, requests, disable_tqdm=False, **unused):
    """(sum of log p(continuation | context), all continuation tokens greedy) per
    (_, context ids, continuation ids), as `hf` computes them: the last max_length + 1
    tokens of context + continuation, the continuation's positions scored."""
    inputs, targets = [], []
    for _, context, continuation in requests:
      if not continuation:
        raise UserError("lm harness: a loglikelihood request with an empty continuation")
      seq = (list(context) + list(continuation))[-(self.max_length + 1):]
      inputs.append(seq[:-1])
      targets.append(seq[-min(len(continuation), len(seq) - 1):])
    logp, greedy = [None] * len(requests), [None] * len(requests)
    rest = list(range(len(requests)))
    if self.share_contexts:
      groups = {}
      for i in rest:
        context = tuple(inputs[i][:len(inputs[i]) + 1 - len(targets[i])])
        groups.setdefault(context, []).append(i)
      shared = set()
      for context, members in groups.items():
        longest = max(len(targets[i]) for i in members)
        if (len(members) > 1 and longest > 1 and len(context) >= SHARED_CONTEXT_MIN
            and len(context) >= SHARED_CONTEXT_RATIO * longest):
          for i, (x, g) in zip(members, self._run_shared(list(context),
                                                         [targets[i] for i in members])):
            logp[i], greedy[i] = x, g
          shared.update(members)
      rest = [i for i in rest if i not in shared]
    rows, where = _plan([inputs[i] for i in rest])
    scored = self._run(rows, [(row, range(length - len(targets[i]), length), targets[i])
                              for i, (row, length) in zip(rest, where)])
    for i, x, g in zip(rest, *scored):
      logp[i], greedy[i] = x, g
    return [(float(x.sum()), bool(g.all())) for x, g in zip(logp, greedy)]

  def _run_shared(self, context, continuations):
    """(log-probabilities, greediness) of each continuation's tokens after `context`, the
    context computed once (_shared_context_scores)."""
    width = decode.bucket(len(context), 16)
    span = decode.bucket(max(len(c) for c in continuations), 8)
    rows = decode.bucket(len(continuations), 1)
    prompt = np.zeros((1, width), np.int32)
    prompt[0, width - len(context):] = context  # left-padded: the cache starts later
    conts = np.zeros((rows, span), np.int32)
    asked = []
    for r, tokens in enumerate(continuations):
      conts[r, :len(tokens)] = tokens
      asked += [(r, j, t) for j, t in enumerate(tokens)]
    mesh = self.loaded.mesh
    whole = lambda x: _global(np.asarray(x), sharding.replicated(mesh))
    with self.loaded.on_mesh():
      logp, greedy = _shared_context_scores(
          self.model, self.params, whole(prompt), whole([width - len(context)]), whole(conts),
          *_queries(asked, mesh))
    logp, greedy = np.asarray(logp), np.asarray(greedy)
    out, k = [], 0
    for tokens in continuations:
      out.append((logp[k:k + len(tokens)], greedy[k:k + len(tokens)]))
      k += len(tokens)
    return out

  def _run(self, rows, queries):
    """Log-probabilities and greediness of the tokens each query (row, positions, tokens)
    asks about. Rows (longest first) go in batches of one power-of-two width, at most
    TOKENS_PER_BATCH tokens (the logits are batch x width x vocabulary), whole rows for
    every data-parallel device; each batch is one jitted pass on the mesh."""
    mesh = self.loaded.mesh
    batch_sharding = sharding.batch_sharding(mesh)
    by_row = {}
    for q, (row, positions, tokens) in enumerate(queries):
      by_row.setdefault(row, []).append((q, positions, tokens))
    out_logp, out_greedy = [None] * len(queries), [None] * len(queries)
    start = 0
    while start < len(rows):
      width = min(decode.bucket(len(rows[start]), 16), self.max_length)
      size = self._whole_rows(max(1, min(self.batch, TOKENS_PER_BATCH // width)))
      chunk = range(start, min(start + size, len(rows)))
      inputs = np.zeros((size, width), np.int32)
      asked, spans = [], []  # (row in batch, position, token); (query, its slice of asked)
      for j, r in enumerate(chunk):
        inputs[j, :len(rows[r])] = rows[r]
        for q, positions, tokens in by_row.get(r, ()):
          spans.append((q, slice(len(asked), len(asked) + len(tokens))))
          asked += [(j, p, t) for p, t in zip(positions, tokens)]
      with self.loaded.on_mesh():
        logp, greedy = _scorer(self.model, mesh)(
            self.params, _global(inputs, batch_sharding), *_queries(asked, mesh))
      logp, greedy = np.asarray(logp), np.asarray(greedy)
      for q, span in spans:
        out_logp[q], out_greedy[q] = logp[span], greedy[span]
      start = chunk.stop
    return out_logp, out_greedy

  def _whole_rows(self, n):
    """n rounded up to whole rows for every data-parallel device of the mesh."""
    shape = self.loaded.mesh.shape
    data = shape.get("data", 1) * shape.get("fsdp", 1)
    return -(-n // data) * data

  def loglikelihood_rolling(self, requests, disable_tqdm=False):
    """Each document's log-probability: disjoint windows of max_length tokens of its text
    (no special tokens), the first after prefix_token_id (bos), each later one conditioned
    on as much of the text before it as fits (lm-eval's rolling windows, as `hf` makes
    them)."""
    windows, owners = [], []
    for i, (text,) in enumerate(r.args for r in requests):
      for context, continuation in map(harness_utils.make_disjoint_window,
                                       harness_utils.get_rolling_token_windows(
                                           token_list=self.tok.encode(text).tolist(),
                                           prefix_token=self.prefix_token_id,
                                           max_seq_len=self.max_length, context_len=1)):
        windows.append(((None, None), context, continuation))
        owners.append(i)
    totals = [0.0] * len(requests)
    for owner, (logp, _) in zip(owners, self._loglikelihood_tokens(windows)):
      totals[owner] += logp
    return totals

  # Generation ------------------------------------------------------------------------

  def generate_until(self, requests, disable_tqdm=False):
    """Replies to (context, gen_kwargs) requests, each cut before its first stop string
    (the task's `until`, and eos), of at most max_gen_toks tokens."""
    out = [None] * len(requests)
    groups = {}
    for i, (context, kwargs) in enumerate(r.args for r in requests):
      groups.setdefault(repr(sorted(kwargs.items())), []).append(i)
    eos_text = self.tok.id_to_token(self.tok.eos_id) if hasattr(self.tok, "id_to_token") \
        else None
    for members in groups.values():
      kwargs = normalize_gen_kwargs(dict(requests[members[0]].args[1]), self.max_gen_toks)
      until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
      max_new = int(kwargs.pop("max_gen_toks"))
      if max_new >= self.max_length:
        raise UserError(f"lm harness: max_gen_toks {max_new} leaves no room for a context "
                        f"in the model's {self.max_length} tokens")
      sampling = decode.Sampling(
          temperature=float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample")
          else 0.0, top_p=float(kwargs.get("top_p", 1.0) or 1.0),
          top_k=int(kwargs.get("top_k", 0) or 0), seed=int(kwargs.get("seed", 0) or 0))
      contexts = {i: self._prompt(requests[i].args[0], self.max_length - max_new)
                  for i in members}
      members = sorted(members, key=lambda i: -len(contexts[i]))
      for start in range(0, len(members), self.batch):
        chunk = members[start:start + self.batch]
        replies = self._generate([contexts[i] for i in chunk], max_new, sampling, until)
        for i, reply in zip(chunk, replies):
          out[i] = postprocess_generated_text(reply, until, None)
    return out

  def _prompt(self, context, room):
    ids = self.tok_encode(context) if context else [self.prefix_token_id]
    return ids[-room:]

  def _generate(self, prompts, max_new, sampling, until):
    """Decodes the batch in chunks of DECODE_CHUNK tokens; a row whose text holds a stop
    string is ended there, and decoding stops when every row has ended."""
    n = len(prompts)
    rows = [dataclasses.replace(sampling, seed=sampling.seed + i) for i in range(n)]
    stops = [s for s in until if s]
    with self.loaded.on_mesh():
      state = decode.prefill(self.model, self.params, prompts, decode.bucket(max_new),
                             rows, self.loaded.stop_ids, batch_size=self.batch,
                             limits=[max_new] * n)
      texts, final = [""] * n, [False] * n  # final: a row's text can no longer change
      while True:
        done = np.asarray(state.done_B).copy()
        for j, ids in enumerate(decode.outputs(state, n)):
          if not final[j]:
            texts[j] = self.tok.decode(ids)
            done[j] |= any(s in texts[j] for s in stops)
            final[j] = bool(done[j])
        if done.all() or int(state.count) >= max_new:
          return texts
        state = state._replace(done_B=jnp.asarray(done))
        state = decode.decode(self.model, self.params, state, DECODE_CHUNK)


# Running tasks ---------------------------------------------------------------------------

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "harness_tasks")
LOCAL_TASKS = tuple(sorted(name[:-5] for name in os.listdir(TASKS_DIR)
                           if name.endswith(".yaml")))


def task_manager(tasks, data_dir=None):
  """lm-eval's TaskManager over lm/harness_tasks (and lm-eval's own tasks only when a task
  outside it is asked for: indexing those thousands of files takes seconds)."""
  from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel
  local = all(t in LOCAL_TASKS for t in tasks)
  return TaskManager(include_path=TASKS_DIR, include_defaults=not local,
                     metadata={"data_dir": data_dir} if data_dir else {})


def run(model, tasks, limit=None, num_fewshot=None, data_dir=None, apply_chat_template=False,
        samples=False, gen_kwargs=None):
  """lm-eval's scores of `model` (a HarnessModel) on `tasks` (names), as
  {task: {metric: value, "<metric>_stderr": ..., "count": n}}; with `samples`, also the
  per-request results under "samples" ({task: [{arguments, resps, ...}]}). `gen_kwargs`
  (a dict, e.g. {"max_gen_toks": 64}) override the generation tasks' own."""
  from lm_eval import evaluator  # pylint: disable=import-outside-toplevel
  tasks = list(tasks)
  unknown = [t for t in tasks if not t]
  if unknown or not tasks:
    raise UserError("harness tasks: give one or more task names (lm's own: "
                    f"{', '.join(LOCAL_TASKS)})")
  try:
    results = evaluator.simple_evaluate(
        model=model, tasks=tasks, limit=limit, num_fewshot=num_fewshot,
        task_manager=task_manager(tasks, data_dir), log_samples=samples,
        apply_chat_template=apply_chat_template, bootstrap_iters=1000, gen_kwargs=gen_kwargs,
        metadata={"data_dir": data_dir} if data_dir else None)
  except (KeyError, ValueError) as e:
    raise UserError(f"harness tasks {', '.join(tasks)}: {e}") from e
  out = {}
  for task, metrics in results["results"].items():
    scores = {}
    for key, value in metrics.items():
      if key == "alias" or not isinstance(value, (int, float)):
        continue
      metric, _, _ = key.partition(",")  # lm-eval's "acc,none": metric, filter
      scores[metric] = float(value)
    scores["count"] = int(results.get("n-samples", {}).get(task, {}).get("effective", 0))
    out[task] = scores
  if samples:
    out["samples"] = results.get("samples", {})
  return out


def main():
  """lm-eval's command line, with this model registered as "lm"."""
  from lm_eval.__main__ import cli_evaluate  # pylint: disable=import-outside-toplevel
  cli_evaluate()


if __name__ == "__main__":
  # Run as lm.harness (registered once, under its own module name), not as __main__.
  from lm import harness as _self  # pylint: disable=import-self
  _self.main()
else:
  # lm-eval fills its registry with its own models' names only while the registry is
  # empty: list them first, so "hf" and the rest stay known beside "lm".
  import lm_eval.models  # noqa: F401,E402  pylint: disable=unused-import,wrong-import-position
  register_model("lm")(HarnessModel)
