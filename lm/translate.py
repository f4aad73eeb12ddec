"""Translation with an encoder-decoder run: batches of text in, text out; BLEU and chrF.

    python -m lm.translate --workdir=runs/multi30k --input=test.en --output=test.hyp.de \
        [--beam_size=4] [--alpha=0.6] [--reference=test.de]

Each input line is one source sentence (tokenized as in training, cut to data.seq_len - 1
tokens, then eos); each output line its translation, detokenized by the run's own
tokenizer. Sentences are sorted by length and decoded in batches of --batch_size rows padded
to a power-of-two length, so a whole file needs few compilations. With --reference, corpus
BLEU and chrF (sacrebleu: cased, its own 13a tokenization of the detokenized text) are
printed as one JSON line.
"""

import json
import sys

from absl import app, flags, logging


def bucket(n):
  """Batch widths come in powers of two (at least 8), so few shapes are compiled."""
  return max(8, 1 << (max(int(n), 1) - 1).bit_length())


def translate(model, params, tokenizer, texts, source_len, max_len, beam_size=4, alpha=0.6,
              batch_size=64):
  """Translations of `texts` (detokenized strings), in order."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  from lm import search  # pylint: disable=import-outside-toplevel
  sources = [[*tokenizer.encode(t)[:source_len - 1].tolist(), tokenizer.eos_id] for t in texts]
  order = sorted(range(len(texts)), key=lambda i: len(sources[i]))
  out = [""] * len(texts)
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    width = bucket(max(len(sources[i]) for i in rows))
    ids = np.full((batch_size, width), tokenizer.pad_id, np.int32)
    segments = np.zeros((batch_size, width), np.int32)
    for r, i in enumerate(rows):
      ids[r, :len(sources[i])] = sources[i]
      segments[r, :len(sources[i])] = 1
    segments[len(rows):, 0] = 1  # filler rows: one visible token, so no row attends to nothing
    found = search.translate_ids(model, params, ids, segments, max_len, tokenizer.bos_id,
                                 tokenizer.eos_id, beam_size, alpha)
    for r, i in enumerate(rows):
      out[i] = tokenizer.decode(found[r])
  return out


def scores(hypotheses, references):
  """Corpus BLEU and chrF of detokenized text (sacrebleu's defaults: cased, 13a)."""
  import sacrebleu  # pylint: disable=import-outside-toplevel
  return {"bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
          "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score}


def _define_flags():
  """The command's flags; defined only when it runs, so that importing this module (the
  training loop does, to score translations) defines none."""
  return {
      "workdir": flags.DEFINE_string("workdir", None,
                                     "An encoder-decoder training run's folder."),
      "input": flags.DEFINE_string("input", None, "Source sentences, one per line."),
      "output": flags.DEFINE_string("output", None, "Where the translations go, one a line."),
      "reference": flags.DEFINE_string("reference", None,
                                       "Reference translations: print BLEU and chrF."),
      "beam_size": flags.DEFINE_integer("beam_size", 4, "1: greedy."),
      "alpha": flags.DEFINE_float("alpha", 0.6, "GNMT length penalty exponent (0: none)."),
      "batch_size": flags.DEFINE_integer("batch_size", 64, "Sentences decoded together."),
      "step": flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest)."),
  }


def main(argv, f):
  logging.set_verbosity(logging.WARNING)
  from lm import inference, tasks  # pylint: disable=import-outside-toplevel
  from lm.errors import UserError  # pylint: disable=import-outside-toplevel

  def fail(message):
    print(f"lm: error: {message}", file=sys.stderr)
    sys.exit(2)

  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  for name in ("workdir", "input", "output"):
    if not f[name].value:
      fail(f"--{name} is required")
  beam, alpha, batch = f["beam_size"].value, f["alpha"].value, f["batch_size"].value
  if beam < 1 or batch < 1 or alpha < 0:
    fail("--beam_size and --batch_size must be >= 1, --alpha >= 0")
  workdir = f["workdir"].value
  try:
    loaded = inference.load(workdir, f["step"].value, decoder=False)
  except UserError as e:
    fail(str(e))
  objective = loaded.config.task.objective
  if not tasks.get(objective).translates:
    fail(f"--workdir: {workdir} holds a {objective} model; lm.translate needs an "
         "encoder-decoder (task.objective=seq2seq)")
  try:
    with open(f["input"].value, encoding="utf-8") as file:
      texts = file.read().splitlines()
    references = None
    if f["reference"].value:
      with open(f["reference"].value, encoding="utf-8") as file:
        references = file.read().splitlines()
      if len(references) != len(texts):
        fail(f"--reference has {len(references)} lines, --input {len(texts)}")
  except OSError as e:
    fail(f"cannot read {e.filename}: {e.strerror}")
  seq_len = loaded.config.data.seq_len
  with loaded.on_mesh():
    hypotheses = translate(loaded.model, loaded.params, loaded.tokenizer, texts, seq_len,
                           seq_len, beam, alpha, batch)
  with open(f["output"].value, "w", encoding="utf-8") as file:
    file.write("".join(h + "\n" for h in hypotheses))
  if references is not None:
    print(json.dumps({"sentences": len(texts), **{k: round(v, 2) for k, v in
                                                   scores(hypotheses, references).items()}}))


if __name__ == "__main__":
  _flags = _define_flags()
  app.run(lambda argv: main(argv, _flags))
