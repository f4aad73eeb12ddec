"""`python -m lm.chat --workdir=DIR [--system=TEXT] [--max_tokens=512] [--temperature=0.7]`

A terminal chat with a workdir's model: each line you type is a user turn; the reply streams
as it is decoded. The conversation is rendered with the model's own chat template (ChatML for
models lm trained) and kept within the model's context: when it no longer fits, the oldest
turns are dropped, with a notice. Commands: `/reset` (forget the conversation), `/system TEXT`
(set the system prompt; `/system` alone clears it), `/quit`. Ctrl-C ends a reply, not the
chat; Ctrl-D (end of input) ends the chat. Input may be piped: `printf 'Hi\\n' | python -m
lm.chat --workdir=DIR` prints one reply per line read. Sampling flags as in lm.sample.
"""

import sys

from absl import app, flags, logging

from lm import cli_flags, sampling_flags
from lm.errors import UserError

_SYSTEM = flags.DEFINE_string("system", None, "The system prompt.")
CHUNK = 8  # tokens decoded per device call while a reply streams


class Chat:
  """The conversation with a Loaded model: history, context budget and streamed replies."""

  def __init__(self, loaded, max_tokens, system=None, out=sys.stdout, notices=sys.stderr):
    self.loaded, self.max_tokens = loaded, max_tokens
    self.system, self.turns = system, []
    self.out, self.notices = out, notices
    self.context = loaded.model.cfg.max_len
    # A model lm trained reads ChatML's markers as text: its reply ends at the text.
    self.stop_text = loaded.tokenizer.chat_stop_text

  def messages(self, turns):
    system = [{"role": "system", "content": self.system}] if self.system else []
    return system + turns

  def prompt(self, user_text):
    """The ids of the conversation with `user_text` as its next turn, oldest turns dropped
    until it and a reply of max_tokens fit the context. Returns (ids, reply budget)."""
    turns = self.turns + [{"role": "user", "content": user_text}]
    dropped = 0
    while True:
      ids = self.loaded.chat_ids(self.messages(turns))
      room = self.context - len(ids)
      if room >= min(self.max_tokens, self.context // 4) or len(turns) <= 1:
        break
      turns = turns[2:] if len(turns) > 2 else turns[1:]
      dropped += 1
    if dropped:
      self.notice(f"(dropped the {dropped} oldest exchange{'s' if dropped > 1 else ''} to "
                  f"fit the model's context of {self.context} tokens)")
      self.turns = turns[:-1]
    if room < 1:
      self.notice(f"(this message alone is {len(ids)} tokens, more than the context of "
                  f"{self.context}; its start is cut)")
      ids, room = ids[-(self.context // 2):], self.context - self.context // 2
    return ids, min(self.max_tokens, room)

  def notice(self, text):
    print(text, file=self.notices, flush=True)

  def reply(self, user_text, sampling):
    """Streams the model's reply to `user_text` and records the exchange. Ctrl-C stops the
    reply where it is (what was said stays in the history)."""
    import jax  # pylint: disable=import-outside-toplevel
    from lm import decode  # pylint: disable=import-outside-toplevel
    ids, budget = self.prompt(user_text)
    model, params, tokenizer = self.loaded.model, self.loaded.params, self.loaded.tokenizer
    tokens, shown = [], ""
    try:
      with self.loaded.on_mesh():
        state = decode.prefill(model, params, [ids], budget, [sampling],
                               self.loaded.stop_ids, batch_size=1)
        while True:
          # One transfer per chunk: the row's tokens and whether it stopped.
          row, done = jax.device_get((state.tokens_BxN[0], state.done_B[0]))
          tokens = [int(t) for t in row if t != decode.PAD]
          decoded = tokenizer.decode(tokens)
          text = self._visible(decoded)
          if text.startswith(shown):
            self.out.write(text[len(shown):])
            self.out.flush()
            shown = text
          if (len(tokens) >= budget or done or
              (self.stop_text and self.stop_text in decoded)):
            break
          state = decode.decode(model, params, state, CHUNK)
    except KeyboardInterrupt:
      self.notice(" (stopped)")
    self.out.write("\n")
    self.out.flush()
    self.turns += [{"role": "user", "content": user_text},
                   {"role": "assistant", "content": shown.strip()}]
    return shown

  def _visible(self, text):
    """The reply as far as it can be shown: up to a textual stop marker, and without a
    trailing partial character (a multi-byte one still being decoded)."""
    if self.stop_text and self.stop_text in text:
      return text[:text.index(self.stop_text)]
    return text.rstrip("\ufffd")

  def command(self, line):
    """Handles a /command; returns False to end the chat."""
    name, _, rest = line.partition(" ")
    if name == "/quit":
      return False
    if name == "/reset":
      self.turns = []
      self.notice("(conversation forgotten)")
    elif name == "/system":
      self.system = rest.strip() or None
      self.notice("(system prompt set)" if self.system else "(system prompt cleared)")
    else:
      self.notice(f"(unknown command {name}: /reset, /system TEXT, /quit)")
    return True


def run(chat, lines, sampling, interactive=False):
  """The chat over an iterator of input lines (a terminal's, or a pipe's)."""
  turn = 0
  while True:
    try:
      if interactive:
        chat.out.write("> ")
        chat.out.flush()
      line = next(lines)
    except KeyboardInterrupt:
      chat.out.write("\n")
      continue
    except StopIteration:
      return
    line = line.rstrip("\n")
    if not line.strip():
      continue
    if line.startswith("/"):
      if not chat.command(line.strip()):
        return
      continue
    chat.reply(line, sampling(turn))
    turn += 1

flags.adopt_module_key_flags(cli_flags)
flags.adopt_module_key_flags(sampling_flags)


def main(argv):
  logging.set_verbosity(logging.WARNING)
  loaded = sampling_flags.load_or_exit(argv)
  chat = Chat(loaded, sampling_flags.MAX_TOKENS.value, _SYSTEM.value)
  interactive = sys.stdin.isatty()
  if interactive:
    chat.notice(f"lm chat with {cli_flags.WORKDIR.value}: /reset, /system TEXT, /quit; "
                "Ctrl-C ends a reply, Ctrl-D the chat")
  try:
    run(chat, iter(sys.stdin.readline, ""), sampling_flags.sampling, interactive)
  except UserError as e:
    print(f"lm: error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
