"""Evaluation scores computed on the host over a whole split (numpy, float64).

Every function takes flat arrays of the real examples (padding already dropped).
"""

import numpy as np


def accuracy(predictions, labels):
  return float(np.mean(np.asarray(predictions) == np.asarray(labels))) if len(labels) else 0.0


def macro_f1(predictions, labels, num_classes):
  """Unweighted mean over classes of F1; a class with no true and no predicted examples is
  left out (as scikit-learn does when `labels` is not given)."""
  predictions, labels = np.asarray(predictions), np.asarray(labels)
  scores = []
  for c in range(num_classes):
    tp = np.sum((predictions == c) & (labels == c))
    fp = np.sum((predictions == c) & (labels != c))
    fn = np.sum((predictions != c) & (labels == c))
    if tp + fp + fn == 0:
      continue
    scores.append(2 * tp / (2 * tp + fp + fn))
  return float(np.mean(scores)) if scores else 0.0


def pearson(x, y):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  x, y = x - x.mean(), y - y.mean()
  denominator = np.sqrt(np.sum(x * x) * np.sum(y * y))
  return float(np.sum(x * y) / denominator) if denominator > 0 else 0.0


def ranks(x):
  """1-based ranks; tied values share the mean of their ranks."""
  x = np.asarray(x)
  order = np.argsort(x, kind="stable")
  ranked = np.empty(len(x), np.float64)
  ranked[order] = np.arange(1, len(x) + 1)
  values, inverse = np.unique(x, return_inverse=True)
  sums = np.bincount(inverse, weights=ranked, minlength=len(values))
  counts = np.bincount(inverse, minlength=len(values))
  return (sums / counts)[inverse]


def spearman(x, y):
  return pearson(ranks(x), ranks(y))
