"""The sampling flags of lm.sample and lm.chat, defined once, and their checks."""

from absl import flags

MAX_TOKENS = flags.DEFINE_integer("max_tokens", 200, "New tokens per completion (reply).")
TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "0: greedy.")
TOP_K = flags.DEFINE_integer("top_k", 0, "0: off.")
TOP_P = flags.DEFINE_float("top_p", 1.0, "1: off.")
PENALTY = flags.DEFINE_float("repetition_penalty", 1.0, "1: off.")
SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def problem():
  """The first bad flag value as a message, or None."""
  for bad, message in ((MAX_TOKENS.value < 1, "--max_tokens must be >= 1"),
                       (TEMPERATURE.value < 0, "--temperature must be >= 0"),
                       (not 0 < TOP_P.value <= 1, "--top_p must be in (0, 1]"),
                       (TOP_K.value < 0, "--top_k must be >= 0"),
                       (PENALTY.value <= 0, "--repetition_penalty must be > 0")):
    if bad:
      return message
  return None


def sampling(offset=0):
  """A decode.Sampling from the flags (seed + offset)."""
  from lm import decode  # pylint: disable=import-outside-toplevel
  return decode.Sampling(temperature=TEMPERATURE.value, top_k=TOP_K.value, top_p=TOP_P.value,
                         repetition_penalty=PENALTY.value, seed=SEED.value + offset)


def load_or_exit(argv):
  """The sampling commands' common start: the flags checked, then --workdir's model loaded
  (or one `lm: error:` line and exit status 2)."""
  import sys  # pylint: disable=import-outside-toplevel
  from lm import cli_flags, inference  # pylint: disable=import-outside-toplevel
  message = problem()
  if message:
    print(f"lm: error: {message}", file=sys.stderr)
    sys.exit(2)
  return inference.load_or_exit(argv, cli_flags.WORKDIR.value, cli_flags.STEP.value)
