"""`python -m lm.evaluate --workdir=DIR --task=squad|gsm|classify|translate|preference|reward
--data=FILE [--limit=N] [--max_tokens=N]`: a model scored on a task by what it generates,
printed as one JSON line (the scores, the count of examples, the wall time).

    squad       SQuAD v1.1 JSON (data/paragraphs/qas): exact match and F1 of the answer to
                each question about its context (the official normalisation)
    gsm         JSONL of {question, answer} (GSM-Symbolic; GSM8K's "#### N" answers too):
                accuracy of the reply's final number
    classify    JSONL of {text, label} or a TSV with sentence/label columns: accuracy of
                the first label word of the reply (--labels names them, by label id)
    translate   FILE.SRC[.gz] with FILE.TGT[.gz] beside it (--data=val.en.gz): corpus BLEU and
                chrF (sacrebleu) of the translations
    preference  JSONL of {prompt, chosen, rejected} (or ShareGPT pairs): the share of pairs
                whose chosen reply the model gives more log-probability than the rejected
                one; with --reference=DIR, more than the reference model does (DPO's
                implicit reward margin > 0), and KL(model || reference) per token on
                continuations sampled from the model (--max_tokens of them)
    reward      JSONL of {prompt} (lm.reward_pairs' heldout.jsonl): the mean reward
                (--scorer's probability of --label) of --samples replies per prompt sampled
                at temperature 1, the share above 0.5, and with --reference their KL per token

`python -m lm.evaluate --workdir=DIR --harness=lm_sst2,lm_squad [--harness_data=DIR]
[--limit=N] [--num_fewshot=K] [--max_tokens=N] [--chat]` runs lm-evaluation-harness tasks
instead (lm/harness.py: lm's own task files in lm/harness_tasks, or any of lm-eval's),
printing their scores as one JSON line.

Each example is asked as a one-turn chat, rendered with the model's own chat template
(--prompt: the user message, a format string of the example's fields), and answered by
greedy cached decoding in batches of prompts of similar length. A reply ends at the
model's stop tokens (and an lm-trained model's end-of-turn text).
"""

import argparse
import json
import os
import sys
import time

import numpy as np

from lm import answer_scores
from lm.errors import UserError

PROMPTS = {
    "squad": ("Answer the question with a short span copied from the context.\n\n"
              "Context: {context}\n\nQuestion: {question}"),
    "gsm": "{question}\nSolve it step by step, then give the final answer as a number.",
    "classify": "{text}\n\nWhich one describes it: {labels}? Answer with one word.",
    "translate": "Translate into {target_language}:\n\n{source}",
}
LANGUAGES = {"de": "German", "en": "English", "fr": "French", "cs": "Czech"}


def _open_text(path):
  from lm.data import corpus, source_files  # pylint: disable=import-outside-toplevel
  return corpus.decode_utf8(source_files.read_bytes(path, "--data"), path)


def _jsonl(path):
  out = []
  for number, line in enumerate(_open_text(path).split("\n"), 1):
    if line.strip():
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise UserError(f"{path} line {number}: not valid JSON ({e.msg})") from None
  return out


def read_squad(path):
  """[{id, context, question, answers}] of a SQuAD v1.1 file, in its order."""
  try:
    data = json.loads(_open_text(path))["data"]
  except (json.JSONDecodeError, KeyError, TypeError):
    raise UserError(f"{path}: not a SQuAD v1.1 file (a JSON object with data/paragraphs/"
                    "qas)") from None
  return [{"id": qa["id"], "context": p["context"], "question": qa["question"],
           "answers": [a["text"] for a in qa["answers"]]}
          for article in data for p in article["paragraphs"] for qa in p["qas"]]


def read_gsm(path):
  rows = _jsonl(path)
  for i, r in enumerate(rows, 1):
    if "question" not in r or "answer" not in r:
      raise UserError(f"{path} line {i}: a GSM record needs question and answer")
  return rows


