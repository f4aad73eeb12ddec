"""The local harness tasks' data: lm-eval calls these (`custom_dataset` in each YAML) with
the `--metadata` JSON's keys, so `data_dir` points the tasks at any copy of the files
(default: ../shared/data beside the repository, or $LM_HARNESS_DATA). Nothing is fetched
from the hub. Each returns a datasets.DatasetDict with the split names the YAML uses.
"""

import csv
import glob
import json
import os
import re

import datasets

from lm import answer_scores
from lm.errors import UserError

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_DIR = os.path.join(_REPO, "..", "shared", "data")


def _folder(data_dir, *parts):
  root = data_dir or os.environ.get("LM_HARNESS_DATA") or DEFAULT_DIR
  path = os.path.join(root, *parts)
  if not os.path.exists(path):
    raise UserError(f"harness data: {path} not found (pass --metadata "
                    "'{\"data_dir\": \"DIR\"}' with DIR the folder holding "
                    f"{os.path.join(*parts)})")
  return path


def _jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def sst2(data_dir=None, **unused):
  """GLUE SST-2: train.tsv (label, sentence) and dev.tsv (label, content) as train and
  validation, each {sentence, label}."""
  def read(name):
    with open(_folder(data_dir, "sst2", name), encoding="utf-8", newline="") as f:
      rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [{"sentence": r.get("sentence", r.get("content", "")).strip(),
             "label": int(r["label"])} for r in rows]
  return datasets.DatasetDict({
      "train": datasets.Dataset.from_list(read("train.tsv")),
      "validation": datasets.Dataset.from_list(read("dev.tsv"))})


def truthfulqa_pairs(data_dir=None, **unused):
  """The 1,084 TruthfulQA pairs as {question, choices: [true answer, false answer]}."""
  rows = _jsonl(_folder(data_dir, "preferences", "truthful_qa_pairs.jsonl"))
  return datasets.DatasetDict({"validation": datasets.Dataset.from_list(
      [{"question": r["prompt"], "choices": [r["chosen"], r["rejected"]], "label": 0}
       for r in rows])})


def gsm_symbolic(data_dir=None, **unused):
  """GSM-Symbolic: train (for few-shot examples) and test_same_templates as test."""
  def read(name):
    return [{"question": r["question"], "answer": str(r["answer"]),
             "answer_cot": r["answer_cot"]}
            for r in _jsonl(_folder(data_dir, "gsm_symbolic", name))]
  return datasets.DatasetDict({
      "train": datasets.Dataset.from_list(read("train.jsonl")),
      "test": datasets.Dataset.from_list(read("test_same_templates.jsonl"))})


def squad(data_dir=None, **unused):
  """SQuAD v1.1 dev, one {id, title, context, question, answers} per question, in the
  file's order."""
  with open(_folder(data_dir, "squad", "squaddev_v1.1.json"), encoding="utf-8") as f:
    articles = json.load(f)["data"]
  rows = [{"id": qa["id"], "title": article.get("title", ""), "context": p["context"],
           "question": qa["question"], "answers": [a["text"] for a in qa["answers"]]}
          for article in articles for p in article["paragraphs"] for qa in p["qas"]]
  return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})


NOT_BOOKS = ("MD5SUMS.txt",)  # the corpus folder's checksum list


def gutenberg(data_dir=None, **unused):
  """The Gutenberg books, one document each, the shortest first (so --limit N takes the N
  shortest books)."""
  paths = sorted(p for p in glob.glob(os.path.join(_folder(data_dir, "gutenberg"), "*.txt"))
                 if os.path.basename(p) not in NOT_BOOKS)
  books = []
  for path in paths:
    with open(path, encoding="utf-8", errors="replace") as f:
      books.append({"title": os.path.basename(path)[:-4], "text": f.read()})
  books.sort(key=lambda b: (len(b["text"]), b["title"]))
  return datasets.DatasetDict({"test": datasets.Dataset.from_list(books)})


# Scores ---------------------------------------------------------------------------------

def gsm_results(doc, results):
  """Accuracy: the reply's final number (after "####" if written) equals the answer."""
  number = answer_scores.final_number(results[0])
  return {"exact_match": float(number is not None and
                               abs(number - float(doc["answer"])) < 1e-6)}


def squad_results(doc, results):
  """SQuAD v1.1's exact match and F1 (official normalisation), in percent."""
  reply = results[0].strip()
  return {"exact_match": 100.0 * answer_scores.squad_exact(reply, doc["answers"]),
          "f1": 100.0 * answer_scores.squad_f1(reply, doc["answers"])}


def perplexity_results(doc, results):
  """Word and byte perplexity and bits per byte of the whole book (lm-eval's
  weighted_perplexity aggregation over (log-likelihood, count) pairs)."""
  (loglikelihood,) = results
  words = len(re.split(r"\s+", doc["text"]))
  size = len(doc["text"].encode("utf-8"))
  return {"word_perplexity": (loglikelihood, words),
          "byte_perplexity": (loglikelihood, size),
          "bits_per_byte": (loglikelihood, size)}
