"""The terminal chat (lm/chat.py): piped input, commands, the context budget, Ctrl-C, and
the real SmolLM2's answers with its own template."""

import io
import subprocess
import sys

import jax
import pytest
import transformers

from conftest import REPO, smollm2_file, tiny_config, user_env
from lm import chat, decode
from lm.inference import load
from lm.loop import run


@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory):
  """A byte-level model lm trained (ChatML as text), context 256."""
  workdir = str(tmp_path_factory.mktemp("chat") / "run")
  run(tiny_config(**{"train.num_steps": 2, "sample.num_tokens": 0, "model.max_len": 256,
                     "data.seq_len": 32}), workdir, devices=jax.devices()[:1])
  return workdir


def greedy(_):
  return decode.Sampling(temperature=0.0)


@pytest.mark.slow
def test_piped_input_is_a_chat_and_commands_work(tiny_workdir):
  lines = "Hi there\n/system Be brief.\nAnd now?\n/reset\n/nonsense\n\nLast one\n/quit\nIgnored\n"
  out = subprocess.run([sys.executable, "-m", "lm.chat", f"--workdir={tiny_workdir}",
                        "--max_tokens=8", "--temperature=0"], input=lines, cwd=REPO,
                       env=user_env(), capture_output=True, text=True, timeout=300, check=True)
  for notice in ("(system prompt set)", "(conversation forgotten)",
                 "(unknown command /nonsense"):
    assert notice in out.stderr
  assert "lm: error" not in out.stderr and out.stdout.strip()


def test_one_reply_per_line_until_quit(tiny_workdir):
  session = chat.Chat(load(tiny_workdir), max_tokens=4, out=io.StringIO(),
                      notices=io.StringIO())
  chat.run(session, iter(["one\n", "\n", "/system S\n", "two\n", "/reset\n", "three\n",
                          "/quit\n", "never\n"]), greedy)
  assert [t["content"] for t in session.turns if t["role"] == "user"] == ["three"]
  assert session.system == "S"
  assert session.messages([])[0] == {"role": "system", "content": "S"}


def test_the_oldest_turns_are_dropped_to_fit_the_context(tiny_workdir):
  loaded = load(tiny_workdir)
  notices = io.StringIO()
  session = chat.Chat(loaded, max_tokens=8, out=io.StringIO(), notices=notices)
  session.reply("a" * 40, greedy(0))
  session.reply("b" * 40, greedy(1))
  assert notices.getvalue() == ""
  session.reply("c" * 40, greedy(2))  # ChatML + 5 turns no longer fit 256 bytes
  assert "dropped the 1 oldest exchange" in notices.getvalue()
  users = [t["content"] for t in session.turns if t["role"] == "user"]
  assert users == ["b" * 40, "c" * 40]
  ids, budget = session.prompt("d")
  assert len(ids) + budget <= loaded.model.cfg.max_len


def test_ctrl_c_ends_the_reply_and_not_the_chat(tiny_workdir, monkeypatch):
  loaded = load(tiny_workdir)
  calls = []
  real = decode.decode

  def interrupted(*args):
    calls.append(1)
    if len(calls) == 1:
      raise KeyboardInterrupt
    return real(*args)

  monkeypatch.setattr(decode, "decode", interrupted)
  out, notices = io.StringIO(), io.StringIO()
  session = chat.Chat(loaded, max_tokens=40, out=out, notices=notices)
  chat.run(session, iter(["first\n", "second\n"]), greedy)
  assert "(stopped)" in notices.getvalue()
  assert [t["content"] for t in session.turns if t["role"] == "user"] == ["first", "second"]


def test_smollm2_answers_with_its_own_template(smollm2_workdir):
  loaded = load(smollm2_workdir)
  out = io.StringIO()
  session = chat.Chat(loaded, max_tokens=24, out=out, notices=io.StringIO())
  session.reply("What is the capital of France?", greedy(0))
  assert "Paris" in out.getvalue()
  session.system = "You are a geography teacher."
  path = smollm2_file()
  folder, name = path.rsplit("/", 1)
  reference = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  messages = session.messages(session.turns + [{"role": "user", "content": "And Spain?"}])
  assert loaded.chat_ids(messages) == list(reference.apply_chat_template(
      messages, tokenize=True, add_generation_prompt=True, return_dict=False))
