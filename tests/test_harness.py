"""lm's lm-evaluation-harness model against independent computations: a direct forward
pass in numpy terms, and lm-eval's own `hf` model on the same (tiny, random) transformers
checkpoint that lm imported. Then the local task files, run end to end on small copies of
their data."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import STDLIB_TEXT

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from lm import decode, harness  # noqa: E402
from lm.errors import UserError  # noqa: E402
from lm.inference import load  # noqa: E402
from lm.interop import hf  # noqa: E402

VOCAB = 320


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A random Llama with a byte-level BPE tokenizer, saved for transformers and imported
  into an lm workdir: (lm's harness model, lm-eval's hf model of the same weights)."""
  from tokenizers import ByteLevelBPETokenizer  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("harness")
  with open(STDLIB_TEXT, encoding="utf-8") as f:
    text = f.read()[:60_000]
  bpe = ByteLevelBPETokenizer()
  bpe.train_from_iterator([text], vocab_size=VOCAB, show_progress=False,
                          special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
  folder = str(root / "hf")
  os.makedirs(folder)
  bpe.save(os.path.join(folder, "tokenizer.json"))
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_file=os.path.join(folder, "tokenizer.json"), bos_token="<s>",
      eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
  tokenizer.save_pretrained(folder)
  config = transformers.LlamaConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=1,
      eos_token_id=2, pad_token_id=0, initializer_range=0.3, tie_word_embeddings=False)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config).eval()
  model.save_pretrained(folder)
  hf.import_checkpoint(folder, str(root / "lm"))
  # One device (the tests' other seven fake ones only slow compiling down); the command
  # line and lm.evaluate tests below load on all eight.
  loaded = load(str(root / "lm"), devices=jax.devices()[:1])
  ours = harness.HarnessModel(loaded=loaded, batch_size=4, max_length=32)
  theirs = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, max_length=32,
                device="cpu")
  return ours, theirs


def _requests(kind, args):
  return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


PAIRS = [("def parse(self, args", "):"), ("import os", "\nimport sys"),
         ("class Namespace", "(object):"), ("", "return None"),
         ("    if ", "not args:\n        raise"), ("x = ", "1"), ("x = ", "12"),
         ("for name in ", "names: print(name)")]


def _direct(loaded, context_ids, continuation_ids):
  """log p(continuation | context) and greedy-ness from one forward pass, in numpy."""
  full = context_ids + continuation_ids
  width = 32  # one shape for every pair (one compile); causal: the padding changes nothing
  row = np.zeros((1, width), np.int32)
  row[0, :len(full) - 1] = full[:-1]
  logits = np.asarray(loaded.model.apply({"params": loaded.params}, jnp.asarray(row)))[
      0, :len(full) - 1].astype(np.float64)
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  start = len(context_ids) - 1
  targets = np.asarray(full[1:])
  picked = logp[np.arange(len(targets)), targets][start:]
  greedy = (logits.argmax(-1) == targets)[start:]
  return float(picked.sum()), bool(greedy.all())


def test_loglikelihood_is_the_sum_of_token_log_probs_and_greedy_is_argmax(tiny):
  ours, _ = tiny
  got = ours.loglikelihood(_requests("loglikelihood", PAIRS))
  for (context, continuation), (logp, greedy) in zip(PAIRS, got):
    if context:
      ctx, cont = ours._encode_pair(context, continuation)  # pylint: disable=protected-access
    else:
      ctx, cont = [ours.prefix_token_id], ours.tok_encode(continuation)
    want, want_greedy = _direct(ours.loaded, ctx, cont)
    assert abs(logp - want) < 1e-4, (context, continuation)
    assert greedy == want_greedy
    assert logp < 0


def test_a_greedy_continuation_is_greedy_and_another_is_not(tiny):
  ours, _ = tiny
  ids = ours.tok_encode("def parse(self, args")
  greedy = decode.generate(ours.model, ours.params, [ids], 3, decode.Sampling(temperature=0.0))
  other = greedy[0][:2] + [(greedy[0][2] + 1) % VOCAB]
  [(_, yes), (_, no)] = ours._loglikelihood_tokens(  # pylint: disable=protected-access
      [((None, None), ids, greedy[0]), ((None, None), ids, other)])
  assert yes and not no