def read_classify(path):
  if path.endswith(".tsv"):
    lines = _open_text(path).rstrip("\n").split("\n")
    header = lines[0].split("\t")
    if "label" not in header:
      raise UserError(f"{path}: the header has no label column")
    text = next(h for h in header if h != "label")
    rows = [dict(zip(header, line.split("\t"))) for line in lines[1:] if line]
    return [{"text": r[text], "label": r["label"]} for r in rows]
  return _jsonl(path)


def read_translate(path, source_language, target_language):
  stem = path[:-3] if path.endswith(".gz") else path
  if not stem.endswith("." + source_language):
    raise UserError(f"--data: {path} does not end in .{source_language} (--source_language)")
  target = stem[:-len(source_language)] + target_language
  target = target + ".gz" if not os.path.exists(target) else target
  sources, targets = (_open_text(p).rstrip("\n").split("\n") for p in (path, target))
  if len(sources) != len(targets):
    raise UserError(f"--data: {path} has {len(sources)} lines and {target} {len(targets)}")
  return [{"source": s, "target": t} for s, t in zip(sources, targets)]


def read_preference(path):
  """[{prompt (turns), chosen, rejected}] of a file of preference pairs
  (lm/data/conversations.py: pair_of)."""
  from lm.data import conversations  # pylint: disable=import-outside-toplevel
  data = _open_text(path).encode("utf-8")  # checked to be UTF-8
  return [{"prompt": turns, "chosen": chosen, "rejected": rejected}
          for _, (turns, chosen, rejected) in conversations.read_pairs(path, data)]


class Asker:
  """Greedy one-turn chat answers of a loaded model, batched by prompt length."""

  def __init__(self, loaded, max_tokens, batch_size):
    self.loaded, self.max_tokens, self.batch_size = loaded, max_tokens, batch_size

  def ask(self, questions):
    from lm import decode  # pylint: disable=import-outside-toplevel
    loaded = self.loaded
    prompts = [loaded.chat_ids([{"role": "user", "content": q}]) for q in questions]
    room = loaded.model.cfg.max_len - self.max_tokens
    if room < 1:
      raise UserError(f"--max_tokens: {self.max_tokens} leaves no room for a prompt in the "
                      f"model's context of {loaded.model.cfg.max_len}")
    prompts = [p[-room:] for p in prompts]  # the context's end: the question
    order = np.argsort([len(p) for p in prompts], kind="stable")
    replies = [None] * len(prompts)
    stop_text = getattr(loaded.tokenizer, "chat_stop_text", None)
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      with loaded.on_mesh():
        ids = decode.generate(loaded.model, loaded.params, [prompts[i] for i in chunk],
                              self.max_tokens, decode.Sampling(temperature=0.0),
                              loaded.stop_ids)
      for i, row in zip(chunk, ids):
        text = loaded.tokenizer.decode(row)
        replies[i] = text.split(stop_text)[0] if stop_text else text
    return replies


_LOG_SOFTMAX = {}  # model -> its jitted log-probabilities


