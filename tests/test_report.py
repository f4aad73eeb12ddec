"""lm/report.py: confusion matrices, the most confidently wrong examples, labelled figures.
(classify and beam_sweep run on trained workdirs in test_tasks.py and test_seq2seq.py.)"""

import io

import matplotlib
import numpy as np

from lm import report

matplotlib.use("Agg")


def test_confusion_matrix_counts_each_pair():
  rng = np.random.default_rng(0)
  labels, predictions = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
  counts = report.confusion_matrix(labels, predictions, 4)
  assert counts.shape == (4, 4) and counts.sum() == 200
  for i in range(4):
    for j in range(4):
      assert counts[i, j] == np.sum((labels == i) & (predictions == j))


def test_confidently_wrong_ranks_only_the_mistakes_by_confidence():
  texts = ["a", "b", "c", "d", "e"]
  labels = np.array([0, 1, 1, 0, 1])
  probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7], [0.55, 0.45]])
  wrong = report.confidently_wrong(texts, labels, probs, k=5)
  assert [w["text"] for w in wrong] == ["b", "d", "e"]  # a and c are right
  assert [w["predicted"] for w in wrong] == [0, 1, 0]
  np.testing.assert_allclose([w["confidence"] for w in wrong], [0.8, 0.7, 0.55])
  assert len(report.confidently_wrong(texts, labels, probs, k=2)) == 2


def _png(fig):
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png")
  return buffer.getvalue()


def test_figures_are_titled_labelled_png_images():
  counts = np.array([[40, 10], [5, 45]])
  fig = report.plot_confusion(counts, ["negative", "positive"])
  ax = fig.axes[0]
  assert ax.get_title() == "confusion matrix (accuracy 85.0%)"
  assert ax.get_xlabel() == "predicted label" and ax.get_ylabel() == "true label"
  assert [t.get_text() for t in ax.get_xticklabels()] == ["negative", "positive"]
  assert sorted(t.get_text() for t in ax.texts) == ["10", "40", "45", "5"]
  sweep = [{"beam_size": b, "bleu": 20.0 + b, "chrf": 40.0, "seconds": float(b)}
           for b in (1, 2, 4)]
  fig2 = report.plot_beam_sweep(sweep)
  assert fig2.axes[0].get_xlabel() and fig2.axes[0].get_ylabel() == "BLEU"
  assert fig2.axes[1].get_ylabel() == "seconds (compiling included)"
  for f in (fig, fig2):
    assert _png(f)[:8] == b"\x89PNG\r\n\x1a\n"