def test_loglikelihoods_equal_lm_evals_hf_model(tiny):
  ours, theirs = tiny
  mine = ours.loglikelihood(_requests("loglikelihood", PAIRS))
  reference = theirs.loglikelihood(_requests("loglikelihood", PAIRS))
  for (a, greedy_a), (b, greedy_b) in zip(mine, reference):
    assert abs(a - b) < 1e-3
    assert greedy_a == greedy_b


def test_batching_and_padding_change_nothing(tiny):
  ours, _ = tiny
  batched = ours.loglikelihood(_requests("loglikelihood", PAIRS))
  one_by_one = harness.HarnessModel(loaded=ours.loaded, batch_size=1, max_length=32)
  alone = [one_by_one.loglikelihood(_requests("loglikelihood", [p]))[0] for p in PAIRS]
  np.testing.assert_allclose([x for x, _ in batched], [x for x, _ in alone], atol=1e-5)
  assert [g for _, g in batched] == [g for _, g in alone]


def test_shared_inputs_are_run_once():
  # A repeat and a prefix are read from the longer row; one-token choices share their input.
  rows, where = harness._plan([[5, 6, 7, 8], [5, 6], [5, 6, 7, 8], [9, 6]])  # pylint: disable=protected-access
  assert rows == [[5, 6, 7, 8], [9, 6]]
  assert where == [(0, 4), (0, 2), (0, 4), (1, 2)]


def test_one_token_choices_cost_one_row(tiny):
  ours, _ = tiny
  context = ours.tok_encode("def parse(self, args")
  asked = [((None, None), context, [t]) for t in (10, 20, 30)]
  rows, _ = harness._plan([context] * 3)  # pylint: disable=protected-access
  assert len(rows) == 1  # the three requests' inputs are one row
  got = ours._loglikelihood_tokens(asked)  # pylint: disable=protected-access
  for (_, ctx, cont), (logp, _) in zip(asked, got):
    assert abs(logp - _direct(ours.loaded, ctx, cont)[0]) < 1e-4


def test_a_shared_context_cache_changes_no_score(tiny, monkeypatch):
  ours, theirs = tiny
  monkeypatch.setattr(harness, "SHARED_CONTEXT_MIN", 8)  # the tiny model's short contexts
  context = "def parse(self, args=None, namespace"
  choices = [(context, c) for c in ("=None):", ", values):\n", "):\n    return")]
  requests = _requests("loglikelihood", choices + [("x = ", "1")])
  assert len(ours.tok_encode(context)) >= 8
  calls = []
  run_shared = ours._run_shared  # pylint: disable=protected-access
  monkeypatch.setattr(ours, "_run_shared", lambda *a: calls.append(a) or run_shared(*a))
  shared = ours.loglikelihood(requests)
  assert len(calls) == 1 and len(calls[0][1]) == 3  # the three choices, over one context
  plain = harness.HarnessModel(loaded=ours.loaded, batch_size=4, max_length=32,
                               share_contexts=False).loglikelihood(requests)
  reference = theirs.loglikelihood(requests)
  np.testing.assert_allclose([x for x, _ in shared], [x for x, _ in plain], atol=1e-4)
  np.testing.assert_allclose([x for x, _ in shared], [x for x, _ in reference], atol=1e-3)
  assert [g for _, g in shared] == [g for _, g in plain]


DOCS = ["import os\nimport sys\n", "def parse(self, args=None, namespace=None):\n"
        "    if args is None:\n        args = sys.argv[1:]\n    return self.parse_known_args("
        "args, namespace)[0]\n" * 3]


def test_rolling_loglikelihood_is_the_documents_log_prob_when_it_fits(tiny):
  ours, _ = tiny
  [got] = ours.loglikelihood_rolling(_requests("loglikelihood_rolling", [(DOCS[0],)]))
  ids = ours.tok_encode(DOCS[0])
  assert len(ids) < ours.max_length
  want, _ = _direct(ours.loaded, [ours.prefix_token_id], ids)
  assert abs(got - want) < 1e-4


def test_rolling_windows_equal_lm_evals_hf_model(tiny):
  ours, theirs = tiny
  assert len(ours.tok_encode(DOCS[1])) > 3 * ours.max_length  # several windows
  mine = ours.loglikelihood_rolling(_requests("loglikelihood_rolling", [(d,) for d in DOCS]))
  reference = theirs.loglikelihood_rolling(_requests("loglikelihood_rolling",
                                                     [(d,) for d in DOCS]))
  np.testing.assert_allclose(mine, reference, atol=1e-3)


