"""The flags every command that loads a workdir's model shares (lm.sample, lm.chat,
lm.serve), defined once so that those modules can live in one process (tests, notebooks)."""

from absl import flags

WORKDIR = flags.DEFINE_string("workdir", None, "A training run's folder (or an import's).")
STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
