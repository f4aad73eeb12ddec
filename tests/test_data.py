"""Datasets (TFDS builders), tokenizers, and the Grain pipelines: packing, order, sharding."""

import gzip
import json

import jax
import numpy as np
import pytest

from conftest import STDLIB_TEXT, tiny_config
from lm.data import ByteTokenizer, CharTokenizer, SentencePieceTokenizer, make_data, prepare
from lm import tasks
from lm.data import pipeline
from lm.data.examples import classification_example, seq2seq_example
from lm.data.tokenizers import from_dict, train_tokenizer
from lm.errors import UserError
from lm.models.transformer import Decoder, ModelConfig


def stdlib_text():
  with open(STDLIB_TEXT, encoding="utf-8") as f:
    return f.read()


def folder_corpus(tmp_path, n=12):
  """A folder of short documents of different lengths."""
  folder = tmp_path / "docs"
  folder.mkdir()
  for i in range(n):
    (folder / f"doc{i:02d}.txt").write_text(f"document {i}: " + "abcdefgh"[:1 + i % 8] * (i + 1))
  return folder


# Tokenizers.


def test_byte_and_char_tokenizers_round_trip_with_distinct_specials():
  text = "héllo → wörld\n\t🙂"
  byte = ByteTokenizer()
  assert list(byte.encode(text)) == list(text.encode("utf-8"))
  assert byte.decode(byte.encode(text)) == text
  char = CharTokenizer.train(["banana band"])
  assert char.chars == " abdn"
  np.testing.assert_array_equal(char.encode("bad"), [2, 1, 3])
  assert char.encode("xb")[0] == char.unk_id
  for tok in (byte, char):
    specials = [tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.mask_id]
    assert len(set(specials)) == 5 and max(specials) == tok.vocab_size - 1
    # Specials are dropped when decoding.
    ids = np.concatenate([[tok.bos_id], tok.encode("band"), [tok.eos_id, tok.pad_id]])
    assert tok.decode(ids) == "band"
  restored = from_dict(char.to_dict())
  np.testing.assert_array_equal(restored.encode("a banana"), char.encode("a banana"))


