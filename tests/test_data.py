"""Corpus loading and splits, tokenizers, and the train/eval batch streams."""

import numpy as np
import pytest

from conftest import STDLIB_TEXT, tiny_config
from lm.data import (ByteTokenizer, CharTokenizer, EvalBatches, TrainBatches, load_corpus,
                     make_data)
from lm.data.tokenizers import from_dict
from lm.errors import UserError


def test_byte_tokenizer_round_trips_any_text():
  tok = ByteTokenizer()
  text = "héllo → wörld\n\t🙂"
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and ids.max() < 256
  assert list(ids) == list(text.encode("utf-8"))
  assert tok.decode(ids) == text


def test_char_tokenizer_vocab_comes_from_training_text():
  tok = CharTokenizer.train("banana band")
  assert tok.chars == " abdn" and tok.vocab_size == 6
  np.testing.assert_array_equal(tok.encode("bad"), [2, 1, 3])
  assert tok.encode("xb🙂")[0] == tok.unk_id == tok.encode("xb🙂")[2]
  assert tok.decode(tok.encode("band nab")) == "band nab"
  restored = from_dict(tok.to_dict())
  np.testing.assert_array_equal(restored.encode("a banana"), tok.encode("a banana"))


def test_single_file_splits_by_characters_in_order(tmp_path):
  text = "".join(chr(ord("a") + i % 26) for i in range(1000))
  path = tmp_path / "corpus.txt"
  path.write_text(text)
  c = tiny_config(**{"data.path": str(path), "data.validation_fraction": 0.1,
                     "data.test_fraction": 0.05})
  corpus = load_corpus(c.data)
  assert corpus.train + corpus.validation + corpus.test == text
  assert (len(corpus.train), len(corpus.validation), len(corpus.test)) == (850, 100, 50)


def test_folder_splits_by_document_and_stays_stable(tmp_path):
  for i in range(40):
    (tmp_path / f"doc{i:02d}.txt").write_text(f"document number {i}\n")
  c = tiny_config(**{"data.path": str(tmp_path), "data.validation_fraction": 0.2,
                     "data.test_fraction": 0.2})
  first = load_corpus(c.data)
  docs = {s: set(filter(None, getattr(first, s).splitlines())) for s in ("train", "validation", "test")}
  assert set.union(*docs.values()) == {f"document number {i}" for i in range(40)}
  assert not (docs["train"] & docs["validation"]) and not (docs["train"] & docs["test"])
  assert all(len(d) > 0 for d in docs.values())
  (tmp_path / "doc99.txt").write_text("a new document\n")  # adding one moves no other
  second = load_corpus(c.data)
  for split, names in docs.items():
    assert names <= set(getattr(second, split).splitlines())
  assert first.fingerprint != second.fingerprint


@pytest.mark.parametrize("make_bad,message", [
    (lambda p: str(p / "missing.txt"), "does not exist"),
    (lambda p: (p / "bin.txt").write_bytes(b"\xff\xfe\x00bad") and str(p / "bin.txt"),
     "is not UTF-8 text"),
    (lambda p: (p / "empty").mkdir() or str(p / "empty"), "holds no text files"),
])
def test_bad_data_paths_are_named(tmp_path, make_bad, message):
  c = tiny_config(**{"data.path": make_bad(tmp_path)})
  with pytest.raises(UserError, match=f"config.data.path: .*{message}"):
    load_corpus(c.data)


def test_split_too_short_for_a_window_is_reported(tmp_path):
  path = tmp_path / "short.txt"
  path.write_text("x" * 100)
  c = tiny_config(**{"data.path": str(path), "data.seq_len": 16})
  data = make_data(c)
  with pytest.raises(UserError, match="validation split has 10 tokens"):
    data.eval_batches("validation", 4, 16)


def test_train_batches_are_a_pure_function_of_seed_and_step():
  tokens = np.arange(1000, dtype=np.int32)
  a = TrainBatches(tokens, batch_size=4, seq_len=8, seed=3)
  b = TrainBatches(tokens, batch_size=4, seq_len=8, seed=3)
  np.testing.assert_array_equal(a.batch(17)["inputs"], b.batch(17)["inputs"])
  assert not np.array_equal(a.batch(17)["inputs"], a.batch(18)["inputs"])
  assert not np.array_equal(a.batch(17)["inputs"],
                            TrainBatches(tokens, 4, 8, seed=4).batch(17)["inputs"])
  batch = a.batch(5)
  # Windows are contiguous runs of the stream and targets are inputs shifted by one.
  np.testing.assert_array_equal(np.diff(batch["inputs"], axis=1), 1)
  np.testing.assert_array_equal(batch["targets"], batch["inputs"] + 1)
  np.testing.assert_array_equal(a.batch(5, slice(2, 4))["inputs"], batch["inputs"][2:4])


def test_eval_batches_predict_every_token_exactly_once():
  tokens = np.random.default_rng(0).integers(0, 50, size=203).astype(np.int32)
  batches = EvalBatches(tokens, batch_size=3, seq_len=10, split="validation")
  predicted = []
  for batch in batches:
    for targets, weights in zip(batch["targets"], batch["weights"]):
      predicted.extend(targets[weights > 0])
  np.testing.assert_array_equal(predicted, tokens[1:])
  assert batches.num_targets == 202


def test_make_data_uses_real_text_and_both_tokenizers():
  for kind in ("byte", "char"):
    data = make_data(tiny_config(**{"data.path": STDLIB_TEXT, "data.tokenizer": kind}))
    text = open(STDLIB_TEXT, encoding="utf-8").read()
    total = sum(len(v) for v in data.splits.values())
    assert total == len(data.tokenizer.encode(text))
    assert data.tokenizer.decode(data.splits["train"][:50]) == text[:50]


def test_default_corpus_is_the_python_standard_library():
  c = tiny_config(**{"data.path": "", "data.name": "python_stdlib", "data.tokenizer": "byte"})
  data = make_data(c)
  assert all(len(v) > 100_000 for v in data.splits.values())
  assert b"def " in bytes(data.splits["train"][:200_000].astype(np.uint8))


def test_shakespeare_loads_with_nanogpt_split(shakespeare_path):
  c = tiny_config(**{"data.path": shakespeare_path, "data.validation_fraction": 0.1,
                     "data.test_fraction": 0.0})
  data = make_data(c)
  assert data.tokenizer.vocab_size == 66  # 65 characters + unk
  assert len(data.splits["train"]) == 1003854 and len(data.splits["validation"]) == 111540
  assert len(data.splits["test"]) == 0
