"""Evaluation by generation (lm/evaluate.py, lm/answer_scores.py): the scorers against
hand-worked examples, and the command's batched answers and log-probabilities against a
direct, one-example-at-a-time computation on a tiny model."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, tiny_config, user_env

from lm import answer_scores as s
from lm import chat_template
from lm import evaluate, loop
from lm.errors import UserError
from lm.inference import load


@pytest.mark.parametrize("prediction,answers,exact,f1", [
    ("The Cat!", ["cat"], 1.0, 1.0),  # case, punctuation and articles go
    ("a cat sat", ["the cat"], 0.0, 2 * (1 / 2) * 1 / (1 / 2 + 1)),  # P 1/2, R 1
    ("Denver Broncos", ["Broncos", "Denver Broncos"], 1.0, 1.0),  # the best reference
    ("in   1999 .", ["1999"], 0.0, 2 * (1 / 2) * 1 / (1 / 2 + 1)),
    ("nothing", ["something else"], 0.0, 0.0),
    ("an apple, an orange", ["apple orange"], 1.0, 1.0),
])
def test_squad_scores_follow_the_official_normalisation(prediction, answers, exact, f1):
  assert s.squad_exact(prediction, answers) == exact
  assert s.squad_f1(prediction, answers) == pytest.approx(f1)


@pytest.mark.parametrize("reply,answer,correct", [
    ("So she needs 1,050 minutes.", "1050", 1.0),
    ("The total is -12.", "-12", 1.0),
    ("First 3 + 4 = 7, then 7 * 2 = 14\n#### 14", "14", 1.0),
    ("It comes to $2,345.50 in all", "2345.5", 1.0),
    ("42, or maybe 41", "42", 0.0),  # the last number counts
    ("no idea", "3", 0.0),
    ("Answer: 831", "#### 831", 1.0),
])
def test_gsm_reads_the_final_number_with_commas_and_signs(reply, answer, correct):
  assert s.gsm_correct(reply, answer) == correct


def test_a_label_word_is_the_first_one_named():
  labels = ("negative", "positive")
  assert s.label_of("Positive, clearly - not negative.", labels) == "positive"
  assert s.label_of("It is NEGATIVE.", labels) == "negative"
  assert s.label_of("unpositive", labels) is None


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("eval") / "run")
  loop.run(tiny_config(**{"train.num_steps": 3, "sample.num_tokens": 0, "data.seq_len": 64,
                          "model.max_len": 128}), workdir, devices=jax.devices()[:1])
  return load(workdir)


def _greedy_alone(loaded, ids, max_tokens):
  """A full forward pass per token, one prompt at a time (right-padded to the context: a
  causal model's logits do not depend on what follows, and one program serves every call)."""
  forward = jax.jit(lambda p, x: loaded.model.apply({"params": p}, x))
  out = list(ids)
  for _ in range(max_tokens):
    padded = np.zeros((1, loaded.model.cfg.max_len), np.int32)
    padded[0, :len(out)] = out
    logits = forward(loaded.params, jnp.asarray(padded))
    token = int(np.argmax(np.asarray(logits)[0, len(out) - 1]))
    if token in loaded.stop_ids:
      break
    out.append(token)
  return loaded.tokenizer.decode(out[len(ids):])


def test_batched_answers_equal_greedy_decoding_one_at_a_time(tiny_run):
  questions = ["What is it?", "A much longer question about the context of things?", "Hm"]
  replies = evaluate.Asker(tiny_run, max_tokens=6, batch_size=2).ask(questions)
  for question, reply in zip(questions, replies):
    ids = tiny_run.chat_ids([{"role": "user", "content": question}])
    assert reply == _greedy_alone(tiny_run, ids, 6).split("<|im_end|>")[0]


def test_preference_margins_are_log_probability_sums(tiny_run):
  rows = [{"prompt": [{"role": "user", "content": "Say yes"}], "chosen": "yes",
           "rejected": "no thanks"}]
  lp = evaluate._log_probs(tiny_run, [rows[0]["prompt"]] * 2, ["yes", "no thanks"])  # pylint: disable=protected-access
  for reply, ours in zip(("yes", "no thanks"), lp):
    context = tiny_run.chat_ids(rows[0]["prompt"])
    text = chat_template.render(tiny_run.tokenizer.chat_template, rows[0]["prompt"] + [
        {"role": "assistant", "content": reply}]).rstrip()  # the reply and its end marker
    full = tiny_run.tokenizer.chat_ids(text)
    logits = np.asarray(tiny_run.model.apply({"params": tiny_run.params},
                                             jnp.asarray([full])), np.float64)[0]
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    expected = sum(logp[i - 1, full[i]] for i in range(len(context), len(full)))
    assert ours == pytest.approx(expected, abs=1e-3)
  result = evaluate.evaluate(tiny_run, "preference", rows)
  assert result["accuracy"] == float(lp[0] > lp[1])
  assert result["mean_margin"] == pytest.approx(lp[0] - lp[1])


def test_the_command_prints_one_json_line(tiny_run, tmp_path):
  squad = {"data": [{"paragraphs": [{"context": "lm is a codebase.", "qas": [
      {"id": "1", "question": "What is lm?", "answers": [{"text": "a codebase"}]},
      {"id": "2", "question": "Is it small?", "answers": [{"text": "yes"}]}]}]}]}
  path = tmp_path / "squad.json"
  path.write_text(json.dumps(squad), encoding="utf-8")
  out = subprocess.run([sys.executable, "-m", "lm.evaluate", f"--workdir={tiny_run.workdir}",
                        "--task=squad", f"--data={path}", "--max_tokens=4", "--limit=2"],
                       cwd=REPO, env=user_env(), capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  line = json.loads(out.stdout.strip().splitlines()[-1])
  assert line["count"] == 2 and 0 <= line["f1"] <= 100 and "exact_match" in line


def test_bad_evaluation_input_is_one_line(tiny_run, tmp_path):
  bad = tmp_path / "gsm.jsonl"
  bad.write_text('{"question": "1+1?", "answer": "2"}\n{oops\n', encoding="utf-8")
  with pytest.raises(UserError, match="gsm.jsonl line 2: not valid JSON"):
    evaluate.read_gsm(str(bad))
  same = tmp_path / "pairs.jsonl"
  same.write_text('{"prompt": "p", "chosen": "a", "rejected": "a"}\n', encoding="utf-8")
  with pytest.raises(UserError, match="chosen equals rejected"):
    evaluate.read_preference(str(same))
  with pytest.raises(UserError, match="--labels"):
    evaluate.evaluate(tiny_run, "classify", [{"text": "x", "label": 0}], max_tokens=2)


def test_sampled_kl_is_zero_against_itself_and_matches_a_direct_sum(tiny_run):
  turns = [[{"role": "user", "content": "Tell me"}], [{"role": "user", "content": "More"}]]
  assert evaluate.sampled_kl(tiny_run, tiny_run, turns, max_tokens=5) == {
      "kl_per_token": 0.0, "kl_per_sample": 0.0}
  context, continuation = tiny_run.chat_ids(turns[0]), [5, 9, 11]
  logits = np.asarray(tiny_run.model.apply({"params": tiny_run.params},
                                           jnp.asarray([context + continuation])), np.float64)[0]
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  expected = sum(logp[len(context) - 1 + i, t] for i, t in enumerate(continuation))
  assert evaluate._sequence_log_probs(tiny_run, context, continuation) == pytest.approx(  # pylint: disable=protected-access
      expected, abs=1e-3)


def test_generation_scores_in_the_loop_equal_the_command_s(tmp_path, one_device):
  """task.eval_generate scores at each evaluation; at the last step they equal what
  lm.evaluate gives on the saved checkpoint (another path: save, load, decode)."""
  gsm = tmp_path / "gsm.jsonl"
  gsm.write_text("".join(json.dumps({"question": f"{i} + 1?", "answer": str(i + 1)}) + "\n"
                         for i in range(5)), encoding="utf-8")
  chats = tmp_path / "chat.jsonl"
  chats.write_text("".join(json.dumps({"prompt": f"{i} + 1?", "completion": f"#### {i + 1}"})
                           + "\n" for i in range(30)), encoding="utf-8")
  config = tiny_config(**{"task.objective": "sft", "data.format": "chat",
                          "data.path": str(chats), "data.seq_len": 128, "model.max_len": 128,
                          "train.num_steps": 4, "train.eval_every": 2, "sample.num_tokens": 0,
                          "task.eval_generate": "gsm", "task.eval_data": str(gsm),
                          "task.eval_limit": 4, "task.eval_max_tokens": 6,
                          "train.checkpoint_every": 4})
  workdir = str(tmp_path / "run")
  result = loop.run(config, workdir, devices=one_device)
  with open(f"{workdir}/metrics.jsonl", encoding="utf-8") as f:
    logged = [json.loads(line) for line in f]
  # step 2 in the loop; step 4's whole-split final evaluation scores them too
  assert [r["step"] for r in logged if "eval/generate_accuracy" in r] == [2, 4]
  command = evaluate.evaluate(load(workdir), "gsm", evaluate.read_gsm(str(gsm))[:4],
                              max_tokens=6, batch_size=config.train.batch_size)
  assert result.eval["validation"]["generate_accuracy"] == command["accuracy"]


def test_generation_evaluation_needs_a_decoder_and_a_file(tmp_path, one_device):
  from lm.errors import ConfigError  # pylint: disable=import-outside-toplevel
  with pytest.raises(ConfigError, match="task.eval_data"):
    loop.run(tiny_config(**{"task.eval_generate": "squad"}), str(tmp_path / "a"),
             devices=one_device)
  with pytest.raises(ConfigError, match="task.eval_generate"):
    loop.run(tiny_config(**{"task.eval_generate": "squad", "task.eval_data": "x.json",
                            "task.objective": "mlm"}), str(tmp_path / "b"), devices=one_device)


# Reward-ranked pairs (lm/reward_pairs.py) and the reward task.


def test_best_and_worst_skip_ties_and_identical_texts():
  from lm import reward_pairs  # pylint: disable=import-outside-toplevel
  assert reward_pairs.best_and_worst(["a", "b", "c"], np.array([0.2, 0.9, 0.1])) == (
      "b", "c", 0.9, 0.1)
  assert reward_pairs.best_and_worst(["a", "b"], np.array([0.5, 0.5])) is None
  assert reward_pairs.best_and_worst(["a", "a"], np.array([0.1, 0.7])) is None


def test_prompts_are_the_openings_split_once(tmp_path):
  from lm import reward_pairs  # pylint: disable=import-outside-toplevel
  path = tmp_path / "reviews.jsonl"
  texts = [f"review {i} opens with these words and then goes on" for i in range(10)]
  path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
  prompts = reward_pairs.read_prompts(str(path), 3, "Go on: {opening}", 0.2)
  assert len(prompts["validation"]) == 2 and len(prompts["train"]) == 8
  expected = sorted(f"Go on: review {i} opens" for i in range(10))
  assert sorted(prompts["train"] + prompts["validation"]) == expected
  with pytest.raises(UserError, match="has no {opening}"):
    reward_pairs.read_prompts(str(path), 3, "no field", 0.2)


@pytest.fixture(scope="module")
def tiny_scorer(tmp_path_factory):
  """A tiny classifier of good/bad sentences (char tokenizer), trained for a few steps."""
  from lm import reward_pairs  # pylint: disable=import-outside-toplevel
  folder = tmp_path_factory.mktemp("scorer")
  path = folder / "sentences.jsonl"
  rows = [{"label": ("neg", "pos")[i % 2], "text": ("a bad dull film", "a good fine film")[i % 2]
           + f" {i}"} for i in range(40)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
  workdir = str(folder / "run")
  loop.run(tiny_config(**{"task.objective": "classification", "data.format": "labelled",
                          "data.path": str(path), "data.test_fraction": 0.0,
                          "data.seq_len": 32, "train.num_steps": 3, "sample.num_tokens": 0}),
           workdir, devices=jax.devices()[:1])
  return reward_pairs.Scorer(workdir, "pos")


def test_sampled_replies_equal_each_row_decoded_alone(tiny_run):
  from lm import decode, reward_pairs  # pylint: disable=import-outside-toplevel
  questions = ["Go on: it was", "Go on: a much longer opening than the other"]
  sampled = reward_pairs.sample_replies(tiny_run, questions, 2, 6, seed=3, batch_size=3)
  for q, (context, replies) in enumerate(sampled):
    assert context == tiny_run.chat_ids([{"role": "user", "content": questions[q]}])
    for r, (ids, text) in enumerate(replies):
      alone = decode.generate(tiny_run.model, tiny_run.params, [context], 6,
                              decode.Sampling(temperature=1.0, seed=3 + q * 2 + r),
                              tiny_run.stop_ids)[0]
      assert ids == list(alone)
      assert text == tiny_run.tokenizer.decode(
          [t for t in alone if t not in tiny_run.stop_ids]).split("<|im_end|>")[0].strip()


def test_pairs_rank_by_the_scorer_and_the_reward_task_scores_them(tiny_run, tiny_scorer,
                                                                  tmp_path, capsys):
  from lm import reward_pairs  # pylint: disable=import-outside-toplevel
  questions = [f"Go on: film {i}" for i in range(4)]
  pairs, rewards = reward_pairs.make_pairs(tiny_run, tiny_scorer, questions, 3, 8, seed=1)
  assert rewards.shape == (4, 3) and ((rewards >= 0) & (rewards <= 1)).all()
  for pair in pairs:  # each pair: the best and the worst of its prompt's samples
    row = rewards[questions.index(pair["prompt"])]
    good, bad = tiny_scorer([pair["chosen"], pair["rejected"]])
    assert good == pytest.approx(row.max(), abs=1e-5) and bad == pytest.approx(row.min(),
                                                                                abs=1e-5)
    assert pair["chosen"] != pair["rejected"]
  reviews = tmp_path / "reviews.jsonl"
  reviews.write_text("".join(json.dumps({"text": f"film {i} was quite"}) + "\n"
                             for i in range(10)), encoding="utf-8")
  out = tmp_path / "pairs"
  capsys.readouterr()
  reward_pairs.main([f"--workdir={tiny_run.workdir}", f"--scorer={tiny_scorer.loaded.workdir}",
                     "--label=pos", f"--data={reviews}", f"--out={out}", "--max_tokens=6",
                     "--samples=3"])
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  written = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
  heldout = [json.loads(line) for line in (out / "heldout.jsonl").read_text().splitlines()]
  assert summary["pairs"] == len(written) and summary["prompts"] == 8 and len(heldout) == 2
  assert all(p["chosen_reward"] >= p["rejected_reward"] for p in written)
  rows = evaluate.read_reward_prompts(str(out / "heldout.jsonl"))
  result = evaluate.evaluate(tiny_run, "reward", rows, max_tokens=6, reference=tiny_run,
                             scorer=tiny_scorer, samples=2)
  sampled = reward_pairs.sample_replies(tiny_run, [r["prompt"] for r in rows], 2, 6,
                                        batch_size=16)
  expected = tiny_scorer([text for _, replies in sampled for _, text in replies])
  assert result["mean_reward"] == pytest.approx(float(np.mean(expected)), abs=1e-6)
  assert result["kl_per_token"] == 0.0 and result["samples"] == 4  # against itself
  with pytest.raises(UserError, match="--label: .* not 'happy'"):
    reward_pairs.Scorer(tiny_scorer.loaded.workdir, "happy")