@pytest.mark.parametrize("kind", ["unigram", "bpe"])
def test_sentencepiece_trains_on_text_and_round_trips_code_and_unicode(kind):
  c = tiny_config(**{"data.tokenizer": kind, "data.vocab_size": 600})
  text = stdlib_text()
  tok = train_tokenizer(c.data, [text[:len(text) // 2]])
  assert tok.kind == kind and tok.vocab_size == 600
  for sample in (text[len(text) // 2:][:5000], "  if x:\n\treturn 'é🙂'\n\n"):
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample  # whitespace, tabs, newlines and bytes survive
  assert len(tok.encode(text[:5000])) < 0.6 * 5000  # it learned pieces longer than a char
  assert tok.mask_id == 4 and (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
  restored = from_dict(tok.to_dict())  # what a checkpoint stores
  np.testing.assert_array_equal(restored.encode(text[:3000]), tok.encode(text[:3000]))


def test_sentencepiece_vocab_too_small_is_a_clear_error():
  c = tiny_config(**{"data.tokenizer": "bpe", "data.vocab_size": 100})
  with pytest.raises(UserError, match=r"config\.data\.vocab_size: 100 does not fit"):
    train_tokenizer(c.data, [stdlib_text()[:20000]])


# Builders.


def test_single_file_splits_by_characters_in_order(tmp_path):
  text = "".join(chr(ord("a") + i % 26) for i in range(1000))
  path = tmp_path / "corpus.txt"
  path.write_text(text)
  c = tiny_config(**{"data.path": str(path), "data.validation_fraction": 0.1,
                     "data.test_fraction": 0.05})
  prepared = prepare(c.data)
  parts = {s: [prepared.sources[s][i]["text"] for i in range(len(prepared.sources[s]))]
           for s in ("train", "validation", "test")}
  assert parts == {"train": [text[:850]], "validation": [text[850:950]], "test": [text[950:]]}


def test_folder_splits_by_document_stably_and_rebuilds_when_a_source_changes(tmp_path):
  for i in range(40):
    (tmp_path / f"doc{i:02d}.txt").write_text(f"document number {i}\n")
  c = tiny_config(**{"data.path": str(tmp_path), "data.validation_fraction": 0.2,
                     "data.test_fraction": 0.2})

  def texts(prepared):
    return {s: {r["text"] for r in (src[i] for i in range(len(src)))}
            for s, src in prepared.sources.items()}

  first = prepare(c.data)
  docs = texts(first)
  assert set.union(*docs.values()) == {f"document number {i}\n" for i in range(40)}
  assert not (docs["train"] & docs["validation"]) and not (docs["train"] & docs["test"])
  assert all(docs.values())
  (tmp_path / "doc07.txt").write_text("an edited document\n")
  second = prepare(c.data)
  assert second.fingerprint != first.fingerprint
  assert "an edited document\n" in set.union(*texts(second).values())
  assert prepare(c.data).fingerprint == second.fingerprint  # unchanged source: same dataset


def test_parallel_builder_reads_aligned_gzip_files(tmp_path):
  for split, n in (("train", 5), ("val", 2), ("test_2016", 2)):
    with gzip.open(tmp_path / f"{split}.en.gz", "wt", encoding="utf-8") as f:
      f.write("".join(f"{split} sentence {i}\n" for i in range(n)))
    with gzip.open(tmp_path / f"{split}.de.gz", "wt", encoding="utf-8") as f:
      f.write("".join(f"{split} Satz {i}\n" for i in range(n)))
  c = tiny_config(**{"data.path": str(tmp_path), "data.format": "parallel"})
  prepared = prepare(c.data)
  assert prepared.format == "parallel"
  assert [prepared.num_examples(s) for s in ("train", "validation", "test")] == [5, 2, 2]
  pairs = {(r["source"], r["target"]) for r in (prepared.sources["validation"][i]
                                                for i in range(2))}
  assert pairs == {("val sentence 0", "val Satz 0"), ("val sentence 1", "val Satz 1")}


def test_labelled_builder_reads_tsv_with_header(tmp_path):
  (tmp_path / "train.tsv").write_text("label\tsentence\n1\tgood film\n0\tbad film\n1\tfine\n")
  (tmp_path / "dev.tsv").write_text("label\tsentence\n0\tdull\n")
  c = tiny_config(**{"data.path": str(tmp_path), "data.format": "labelled"})
  prepared = prepare(c.data)
  rows = sorted((r["text"], r["label"]) for r in (prepared.sources["train"][i]
                                                   for i in range(3)))
  assert rows == [("bad film", 0), ("fine", 1), ("good film", 1)]
  assert prepared.sources["validation"][0] == {"text": "dull", "label": 0, "value": 0.0}
  assert prepared.label_names == ("0", "1")


def test_labelled_builder_reads_one_json_lines_file_split_by_fraction(tmp_path):
  records = [{"id": i, "label": "pos" if i % 3 else "neg", "text": f"review {i}"}
             for i in range(20)]
  path = tmp_path / "reviews.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
  c = tiny_config(**{"data.path": str(path), "data.format": "labelled",
                     "data.validation_fraction": 0.25, "data.test_fraction": 0.0})
  prepared = prepare(c.data)
  assert prepared.label_names == ("neg", "pos")
  got = {s: [prepared.sources[s][i] for i in range(prepared.num_examples(s))]
         for s in ("train", "validation")}
  assert [len(got["train"]), len(got["validation"])] == [15, 5]
  by_text = {r["text"]: r for r in records}
  for split in got.values():  # every record once, with its own label
    for row in split:
      assert ("neg", "pos")[row["label"]] == by_text[row["text"]]["label"]
  assert (sorted(r["text"] for part in got.values() for r in part)
          == sorted(by_text))
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"label": "pos", "text": "a"}\n{"text": "b"}\n', encoding="utf-8")
  with pytest.raises(UserError, match=r"label_column: .*bad\.jsonl line 2 has no field 'label'"):
    prepare(tiny_config(**{"data.path": str(bad), "data.format": "labelled"}).data)


@pytest.mark.parametrize("case,message", [
    ("missing", r"config\.data\.path: .*nowhere does not exist"),
    ("empty", r"config\.data\.path: .*empty\.txt is empty"),
    ("not_utf8", r"config\.data\.path: .*latin1\.txt line 2 is not UTF-8"),
    ("misaligned", r"misaligned: .*train\.en has 3 lines, .*train\.de has 2"),
    ("bad_label_column", r"config\.data\.label_column: .*dev\.tsv has no column 'label' "
                         r"\(its header: polarity, sentence\)"),
    ("bad_row", r"config\.data\.path: .*train\.tsv line 3 has 1 fields"),
    ("unknown_name", r"config\.data\.name: 'no_such_set' is neither"),
])
def test_bad_data_names_the_file_and_line(tmp_path, case, message):
  overrides = {}
  if case == "missing":
    overrides["data.path"] = str(tmp_path / "nowhere")
  elif case == "empty":
    (tmp_path / "empty.txt").write_text("  \n")
    overrides["data.path"] = str(tmp_path / "empty.txt")
  elif case == "not_utf8":
    (tmp_path / "latin1.txt").write_bytes("first line\nsecond caf\xe9\n".encode("latin-1"))
    overrides["data.path"] = str(tmp_path / "latin1.txt")
  elif case == "misaligned":
    (tmp_path / "train.en").write_text("a\nb\nc\n")
    (tmp_path / "train.de").write_text("a\nb\n")
    (tmp_path / "val.en").write_text("a\n")
    (tmp_path / "val.de").write_text("a\n")
    overrides.update({"data.path": str(tmp_path), "data.format": "parallel"})
  elif case in ("bad_label_column", "bad_row"):
    header = "polarity" if case == "bad_label_column" else "label"
    (tmp_path / "train.tsv").write_text(f"{header}\tsentence\n1\tgood\njust text\n")
    (tmp_path / "dev.tsv").write_text(f"{header}\tsentence\n1\tgood\n")
    overrides.update({"data.path": str(tmp_path), "data.format": "labelled"})
  else:
    overrides.update({"data.path": "", "data.name": "no_such_set"})
  with pytest.raises(UserError, match=message):
    prepare(tiny_config(**overrides).data)


# Pipelines.


def stream_of(docs, tokenizer):
  """A TokenStream built by hand: bos + tokens per document (an independent construction)."""
  ids, starts = [], []
  for d in docs:
    starts.append(len(ids))
    ids += [tokenizer.bos_id] + list(tokenizer.encode(d))
  return pipeline.TokenStream(np.array(ids, np.int32), np.array(starts, np.int64))


def test_token_stream_is_bos_plus_each_document(tmp_path):
  c = tiny_config(**{"data.path": str(folder_corpus(tmp_path)), "data.tokenizer": "byte",
                     "data.validation_fraction": 0.0, "data.test_fraction": 0.0})
  data = make_data(c)
  records = data.prepared.sources["train"]
  expected = stream_of([records[i]["text"] for i in range(len(records))], data.tokenizer)
  np.testing.assert_array_equal(data.streams["train"].tokens, expected.tokens)
  np.testing.assert_array_equal(data.streams["train"].doc_starts, expected.doc_starts)


def test_packed_windows_never_attend_across_documents():
  tok = ByteTokenizer()
  docs = ["first document", "2nd", "and a third, longer one"]
  stream = stream_of(docs, tok)
  batch = pipeline.windows(stream, [5], 32, tok.pad_id)  # starts inside the first document
  ex = {k: v[0] for k, v in batch.items()}
  # Segments and positions restart at every bos.
  bos = np.flatnonzero(ex["inputs"] == tok.bos_id)
  assert list(np.flatnonzero(np.diff(ex["segment_ids"]) > 0) + 1) == list(bos)
  assert all(ex["positions"][b] == 0 for b in bos)
  # Through the model: the logits of the second document's tokens are those of the second
  # document alone, and do not change when the other documents' tokens do.
  cfg = ModelConfig.from_config(tiny_config(**{"model.positions": "rope"}).model,
                                tok.vocab_size, "cpu")
  model = Decoder(cfg)
  params = model.init(jax.random.key(0), ex["inputs"][None])
  apply = lambda inputs, seg, pos: np.asarray(model.apply(params, inputs[None], pos[None],
                                                          seg[None]))[0]
  packed = apply(ex["inputs"], ex["segment_ids"], ex["positions"])
  second = slice(bos[0], bos[1])
  alone_ids = ex["inputs"][second]
  alone = apply(alone_ids, np.ones_like(alone_ids), np.arange(len(alone_ids)))
  np.testing.assert_allclose(packed[second], alone, atol=1e-5)
  scrambled = ex["inputs"].copy()
  scrambled[:bos[0]] = tok.encode("x" * bos[0])
  scrambled[bos[1] + 1:] = tok.mask_id
  np.testing.assert_allclose(apply(scrambled, ex["segment_ids"], ex["positions"])[second],
                             packed[second], atol=1e-5)


def test_an_epoch_scores_every_token_once_and_seeds_fix_the_order():
  tok = ByteTokenizer()
  stream = stream_of(["x" * 50, "y" * 77, "z" * 30], tok)
  windows = pipeline.StreamWindows(stream, 8, seed=3, pad_id=tok.pad_id)
  n = windows.per_epoch
  for epoch in range(2):
    starts = sorted(windows.offset(epoch) + windows._order[epoch * n + j] * 8
                    for j in range(n))
    assert starts == [windows.offset(epoch) + 8 * j for j in range(n)]  # a permutation
  a = pipeline.train_batches(windows.batch, 4)
  b = pipeline.train_batches(pipeline.StreamWindows(stream, 8, 3, tok.pad_id).batch, 4)
  c = pipeline.train_batches(pipeline.StreamWindows(stream, 8, 4, tok.pad_id).batch, 4)
  for k in (0, 5, 17):
    np.testing.assert_array_equal(a[k]["inputs"], b[k]["inputs"])
  assert any(not np.array_equal(a[k]["inputs"], c[k]["inputs"]) for k in range(4))
  # Targets are the inputs shifted by one, taken from the stream.
  ex = windows.batch([0])
  start = windows.offset(0) + windows._order[0] * 8
  np.testing.assert_array_equal(ex["inputs"][0], stream.tokens[start:start + 8])
  np.testing.assert_array_equal(ex["targets"][0], stream.tokens[start + 1:start + 9])


def test_two_hosts_split_every_global_batch_and_cover_the_epoch_once():
  tok = ByteTokenizer()
  rng = np.random.default_rng(0)  # random letters: no two windows are alike
  stream = stream_of(["".join(rng.choice(list("abcdefghij"), n)) for n in (400, 300)], tok)
  windows = pipeline.StreamWindows(stream, 8, seed=0, pad_id=tok.pad_id)
  one = pipeline.train_batches(windows.batch, 6)
  hosts = [pipeline.train_batches(windows.batch, 6, p, 2) for p in (0, 1)]
  num_batches = windows.per_epoch // 6
  seen = []
  for k in range(num_batches):
    parts = [h[k] for h in hosts]
    assert parts[0]["inputs"].shape == (3, 8)
    np.testing.assert_array_equal(np.concatenate([p["inputs"] for p in parts]),
                                  one[k]["inputs"])
    seen += [tuple(r) for p in parts for r in p["inputs"]]
  # Within the epoch, no window is seen twice, by the same host or the other.
  assert len(set(seen)) == len(seen) == num_batches * 6


def test_resuming_the_iterator_mid_epoch_gives_the_same_batches(tmp_path):
  data = make_data(tiny_config(**{"data.path": str(folder_corpus(tmp_path, 30)),
                                  "data.validation_fraction": 0.0,
                                  "data.test_fraction": 0.0}))
  batches = data.train_batches(4, 8, seed=1)
  epoch = pipeline.StreamWindows(data.streams["train"], 8, 1, 0).per_epoch // 4
  uninterrupted = data.iterator(batches)
  expected = [next(uninterrupted) for _ in range(epoch + 3)]
  first = data.iterator(batches)
  for _ in range(epoch - 2):  # stop two batches before the epoch ends
    next(first)
  state = first.get_state()
  resumed = data.iterator(data.train_batches(4, 8, seed=1), state=state)
  for want in expected[epoch - 2:]:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_eval_batches_score_every_target_once_with_padding_masked(tmp_path):
  data = make_data(tiny_config(**{"data.path": str(folder_corpus(tmp_path)),
                                  "data.tokenizer": "byte"}))
  batches = data.eval_batches("validation", 8, 16)
  stream = data.streams["validation"].tokens
  targets = np.concatenate([b["targets"][b["weights"] > 0] for b in batches])
  np.testing.assert_array_equal(targets, stream[1:])
  last = batches[len(batches) - 1]
  assert (last["segment_ids"][last["weights"] == 0] == 0).all()


def test_one_document_batches_leave_out_segments_and_positions_and_lose_nothing():
  """A single-file corpus is one document: its causal batches carry no segment ids or
  positions (the model's defaults), and the loss is what the full arrays give."""
  config = tiny_config()
  data = make_data(config)
  assert len(data.streams["validation"].doc_starts) == 1
  train = data.train_batches(8, 16, seed=0)[3]
  evals = data.eval_batches("validation", 8, 16)
  assert set(train) == set(evals[0]) == {"inputs", "targets", "weights"}
  cfg = ModelConfig.from_config(config.model, data.tokenizer.vocab_size, "cpu")
  model = Decoder(cfg)
  params = model.init(jax.random.key(0), train["inputs"][:1])

  def loss(batch, full):
    logits = model.apply(params, batch["inputs"], full.get("positions"),
                         full.get("segment_ids"))
    nll = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)),
                              batch["targets"][..., None], -1)[..., 0]
    return (nll * batch["weights"]).sum() / batch["weights"].sum()

  stream = data.streams["validation"]
  last = len(evals) - 1  # the padded tail
  full = pipeline.windows(stream, (last * 8 + np.arange(8)) * 16, 16, data.tokenizer.pad_id)
  assert (full["weights"] == 0).any() and (full["segment_ids"] == 0).any()
  np.testing.assert_array_equal(evals[last]["weights"], full["weights"])
  np.testing.assert_allclose(loss(evals[last], {}), loss(evals[last], full), rtol=1e-6)


def test_mlm_masking_statistics_and_determinism(tmp_path):
  data = make_data(tiny_config(**{"data.tokenizer": "byte"}))
  tok = data.tokenizer
  batches = data.train_batches(16, 64, seed=5, batching=tasks.get("mlm").batching)
  again = data.train_batches(16, 64, seed=5, batching=tasks.get("mlm").batching)
  plain = data.train_batches(16, 64, seed=5)
  chosen = masked = randomised = kept = total = 0
  for k in range(40):
    b, p = batches[k], plain[k]
    np.testing.assert_array_equal(b["inputs"], again[k]["inputs"])
    np.testing.assert_array_equal(b["targets"], p["inputs"])  # targets: the original tokens
    sel = b["weights"] > 0
    assert not np.isin(p["inputs"][sel], [tok.bos_id, tok.pad_id]).any()
    assert (b["inputs"][~sel] == p["inputs"][~sel]).all()  # loss only where it changed
    chosen += sel.sum()
    total += (p["inputs"] != tok.bos_id).sum()
    masked += (b["inputs"][sel] == tok.mask_id).sum()
    kept += (b["inputs"][sel] == p["inputs"][sel]).sum()
    randomised += ((b["inputs"][sel] != tok.mask_id) & (b["inputs"][sel] != p["inputs"][sel])).sum()
  assert chosen / total == pytest.approx(0.15, abs=0.01)
  assert masked / chosen == pytest.approx(0.8, abs=0.02)
  assert (randomised + kept) / chosen == pytest.approx(0.2, abs=0.02)
  assert kept / chosen == pytest.approx(0.1, abs=0.02)  # (random may hit the same byte: ~0)


def test_classification_and_seq2seq_rows():
  tok = CharTokenizer.train(["abcdefgh "])
  row = classification_example({"text": "abc", "label": 1}, tok, 6)
  np.testing.assert_array_equal(row["inputs"], [tok.bos_id, *tok.encode("abc"), tok.pad_id,
                                                tok.pad_id])
  np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 1, 0, 0])
  assert row["label"] == 1
  assert classification_example({"text": "abcdefgh", "label": 0}, tok, 4)["length"] == 4
  pair = seq2seq_example({"source": "abc", "target": "de"}, tok, 5, 4)
  abc, de = list(tok.encode("abc")), list(tok.encode("de"))
  np.testing.assert_array_equal(pair["source"], [*abc, tok.eos_id, tok.pad_id])
  np.testing.assert_array_equal(pair["inputs"], [tok.bos_id, *de, tok.pad_id])
  np.testing.assert_array_equal(pair["targets"], [*de, tok.eos_id, tok.pad_id])
  np.testing.assert_array_equal(pair["weights"], [1, 1, 1, 0])


