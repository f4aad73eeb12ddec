"""`python -m lm.sample --workdir=DIR --prompt="def " [--max_tokens=200] [--temperature=0.8]`

Loads the newest checkpoint of a training run and prints a completion for each --prompt
(cached decoding on device; a new document or eos ends a completion early). The prompt is
encoded as the model's tokenizer encodes text (bos first only where it adds one).
"""

from absl import app, flags, logging

from lm import cli_flags, sampling_flags

_PROMPT = flags.DEFINE_multi_string("prompt", ["\n"], "Prompt text; repeat for a batch.")

flags.adopt_module_key_flags(cli_flags)
flags.adopt_module_key_flags(sampling_flags)


def main(argv):
  logging.set_verbosity(logging.WARNING)
  loaded = sampling_flags.load_or_exit(argv)
  sampling = [sampling_flags.sampling(i) for i in range(len(_PROMPT.value))]
  texts = loaded.complete(_PROMPT.value, sampling_flags.MAX_TOKENS.value, sampling)
  for prompt, text in zip(_PROMPT.value, texts):
    print(prompt + text, flush=True)
    if len(_PROMPT.value) > 1:
      print("-" * 40, flush=True)


if __name__ == "__main__":
  app.run(main)
