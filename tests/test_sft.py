"""Chat SFT (lm/data/conversations.py, lm/data/packing.py, lm/tasks/sft.py): conversations in
the shapes people have, the loss mask against transformers' assistant-token mask, packed
conversations against the same conversations alone, and a run that resumes exactly."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import STDLIB_TEXT, tiny_config

from lm import loop
from lm.data import conversations, mixture, packing
from lm.data.tokenizers import ByteTokenizer, HfTokenizer
from lm.errors import UserError
from lm.models import Decoder, ModelConfig

CONVERSATION = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": "Another one, please?"},
                {"role": "assistant", "content": "Green, of course."}]
# ChatML with the assistant text marked for transformers' return_assistant_tokens_mask.
MARKED_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + "
    "'<|im_end|>' }}{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}"
    "{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_every_shape_reads_as_the_same_conversation():
  pair = [{"role": "user", "content": "Q\n\nctx"}, {"role": "assistant", "content": "A"}]
  shapes = [{"messages": pair},
            {"conversations": [{"from": "human", "value": "Q\n\nctx"},
                               {"from": "gpt", "value": "A"}]},
            {"instruction": "Q", "input": "ctx", "output": "A"},
            {"prompt": "Q\n\nctx", "completion": "A"}]
  for record in shapes:
    assert conversations.messages_of(record, "x") == pair, record


@pytest.fixture(scope="module")
def bpe_tokenizer():
  """A byte-level BPE tokenizer with ChatML's markers as special tokens, as lm reads it
  and as transformers does."""
  transformers = pytest.importorskip("transformers")
  from tokenizers import ByteLevelBPETokenizer  # pylint: disable=import-outside-toplevel
  tok = ByteLevelBPETokenizer()
  with open(STDLIB_TEXT, encoding="utf-8") as f:
    tok.train_from_iterator([f.read()[:50_000]], vocab_size=400, show_progress=False,
                            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
  ours = HfTokenizer(tok._tokenizer.to_str(), {"pad": 0, "bos": 0, "eos": 2, "unk": 0,  # pylint: disable=protected-access
                                               "mask": 0}, chat_template=MARKED_CHATML)
  theirs = transformers.PreTrainedTokenizerFast(tokenizer_object=tok._tokenizer)  # pylint: disable=protected-access
  theirs.chat_template = MARKED_CHATML
  return ours, theirs


@pytest.mark.parametrize("train_on", ["all_assistant", "last_assistant"])
def test_the_loss_mask_is_exactly_transformers_assistant_tokens(bpe_tokenizer, train_on):
  ours, theirs = bpe_tokenizer
  ids, weights = conversations.encode(CONVERSATION, ours, train_on)
  reference = theirs.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True)
  assert ids.tolist() == reference["input_ids"]
  mask = np.asarray(reference["assistant_masks"], np.float32)
  if train_on == "last_assistant":  # the last turn's tokens only
    mask[:len(theirs.apply_chat_template(CONVERSATION[:4], tokenize=True, return_dict=True,
                                         add_generation_prompt=True)["input_ids"])] = 0
  assert mask.sum() > 0
  np.testing.assert_array_equal(weights, mask)
  assert "Blue" in ours.decode(ids[weights > 0]) or train_on == "last_assistant"
  assert "Name a colour" not in ours.decode(ids[weights > 0])


def test_everything_weighs_every_token():
  ids, weights = conversations.encode(CONVERSATION, ByteTokenizer(), "everything")
  assert weights.sum() == len(ids)


def test_a_packed_conversation_s_logits_equal_it_alone():
  tokenizer = ByteTokenizer()
  encoded = [conversations.encode(c, tokenizer) for c in (
      CONVERSATION, CONVERSATION[1:3], [{"role": "user", "content": "Hi"},
                                        {"role": "assistant", "content": "Hello there."}])]
  seq_len = 512
  rows = packing.pack([len(ids) for ids, _ in encoded], range(3), seq_len)
  assert rows == [[0, 1, 2]]  # all three share one row
  batch = packing.rows_to_batch(encoded, rows, seq_len, tokenizer.pad_id)
  cfg = ModelConfig(vocab_size=tokenizer.vocab_size, num_layers=2, num_heads=4,
                    num_kv_heads=2, d_model=32, d_ff=64, max_len=seq_len, positions="rope")
  model = Decoder(cfg)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  apply = jax.jit(lambda *args: model.apply({"params": params}, *args))
  packed = np.asarray(apply(batch["inputs"], batch["positions"], batch["segment_ids"]))[0]
  at = 0
  for ids, weights in encoded:
    n = len(ids) - 1
    alone = np.asarray(apply(jnp.asarray([ids[:-1]])))[0]
    np.testing.assert_allclose(packed[at:at + n], alone, atol=2e-5)
    np.testing.assert_array_equal(batch["targets"][0, at:at + n], ids[1:])
    np.testing.assert_array_equal(batch["weights"][0, at:at + n], weights[1:])
    at += n
  assert not batch["weights"][0, at:].any() and not batch["segment_ids"][0, at:].any()


def test_a_conversation_that_does_not_fit_is_truncated_or_dropped():
  short = (np.arange(5), np.ones(5, np.float32))
  long = (np.arange(20), np.ones(20, np.float32))
  prompt_only = (np.arange(20), np.r_[np.zeros(15), np.ones(5)].astype(np.float32))
  kept, truncated, dropped = packing.fit([short, long, prompt_only], 9, "truncate")
  assert [len(ids) for ids, _ in kept] == [5, 10] and (truncated, dropped) == (1, 1)
  kept, truncated, dropped = packing.fit([short, long, prompt_only], 9, "drop")
  assert [len(ids) for ids, _ in kept] == [5] and (truncated, dropped) == (0, 2)


def _chat_file(path, n=40):
  with open(path, "w", encoding="utf-8") as f:
    for i in range(n):
      f.write(json.dumps({"conversations": [
          {"from": "human", "value": f"What comes after {i}?"},
          {"from": "gpt", "value": f"{i + 1} comes after {i}."}]}) + "\n")
  return str(path)


def _sft_config(path, **overrides):
  return tiny_config(**{"task.objective": "sft", "data.format": "chat", "data.path": path,
                        "data.seq_len": 128, "model.max_len": 128, "train.num_steps": 6,
                        "train.checkpoint_every": 100, "train.eval_every": 3,
                        "sample.num_tokens": 0, **overrides})


def test_sft_trains_and_resumes_exactly(tmp_path, one_device):
  config = _sft_config(_chat_file(tmp_path / "chat.jsonl"), **{"model.dropout": 0.1})
  straight = loop.run(config, str(tmp_path / "a"), devices=one_device)
  first = loop.run(config, str(tmp_path / "b"), devices=one_device, stop_after=3)
  second = loop.run(config, str(tmp_path / "b"), devices=one_device)
  assert {**first.train_losses, **second.train_losses} == straight.train_losses
  assert second.eval == straight.eval
  assert straight.train_losses[6] < straight.train_losses[1]


@pytest.mark.parametrize("line,message", [
    ("{not json", r"chat.jsonl line 2: not valid JSON"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "line 2: .*no assistant turn"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "line 2: unknown role 'robot'"),
    ('{"text": "hi"}', "line 2: not a conversation"),
])
def test_bad_conversation_files_are_one_line_errors(tmp_path, one_device, line, message):
  path = tmp_path / "chat.jsonl"
  good = json.dumps({"prompt": "a", "completion": "b"})
  path.write_text(good + "\n" + line + "\n" + good + "\n", encoding="utf-8")
  with pytest.raises(UserError, match=message):
    loop.run(_sft_config(str(path)), str(tmp_path / "run"), devices=one_device)
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_tokenizer_without_a_chat_template_is_named(bpe_tokenizer):
  from lm import data as data_lib  # pylint: disable=import-outside-toplevel
  ours, _ = bpe_tokenizer
  bare = HfTokenizer(ours.tokenizer_json, ours.specials)
  with pytest.raises(UserError, match="chat template"):
    data_lib._encoded_conversations(None, bare, None)  # pylint: disable=protected-access


def test_sft_needs_conversations_and_conversations_need_sft(tmp_path, one_device):
  with pytest.raises(UserError, match="sft trains on a chat dataset"):
    loop.run(tiny_config(**{"task.objective": "sft"}),
             str(tmp_path / "a"), devices=one_device)
  with pytest.raises(UserError, match="sft"):
    loop.run(_sft_config(_chat_file(tmp_path / "c.jsonl"), **{"task.objective": "causal"}),
             str(tmp_path / "b"), devices=one_device)


# Task mixtures (lm/data/mixture.py).

def _mixture_sources(tmp_path):
  squad = {"data": [{"paragraphs": [{"context": f"Paragraph {i} is about the number {i}.",
                                     "qas": [{"id": str(i), "question": f"Which number is {i}?",
                                              "answers": [{"text": str(i)}]}]}
                                    for i in range(30)]}]}
  (tmp_path / "squad.json").write_text(json.dumps(squad), encoding="utf-8")
  with open(tmp_path / "gsm.jsonl", "w", encoding="utf-8") as f:
    for i in range(30):
      f.write(json.dumps({"question": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n")
  return ({"path": str(tmp_path / "squad.json"), "reader": "squad", "weight": 3.0,
           "user": "{context}\nQ: {question}", "assistant": "{answer}"},
          {"path": str(tmp_path / "gsm.jsonl"), "reader": "jsonl", "weight": 1.0,
           "user": "{question}", "assistant": "#### {answer}"})


def _mixture_config(mix, **overrides):
  config = _sft_config("", **overrides)
  config.data.mixture = mix
  return config


def test_weighted_draws_follow_the_weights_and_visit_each_source_in_turn():
  sizes, weights = [100, 50], [3.0, 1.0]
  order = mixture.weighted_order(sizes, weights, seed=0, epoch=0)
  assert len(order) == 150
  share = np.mean(order < 100)
  assert abs(share - 0.75) < 0.08, share  # binomial sd 0.035
  small = order[order >= 100] - 100  # the small source cycles its shuffle, none repeats early
  assert len(set(small[:50].tolist())) == min(len(small), 50)
  assert not np.array_equal(order, mixture.weighted_order(sizes, weights, seed=0, epoch=1))


def test_a_mixture_trains_logs_its_shares_and_resumes_exactly(tmp_path, one_device, capsys):
  mix = _mixture_sources(tmp_path)
  config = _mixture_config(mix)
  straight = loop.run(config, str(tmp_path / "a"), devices=one_device)
  assert "mixture source 0" in capsys.readouterr().out
  first = loop.run(config, str(tmp_path / "b"), devices=one_device, stop_after=3)
  second = loop.run(config, str(tmp_path / "b"), devices=one_device)
  assert {**first.train_losses, **second.train_losses} == straight.train_losses
  data = __import__("lm.data", fromlist=["make_data"]).make_data(config)
  shares = data.mixture_shares(config.train.seed)
  assert shares[0][0] > shares[1][0]  # weight 3 against 1
  templated = [json.loads(data.prepared.sources["train"][i]["messages"])
               for i in range(len(data.prepared.sources["train"]))]
  users = [t[0]["content"] for t in templated]
  assert any(u.startswith("What is ") and u.endswith("?") for u in users)  # the jsonl's
  assert any(u.startswith("Paragraph") and "\nQ: Which number is" in u for u in users)
  answers = {t[0]["content"]: t[1]["content"] for t in templated}
  assert answers.get("What is 4 + 4?", "#### 8") == "#### 8"


@pytest.mark.parametrize("entry,message", [
    ({"path": "x.jsonl", "weight": 0}, r"data.mixture\[0\]: weight must be a number > 0"),
    ({"path": "x.jsonl", "weight": -1.0}, "weight must be a number > 0"),
    ({"path": "x.jsonl", "reader": "jsonl"}, "needs user and assistant templates"),
    ({"path": "x.jsonl", "colour": "red"}, "unknown key 'colour'"),
])
def test_bad_mixtures_are_one_line_config_errors(tmp_path, one_device, entry, message):
  from lm.errors import ConfigError  # pylint: disable=import-outside-toplevel
  with pytest.raises(ConfigError, match=message):
    loop.run(_mixture_config((entry,)), str(tmp_path / "run"), devices=one_device)


def test_a_template_naming_a_missing_field_is_named(tmp_path, one_device):
  squad, gsm = _mixture_sources(tmp_path)
  with pytest.raises(UserError, match=r"gsm.jsonl line 1: the mixture's template names "
                                      r"\{solution\}"):
    loop.run(_mixture_config((squad, {**gsm, "assistant": "{solution}"})),
             str(tmp_path / "run"), devices=one_device)
  assert not (tmp_path / "run" / "checkpoints").exists()