def test_labelled_and_parallel_batches_cover_each_split(tmp_path):
  (tmp_path / "train.tsv").write_text("label\ttext\n" + "".join(f"{i % 2}\tt{i}\n"
                                                                for i in range(10)))
  (tmp_path / "dev.tsv").write_text("label\ttext\n1\ttt0\n0\ttt1\n1\ttt2\n")
  data = make_data(tiny_config(**{"data.path": str(tmp_path), "data.format": "labelled"}))
  train = data.train_batches(5, 8, seed=0)
  epoch = np.concatenate([train[0]["inputs"], train[1]["inputs"]])
  assert len({tuple(r) for r in epoch}) == 10  # each example once per epoch
  dev = data.eval_batches("validation", 2, 8)
  assert len(dev) == 2
  assert list(np.concatenate([b["example_weight"] for b in dev])) == [1, 1, 1, 0]
  pairs = {(data.tokenizer.decode(row), int(label)) for b in dev
           for row, label, w in zip(b["inputs"], b["label"], b["example_weight"]) if w}
  assert pairs == {("tt0", 1), ("tt1", 0), ("tt2", 1)}


def test_make_data_restores_the_checkpointed_tokenizer(tmp_path):
  c = tiny_config(**{"data.tokenizer": "unigram", "data.vocab_size": 400})
  first = make_data(c)
  again = make_data(c, tokenizer_spec=first.tokenizer.to_dict())
  assert isinstance(again.tokenizer, SentencePieceTokenizer)
  assert again.tokenizer.model_proto == first.tokenizer.model_proto
  np.testing.assert_array_equal(again.streams["train"].tokens, first.streams["train"].tokens)