def _token_log_probs(loaded, ids):
  """log p(token | the ones before) over `ids` [L] (padded to a power of two: few
  compiles), as float32 [L, V]; jitted once per model."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  model = loaded.model
  if model not in _LOG_SOFTMAX:
    _LOG_SOFTMAX[model] = jax.jit(lambda p, x: jax.nn.log_softmax(
        model.apply({"params": p}, x)[0].astype(jnp.float32)))
  length = max(8, 1 << (len(ids) - 1).bit_length())
  padded = np.zeros((1, length), np.int32)
  padded[0, :len(ids)] = ids
  with loaded.on_mesh():
    return np.asarray(_LOG_SOFTMAX[model](loaded.params, jnp.asarray(padded)))[:len(ids)]


def _sequence_log_probs(loaded, context, continuation):
  """Sum of log p(continuation | context) (both token id lists) in one forward pass."""
  full = (list(context) + list(continuation))[-loaded.model.cfg.max_len:]
  start = max(len(full) - len(continuation), 1)
  logp = _token_log_probs(loaded, full)
  return float(logp[np.arange(start - 1, len(full) - 1), np.asarray(full[start:])].sum())


def sampled_kl(policy, reference, prompt_turns, max_tokens=64, seed=0):
  """KL(policy || reference) per token, estimated on continuations sampled from the policy
  (temperature 1, no top-k or top-p) for each prompt: the mean over samples of
  (log policy(y|x) - log reference(y|x)) / |y|, and the mean sum per sample."""
  from lm import decode  # pylint: disable=import-outside-toplevel
  contexts = [policy.chat_ids(turns) for turns in prompt_turns]
  with policy.on_mesh():
    samples = decode.generate(policy.model, policy.params, contexts, max_tokens,
                              [decode.Sampling(temperature=1.0, seed=seed + i)
                               for i in range(len(contexts))], policy.stop_ids)
  return kl_of_samples(policy, reference, contexts, samples)


def kl_of_samples(policy, reference, contexts, samples):
  """{kl_per_token, kl_per_sample} of continuations `samples` (id lists, drawn from the
  policy at temperature 1) of `contexts`: the means of log policy(y|x) - log reference(y|x),
  divided by |y| and not."""
  per_token, per_sample = [], []
  for context, sample in zip(contexts, samples):
    if not sample:
      continue
    gap = (_sequence_log_probs(policy, context, sample) -
           _sequence_log_probs(reference, context, sample))
    per_sample.append(gap)
    per_token.append(gap / len(sample))
  return {"kl_per_token": float(np.mean(per_token)) if per_token else 0.0,
          "kl_per_sample": float(np.mean(per_sample)) if per_sample else 0.0}


def _reward(loaded, rows, scorer, reference, max_tokens, samples, batch_size):
  """The mean reward (the scorer's probability of its label) of replies sampled at
  temperature 1, `samples` per prompt, and with a reference their KL per token."""
  from lm import reward_pairs  # pylint: disable=import-outside-toplevel
  if scorer is None:
    raise UserError("--scorer: the reward task needs a classification workdir (and --label)")
  sampled = reward_pairs.sample_replies(loaded, [r["prompt"] for r in rows], samples,
                                        max_tokens, batch_size=batch_size)
  rewards = scorer([text for _, replies in sampled for _, text in replies])
  kl = {}
  if reference is not None:
    kl = kl_of_samples(loaded, reference,
                       [context for context, replies in sampled for _ in replies],
                       [ids for _, replies in sampled for ids, _ in replies])
  return {"mean_reward": float(np.mean(rewards)), "above_half": float(np.mean(rewards > 0.5)),
          **kl, "samples": len(rewards), "count": len(rows)}


def _log_probs(loaded, prompt_turns, replies):
  """Sum of log p(reply tokens | chat-rendered prompt) per (prompt, reply): the reply as
  the template writes an assistant turn, through its end-of-turn marker."""
  out = []
  for turns, reply in zip(prompt_turns, replies):
    context = loaded.chat_ids(turns)
    full = loaded.tokenizer.chat_ids(_rendered(loaded, turns + [
        {"role": "assistant", "content": reply}]).rstrip())
    if full[:len(context)] != context:
      raise UserError("the chat template does not render a reply after its prompt")
    out.append(_sequence_log_probs(loaded, context, full[len(context):]))
  return out


def _rendered(loaded, turns):
  from lm import chat_template  # pylint: disable=import-outside-toplevel
  return chat_template.render(loaded.tokenizer.chat_template, turns, False,
                              loaded.tokenizer.special_tokens())


def evaluate(loaded, task, rows, max_tokens=256, batch_size=16, prompt=None, labels=(),
             target_language="de", reference=None, scorer=None, samples=1):
  """{score: value, "count": n} of `loaded` on `rows` (a reader's records) for `task`.
  `scorer`: the reward task's lm.reward_pairs.Scorer."""
  if task == "preference":
    return _preference(loaded, rows, reference, max_tokens)
  if task == "reward":
    return _reward(loaded, rows, scorer, reference, max_tokens, samples, batch_size)
  asker = Asker(loaded, max_tokens, batch_size)
  template = prompt or PROMPTS[task]
  fields = {"labels": ", ".join(labels),
            "target_language": LANGUAGES.get(target_language, target_language)}
  try:
    questions = [template.format(**{**fields, **r}) for r in rows]
  except KeyError as e:
    raise UserError(f"--prompt: the examples have no field {e.args[0]!r}") from None
  replies = asker.ask(questions)
  if task == "squad":
    return {"exact_match": 100 * np.mean([answer_scores.squad_exact(p, r["answers"])
                                          for p, r in zip(replies, rows)]),
            "f1": 100 * np.mean([answer_scores.squad_f1(p, r["answers"])
                                 for p, r in zip(replies, rows)]), "count": len(rows)}
  if task == "gsm":
    return {"accuracy": float(np.mean([answer_scores.gsm_correct(p, r["answer"])
                                       for p, r in zip(replies, rows)])), "count": len(rows)}
  if task == "classify":
    if not labels:
      raise UserError("--labels: name the label words, by label id (e.g. negative,positive)")
    got = [answer_scores.label_of(p, labels) for p in replies]
    want = [labels[int(r["label"])] for r in rows]
    return {"accuracy": float(np.mean([g == w for g, w in zip(got, want)])),
            "unlabelled": sum(g is None for g in got), "count": len(rows)}
  if task == "translate":
    from lm.translate import scores as corpus_scores  # pylint: disable=import-outside-toplevel
    return {**corpus_scores([p.strip() for p in replies], [r["target"] for r in rows]),
            "count": len(rows)}
  raise UserError(f"--task: {task!r} is not one of {', '.join(TASKS)}")


def _preference(loaded, rows, reference, max_tokens=64):
  turns = [r["prompt"] for r in rows]
  margins = (np.asarray(_log_probs(loaded, turns, [r["chosen"] for r in rows])) -
             np.asarray(_log_probs(loaded, turns, [r["rejected"] for r in rows])))
  kl = {}
  if reference is not None:
    margins -= (np.asarray(_log_probs(reference, turns, [r["chosen"] for r in rows])) -
                np.asarray(_log_probs(reference, turns, [r["rejected"] for r in rows])))
    kl = sampled_kl(loaded, reference, turns, max_tokens)
  return {"accuracy": float(np.mean(margins > 0)), "mean_margin": float(np.mean(margins)),
          **kl, "count": len(rows)}


def read_reward_prompts(path):
  """[{prompt}] of JSON Lines records with a prompt field (lm.reward_pairs' heldout.jsonl)."""
  rows = _jsonl(path)
  for i, r in enumerate(rows, 1):
    if not isinstance(r, dict) or not isinstance(r.get("prompt"), str):
      raise UserError(f"{path} line {i}: a reward prompt record needs a prompt field")
  return rows


READERS = {"squad": read_squad, "gsm": read_gsm, "classify": read_classify,
           "preference": read_preference, "reward": read_reward_prompts}
TASKS = ("squad", "gsm", "classify", "translate", "preference", "reward")


def read_rows(task, path, source_language="en", target_language="de"):
  """The examples of `path` for `task`, by its reader."""
  if task == "translate":
    return read_translate(path, source_language, target_language)
  return READERS[task](path)


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m lm.evaluate",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--step", type=int, default=None)
  parser.add_argument("--task", choices=TASKS)
  parser.add_argument("--data")
  parser.add_argument("--harness", default="", help="lm-evaluation-harness tasks, comma-"
                      "separated, instead of --task (lm's own: lm/harness_tasks)")
  parser.add_argument("--harness_data", default=None, help="--harness: the folder of the "
                      "local tasks' files (default: ../shared/data beside the repository)")
  parser.add_argument("--num_fewshot", type=int, default=None, help="--harness: examples "
                      "before each question")
  parser.add_argument("--chat", action="store_true", help="--harness: render the requests "
                      "with the model's chat template")
  parser.add_argument("--limit", type=int, default=0, help="the first N examples (0: all)")
  parser.add_argument("--max_tokens", type=int, default=None, help="the longest reply "
                      "(default 256; with --harness, the tasks' own)")
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--prompt", default=None, help="the user message: a format string of "
                      "the example's fields (see PROMPTS)")
  parser.add_argument("--labels", default="", help="classify: label words by id, comma-"
                      "separated")
  parser.add_argument("--source_language", default="en")
  parser.add_argument("--target_language", default="de")
  parser.add_argument("--reference", default=None, help="preference, reward: the reference "
                      "model's workdir (DPO's init_from)")
  parser.add_argument("--scorer", default=None, help="reward: a classification workdir")
  parser.add_argument("--label", default=None, help="reward: the scorer's label whose "
                      "probability is the reward")
  parser.add_argument("--samples", type=int, default=1, help="reward: replies per prompt")
  args = parser.parse_args(argv)
  if args.harness:
    return _harness_main(args)
  if not (args.task and args.data):
    parser.error("--task and --data are required (or --harness)")
  args.max_tokens = 256 if args.max_tokens is None else args.max_tokens
  from lm.inference import load  # pylint: disable=import-outside-toplevel
  try:
    if args.limit < 0 or args.max_tokens < 1 or args.batch_size < 1 or args.samples < 1:
      raise UserError("--limit must be >= 0, --max_tokens, --batch_size and --samples >= 1")
    if args.task == "reward" and not (args.scorer and args.label):
      raise UserError("--scorer and --label: the reward task needs a classification "
                      "workdir and the label whose probability is the reward")
    rows = read_rows(args.task, args.data, args.source_language, args.target_language)
    rows = rows[:args.limit] if args.limit else rows
    if not rows:
      raise UserError(f"--data: {args.data} holds no examples")
    started = time.time()
    loaded = load(args.workdir, args.step)
    reference = load(args.reference) if args.reference else None
    scorer = None
    if args.task == "reward":
      from lm.reward_pairs import Scorer  # pylint: disable=import-outside-toplevel
      scorer = Scorer(args.scorer, args.label)
    result = evaluate(loaded, args.task, rows, args.max_tokens, args.batch_size, args.prompt,
                      tuple(x for x in args.labels.split(",") if x), args.target_language,
                      reference, scorer, args.samples)
  except UserError as e:
    print(f"lm: error: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps({"task": args.task, "data": os.path.abspath(args.data),
                    "workdir": os.path.abspath(args.workdir), "step": loaded.step,
                    **{k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()},
                    "wall_s": round(time.time() - started, 1)}))