def test_generate_until_stops_at_the_stop_string_and_never_returns_it(tiny):
  ours, theirs = tiny
  contexts = ["def parse(self, args", "import os\nimport", "class A"]
  free = ours.generate_until(_requests("generate_until", [
      (c, {"until": [], "max_gen_toks": 12, "do_sample": False}) for c in contexts]))
  alone = [ours.tok.decode(decode.generate(ours.model, ours.params, [ours.tok_encode(c)], 12,
                                           decode.Sampling(temperature=0.0),
                                           ours.loaded.stop_ids)[0]) for c in contexts]
  assert free == alone
  # A stop string from inside the first reply: that reply ends just before it.
  stop = free[0][3:5]
  assert stop and stop in free[0]
  args = [(c, {"until": [stop], "max_gen_toks": 12, "do_sample": False}) for c in contexts]
  cut = ours.generate_until(_requests("generate_until", args))
  for reply, whole in zip(cut, free):
    assert stop not in reply and reply == whole.split(stop)[0]
  assert cut == theirs.generate_until(_requests("generate_until", args))


def test_chat_template_renders_like_the_checkpoint(smollm2_workdir):
  loaded = load(smollm2_workdir)
  model = harness.HarnessModel(loaded=loaded)
  turns = [{"role": "user", "content": "Is the sky blue?"}]
  text = model.apply_chat_template(turns)
  assert model.tok.encode(text).tolist() == loaded.chat_ids(turns)
  open_turn = model.apply_chat_template(turns + [{"role": "assistant", "content": "Yes"}],
                                        add_generation_prompt=False)
  assert open_turn == text + "Yes"


# The local task files ------------------------------------------------------------------

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A few rows of each local task's files, in their real formats."""
  root = tmp_path_factory.mktemp("harness_data")
  for name in ("sst2", "preferences", "gsm_symbolic", "squad", "gutenberg"):
    os.makedirs(root / name)
  (root / "sst2" / "train.tsv").write_text("label\tsentence\n1\ta fine film \n0\tdull .\n")
  (root / "sst2" / "dev.tsv").write_text(
      "label\tcontent\n0\tone long string of cliches .\n1\ta warm , funny movie .\n"
      "1\tgood fun\n")
  with open(root / "preferences" / "truthful_qa_pairs.jsonl", "w", encoding="utf-8") as f:
    for q, good, bad in [("What is 2 + 2?", "4", "5"), ("Is fire cold?", "No", "Yes")]:
      f.write(json.dumps({"idx": 0, "category": "x", "prompt": q, "chosen": good,
                          "rejected": bad}) + "\n")
  problem = {"template": 0, "seed": 1, "question": "What is 3 + 4?", "answer": "7",
             "answer_cot": "3 + 4 = 7\n#### 7"}
  for name in ("train.jsonl", "test_same_templates.jsonl"):
    (root / "gsm_symbolic" / name).write_text(json.dumps(problem) + "\n")
  squad = {"data": [{"title": "T", "paragraphs": [{"context": "The cat sat on the mat.",
                                                   "qas": [{"id": "q1",
                                                            "question": "Where?",
                                                            "answers": [{"text": "the mat",
                                                                         "answer_start": 15}]}
                                                           ]}]}]}
  (root / "squad" / "squaddev_v1.1.json").write_text(json.dumps(squad))
  (root / "gutenberg" / "short.txt").write_text(DOCS[0])
  (root / "gutenberg" / "long.txt").write_text(DOCS[1])
  (root / "gutenberg" / "MD5SUMS.txt").write_text("0123abcd  long.txt\n")  # not a book
  return str(root)


def test_local_tasks_run_and_score_as_computed_directly(tiny, data_dir):
  ours, _ = tiny
  got = harness.run(ours, list(harness.LOCAL_TASKS), data_dir=data_dir, samples=True,
                    gen_kwargs={"max_gen_toks": 8})
  # SST-2's accuracy: the likelier label word, computed here from the log-likelihoods.
  rows = [("one long string of cliches .", 0), ("a warm , funny movie .", 1), ("good fun", 1)]
  prompt = "{}\nQuestion: Is this sentence positive or negative?\nAnswer:"
  scores = ours.loglikelihood(_requests("loglikelihood", [
      (prompt.format(s), f" {w}") for s, _ in rows for w in ("negative", "positive")]))
  picks = [int(scores[2 * i + 1][0] > scores[2 * i][0]) for i in range(len(rows))]
  assert got["lm_sst2"]["acc"] == pytest.approx(np.mean([p == y for p, (_, y) in
                                                          zip(picks, rows)]))
  assert got["lm_sst2"]["count"] == 3 and got["lm_truthfulqa_pairs"]["count"] == 2
  assert 0 <= got["lm_gsm_symbolic"]["exact_match"] <= 1
  assert set(got["lm_squad"]) >= {"exact_match", "f1"}
  # Word perplexity: exp(-total log-likelihood / words) over both books.
  total = sum(ours.loglikelihood_rolling(_requests("loglikelihood_rolling",
                                                   [(d,) for d in DOCS])))
  words = sum(len(d.split()) + 1 for d in DOCS)  # re.split(r"\s+") counts the final ""
  assert got["lm_gutenberg"]["word_perplexity"] == pytest.approx(np.exp(-total / words),
                                                                rel=1e-4)