@pytest.mark.parametrize("name,fmt", [("tiny_shakespeare", "text"), ("glue/sst2", "labelled"),
                                      ("wmt14_translate", "parallel"), ("lm1b", "text"),
                                      ("imdb_reviews", "labelled")])
def test_catalog_datasets_by_name_through_tfds(tmp_path, name, fmt):
  """The catalog path end to end on TFDS's generated stand-in records (no download)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  c = tiny_config(**{"data.path": "", "data.name": name, "data.data_dir": str(tmp_path),
                     "data.tokenizer": "byte"})
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    data = make_data(c)
    assert data.format == fmt and data.source.startswith(f"tfds:{name}")
    record = data.prepared.sources["validation"][0]
    if fmt == "text":
      assert isinstance(record["text"], str) and data.size("train") > 6
      batch = data.train_batches(2, 4, seed=0)[0]
      assert batch["inputs"].shape == (2, 4)
    elif fmt == "labelled":
      assert isinstance(record["text"], str) and record["label"] in (0, 1)
      assert len(data.prepared.label_names) == 2
      assert data.train_batches(2, 16, seed=0)[0]["label"].shape == (2,)
    else:
      assert set(record) == {"source", "target"}  # en -> de by default
      assert data.train_batches(2, 16, seed=0)[0]["source"].shape == (2, 16)


def test_a_run_without_validation_text_stops_with_one_line(tmp_path, one_device):
  from lm import loop  # pylint: disable=import-outside-toplevel
  folder = tmp_path / "docs"
  folder.mkdir()
  for name in ("a.txt", "b.txt"):  # neither hashes below 1e-6
    (folder / name).write_text("some text " * 50)
  config = tiny_config(**{"data.path": str(folder), "data.validation_fraction": 1e-6,
                          "data.test_fraction": 0.0})
  with pytest.raises(UserError, match=r"config\.data\.validation_fraction: no text"):
    loop.run(config, str(tmp_path / "run"), devices=one_device)
  assert not (tmp_path / "run").exists()


def test_example_batches_are_cut_to_their_length_bucket(tmp_path):
  rows = ["a", "a b c d e f g h i j", "b"]
  (tmp_path / "train.tsv").write_text("label\ttext\n" + "".join(f"{i % 2}\t{t}\n"
                                                                for i, t in enumerate(rows)))
  (tmp_path / "dev.tsv").write_text("label\ttext\n1\tab\n0\ta\n")
  config = tiny_config(**{"data.path": str(tmp_path), "data.format": "labelled",
                          "data.seq_len": 32, "data.length_bucket": 8})
  data = make_data(config)
  dev = data.eval_batches("validation", 2, 32)[0]
  assert dev["inputs"].shape == (2, 8)  # bos + "ab" = 3 tokens -> one bucket of 8
  assert dev["label"].shape == (2,)
  full = data.eval_batches("validation", 2, 32)
  config.data.length_bucket = 0
  uncut = make_data(config).eval_batches("validation", 2, 32)[0]
  assert uncut["inputs"].shape == (2, 32)
  np.testing.assert_array_equal(uncut["inputs"][:, :8], full[0]["inputs"])
  assert not uncut["segment_ids"][:, 8:].any()  # what was cut is padding
  train = data.train_batches(3, 32, seed=0)[0]  # the 19-character row: bos + 19 -> 24
  assert train["inputs"].shape == (3, 24)


def test_parallel_batches_cut_source_and_target_each_to_its_bucket(tmp_path):
  for split in ("train", "val"):
    (tmp_path / f"{split}.en").write_text("ab\nc\n")
    (tmp_path / f"{split}.de").write_text("a much longer target\nd\n")
  config = tiny_config(**{"data.path": str(tmp_path), "data.format": "parallel",
                          "data.seq_len": 32, "data.length_bucket": 8})
  batch = make_data(config).eval_batches("validation", 2, 32, batching=tasks.get("seq2seq").batching)[0]
  assert batch["source"].shape == batch["source_segment_ids"].shape == (2, 8)  # "ab" + eos
  assert batch["inputs"].shape == batch["targets"].shape == batch["weights"].shape == (2, 24)
  assert batch["segment_ids"].shape == (2, 24)  # bos + 20 characters -> 24
