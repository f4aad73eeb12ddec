"""`python -m lm.sample --workdir=DIR --prompt="def " [--max_tokens=200] [--temperature=0.8]`

Loads the newest checkpoint of a training run and prints a completion for each --prompt
(cached decoding on device; a new document or eos ends a completion early).
"""

import sys

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's folder.")
_PROMPT = flags.DEFINE_multi_string("prompt", ["\n"], "Prompt text; repeat for a batch.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 200, "New tokens per completion.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "0: greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "0: off.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "1: off.")
_PENALTY = flags.DEFINE_float("repetition_penalty", 1.0, "1: off.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")


def main(argv):
  logging.set_verbosity(logging.WARNING)
  from lm import decode, inference  # pylint: disable=import-outside-toplevel
  problems = [m for bad, m in ((_MAX_TOKENS.value < 1, "--max_tokens must be >= 1"),
                               (_TEMPERATURE.value < 0, "--temperature must be >= 0"),
                               (not 0 < _TOP_P.value <= 1, "--top_p must be in (0, 1]"),
                               (_TOP_K.value < 0, "--top_k must be >= 0"),
                               (_PENALTY.value <= 0, "--repetition_penalty must be > 0"))
              if bad]
  if problems:
    print(f"lm: error: {problems[0]}", file=sys.stderr)
    sys.exit(2)
  loaded = inference.load_or_exit(argv, _WORKDIR.value, _STEP.value)
  sampling = [decode.Sampling(temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                              top_p=_TOP_P.value, repetition_penalty=_PENALTY.value,
                              seed=_SEED.value + i) for i in range(len(_PROMPT.value))]
  texts = loaded.complete(_PROMPT.value, _MAX_TOKENS.value, sampling)
  for prompt, text in zip(_PROMPT.value, texts):
    print(prompt + text, flush=True)
    if len(_PROMPT.value) > 1:
      print("-" * 40, flush=True)


if __name__ == "__main__":
  app.run(main)
