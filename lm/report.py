"""Evaluation views of trained task models, for the notebooks in colab/.

Classification: every example's class probabilities (`classify`), the confusion matrix and
the most confidently wrong examples. Translation: BLEU, chrF and speed across beam sizes
(`beam_sweep`). Functions return numpy arrays, lists or dicts; the `plot_*` functions
return matplotlib figures with titled, labelled axes.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from lm import translate
from lm.data.examples import classification_example


def classify(loaded, texts, batch_size=64):
  """Class probabilities [N, C] of `texts` by a classification workdir's model
  (`lm.inference.load(workdir, decoder=False)`), each text encoded as in training."""
  seq_len = loaded.config.data.seq_len
  rows = [classification_example({"text": t, "label": 0}, loaded.tokenizer, seq_len)
          for t in texts]
  apply = jax.jit(lambda p, x, s: jax.nn.softmax(
      loaded.model.apply({"params": p}, x, None, s).astype(jnp.float32), -1))
  out = []
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    width = min(seq_len, translate.bucket(max(int(r["length"]) for r in chunk)))
    inputs = np.full((batch_size, width), loaded.tokenizer.pad_id, np.int32)
    segments = np.zeros((batch_size, width), np.int32)
    segments[:, 0] = 1  # filler rows see one token, so no row attends to nothing
    for i, r in enumerate(chunk):
      inputs[i], segments[i] = r["inputs"][:width], r["segment_ids"][:width]
    with loaded.on_mesh():
      probs = apply(loaded.params, jnp.asarray(inputs), jnp.asarray(segments))
    out.append(np.asarray(probs)[:len(chunk)])
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def confusion_matrix(labels, predictions, num_labels):
  """counts[i, j]: examples of true class i predicted as class j."""
  counts = np.zeros((num_labels, num_labels), np.int64)
  np.add.at(counts, (np.asarray(labels, np.int64), np.asarray(predictions, np.int64)), 1)
  return counts


def confidently_wrong(texts, labels, probs, k=10):
  """The k misclassified examples the model was surest of, surest first:
  [{"text", "label", "predicted", "confidence"}]."""
  probs = np.asarray(probs)
  predicted = probs.argmax(-1)
  wrong = np.flatnonzero(predicted != np.asarray(labels))
  order = wrong[np.argsort(-probs[wrong, predicted[wrong]], kind="stable")][:k]
  return [{"text": texts[i], "label": int(labels[i]), "predicted": int(predicted[i]),
           "confidence": float(probs[i, predicted[i]])} for i in order]


def translate_texts(loaded, texts, beam_size=4, alpha=0.6, batch_size=64):
  """Translations of `texts` by an encoder-decoder workdir's model
  (`lm.inference.load(workdir, decoder=False)`); beam 1 is greedy search."""
  seq_len = loaded.config.data.seq_len
  with loaded.on_mesh():
    return translate.translate(loaded.model, loaded.params, loaded.tokenizer, texts, seq_len,
                               seq_len, beam_size, alpha if beam_size > 1 else 0.0,
                               batch_size)


def beam_sweep(loaded, sources, references, beam_sizes=(1, 2, 4, 8), alpha=0.6,
               batch_size=64):
  """Translations of `sources` by an encoder-decoder workdir's model at each beam size:
  [{"beam_size", "bleu", "chrf", "seconds", "hypotheses"}]. Beam 1 is greedy search (no
  length penalty). Seconds include each beam size's first compilation."""
  results = []
  for beam in beam_sizes:
    start = time.perf_counter()
    hypotheses = translate_texts(loaded, sources, beam, alpha, batch_size)
    seconds = time.perf_counter() - start
    results.append({"beam_size": beam, **translate.scores(hypotheses, references),
                    "seconds": seconds, "hypotheses": hypotheses})
  return results


# Figures.


def plot_confusion(counts, label_names, title="confusion matrix"):
  """The confusion matrix as a labelled heatmap with each cell's count."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  n = len(label_names)
  fig, ax = plt.subplots(figsize=(1.2 * n + 2.5, 1.1 * n + 1.8))
  image = ax.imshow(counts, cmap="Blues")
  for i in range(n):
    for j in range(n):
      ax.text(j, i, str(int(counts[i, j])), ha="center", va="center",
              color="white" if counts[i, j] > counts.max() / 2 else "black")
  ax.set_xticks(range(n), label_names)
  ax.set_yticks(range(n), label_names)
  ax.set_xlabel("predicted label")
  ax.set_ylabel("true label")
  accuracy = np.trace(counts) / max(counts.sum(), 1)
  ax.set_title(f"{title} (accuracy {accuracy:.1%})")
  fig.colorbar(image, ax=ax, label="examples")
  return fig


def plot_beam_sweep(results):
  """BLEU and seconds against beam size, from beam_sweep()."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  beams = [r["beam_size"] for r in results]
  fig, ax = plt.subplots(figsize=(5.5, 3.5))
  ax.plot(beams, [r["bleu"] for r in results], marker="o", color="tab:blue", label="BLEU")
  ax.set_xscale("log", base=2)
  ax.set_xticks(beams, [str(b) for b in beams])
  ax.set_xlabel("beam size (1: greedy)")
  ax.set_ylabel("BLEU", color="tab:blue")
  seconds = ax.twinx()
  seconds.plot(beams, [r["seconds"] for r in results], marker="s", color="tab:orange")
  seconds.set_ylabel("seconds (compiling included)", color="tab:orange")
  ax.set_title("beam size: quality and cost")
  return fig
