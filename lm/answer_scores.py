"""Scores of generated answers against references: SQuAD exact match and F1 (the official
v1.1 script's normalisation), GSM accuracy (the reply's final number), and a label word
read from a reply. Pure Python, one answer at a time; lm/evaluate.py averages them.
"""

import collections
import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)
# A number as people write it: a sign, thousands separators, decimals ("-1,234.50").
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def squad_normalize(text):
  """SQuAD v1.1's normalize_answer: lower case, punctuation and the articles a/an/the
  removed, whitespace collapsed."""
  text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", text).split())


def squad_exact(prediction, answers):
  """1.0 if the normalised prediction equals any normalised reference answer."""
  return float(any(squad_normalize(prediction) == squad_normalize(a) for a in answers))


def _f1(prediction, answer):
  pred, gold = squad_normalize(prediction).split(), squad_normalize(answer).split()
  common = collections.Counter(pred) & collections.Counter(gold)
  same = sum(common.values())
  if same == 0:
    return 0.0
  precision, recall = same / len(pred), same / len(gold)
  return 2 * precision * recall / (precision + recall)


def squad_f1(prediction, answers):
  """The best token-overlap F1 of the prediction against the reference answers."""
  return max((_f1(prediction, a) for a in answers), default=0.0)


def parse_number(text):
  """A number written with optional sign, thousands commas and decimals, as a float; None
  if `text` holds none. GSM8K's "#### 1,234" answers and GSM-Symbolic's "1234" alike."""
  found = _NUMBER.findall(text)
  if not found:
    return None
  return float(found[-1].replace(",", ""))


def final_number(reply):
  """The number a reply ends on: after GSM8K's "####" marker if it has one, else the last
  number it writes."""
  if "####" in reply:
    after = parse_number(reply.rsplit("####", 1)[1])
    if after is not None:
      return after
  return parse_number(reply)


def gsm_correct(reply, answer):
  """1.0 if the reply's final number equals the reference answer's (to 1e-6)."""
  got, want = final_number(reply), final_number(str(answer))
  return float(got is not None and want is not None and abs(got - want) < 1e-6)


def label_of(reply, labels):
  """The label word the reply names first (case-insensitive, whole words); None if none."""
  best, where = None, len(reply) + 1
  for label in labels:
    m = re.search(rf"\b{re.escape(label.lower())}\b", reply.lower())
    if m and m.start() < where:
      best, where = label, m.start()
  return best