def test_missing_task_data_is_a_one_line_error(tiny, tmp_path):
  ours, _ = tiny
  with pytest.raises(UserError, match="sst2"):
    harness.run(ours, ["lm_sst2"], data_dir=str(tmp_path))


def test_command_line_registers_lm(tiny, data_dir, tmp_path, monkeypatch, capsys):
  """`python -m lm.harness ...` (run here through runpy, as -m runs it: lm-eval's own
  command line, which must find the model "lm")."""
  import runpy  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(sys, "argv", [
      "lm.harness", "--model", "lm", "--model_args",
      f"workdir={ours_workdir(tiny)},max_length=32", "--tasks", "lm_truthfulqa_pairs",
      "--include_path", harness.TASKS_DIR, "--metadata", json.dumps({"data_dir": data_dir}),
      "--output_path", str(tmp_path / "out")])
  runpy.run_module("lm.harness", run_name="__main__")
  assert "lm_truthfulqa_pairs" in capsys.readouterr().out
  assert list((tmp_path / "out").rglob("results_*.json"))


def ours_workdir(tiny):
  return tiny[0].loaded.workdir


def test_harness_tasks_run_in_the_training_loop(data_dir, tmp_path, one_device):
  from conftest import metrics_records, tiny_config  # pylint: disable=import-outside-toplevel
  from lm.loop import run  # pylint: disable=import-outside-toplevel
  config = tiny_config(**{"eval.harness_tasks": "lm_truthfulqa_pairs,lm_gutenberg",
                          "eval.harness_data": data_dir, "eval.harness_every": 6})
  workdir = str(tmp_path / "run")
  run(config, workdir, devices=one_device)
  logged = {r["step"]: r for r in metrics_records(workdir)
            if "harness/lm_truthfulqa_pairs/acc" in r}
  assert sorted(logged) == [6]  # harness_every=6: not at step 3's evaluation
  # The same scores from the checkpoint on disk (lm.evaluate --harness loads it so; that
  # path on all eight devices is tested above).
  model = harness.HarnessModel(loaded=load(workdir, devices=one_device))
  # An lm-trained tokenizer's texts start with bos, as in training; rolling windows begin
  # with the prefix token (bos) instead.
  assert model.tok_encode("ab") == [model.tok.bos_id, *model.tok.encode("ab").tolist()]
  again = harness.run(model, ["lm_truthfulqa_pairs", "lm_gutenberg"], data_dir=data_dir)
  assert logged[6]["harness/lm_truthfulqa_pairs/acc"] == again["lm_truthfulqa_pairs"]["acc"]
  assert logged[6]["harness/lm_gutenberg/word_perplexity"] == pytest.approx(
      again["lm_gutenberg"]["word_perplexity"], rel=1e-5)


def test_harness_tasks_need_a_decoder():
  from conftest import tiny_config  # pylint: disable=import-outside-toplevel
  from lm.config import validate  # pylint: disable=import-outside-toplevel
  config = tiny_config(**{"eval.harness_tasks": "lm_sst2", "task.objective": "mlm"})
  with pytest.raises(UserError, match="eval.harness_tasks"):
    validate(config, 1)


def test_evaluate_prints_the_harness_scores_as_one_json_line(tiny, data_dir, capsys):
  from lm import evaluate  # pylint: disable=import-outside-toplevel
  evaluate.main([f"--workdir={ours_workdir(tiny)}", "--harness=lm_sst2",
                 f"--harness_data={data_dir}", "--limit=2"])
  line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert line["harness"]["lm_sst2"]["count"] == 2
  assert 0 <= line["harness"]["lm_sst2"]["acc"] <= 1