def _harness_main(args):
  """--harness: lm-eval's scores of the workdir's model on the tasks, as one JSON line."""
  import jax  # pylint: disable=import-outside-toplevel
  from lm import harness  # pylint: disable=import-outside-toplevel
  from lm.inference import load  # pylint: disable=import-outside-toplevel
  try:
    if args.limit < 0 or (args.max_tokens is not None and args.max_tokens < 1):
      raise UserError("--limit must be >= 0 and --max_tokens >= 1")
    started = time.time()
    loaded = load(args.workdir, args.step, devices=jax.devices())
    model = harness.HarnessModel(loaded=loaded, batch_size=args.batch_size)
    result = harness.run(model, [t.strip() for t in args.harness.split(",")],
                         limit=args.limit or None, num_fewshot=args.num_fewshot,
                         data_dir=args.harness_data, apply_chat_template=args.chat,
                         gen_kwargs=({"max_gen_toks": args.max_tokens}
                                     if args.max_tokens else None))
  except UserError as e:
    print(f"lm: error: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps({"harness": {task: {k: round(v, 4) if isinstance(v, float) else v
                                       for k, v in scores.items()}
                                for task, scores in result.items()},
                    "workdir": os.path.abspath(args.workdir), "step": loaded.step,
                    "wall_s": round(time.time() - started, 1)}))


if __name__ == "__main__":
  main()
