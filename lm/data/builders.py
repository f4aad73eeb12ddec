"""TFDS builders that write local corpora as array_record datasets, and the catalog path.

Three formats, chosen by `config.data.format`:
  * text: plain text (`data.path`: a file or a folder of files; or `data.name =
    "python_stdlib"`). A single file is split by characters, a folder by document (see
    lm/data/corpus.py). Records: {"id", "text"}.
  * parallel: aligned sentence files `<split>.<language>[.gz]` in the folder `data.path`
    (e.g. Multi30k's train.en.gz / train.de.gz), line i of one translating line i of the
    other. Records: {"source", "target"}.
  * labelled (read by lm/data/labelled_files.py): `<split>.tsv` or `<split>.csv` files with a header line, a label column and a
    text column (e.g. GLUE SST-2's train.tsv / dev.tsv), or JSON Lines (`<split>.jsonl`
    files, or one `.jsonl` file split by validation_fraction / test_fraction) whose records
    have those fields. Records: {"text", "label", "value"}: the label's class id, and its
    number for regression (NaN if it is not one).
  * tagged: CoNLL-style `<split>.conll` / `.txt` / `.iob` files: a word and its tag per line
    (first and last whitespace-separated columns), a blank line between sentences,
    -DOCSTART- lines ignored. Records: {"words", "tags"} (tab-joined); tag names in order.
  * chat: conversations in JSON Lines (`.jsonl`, a record a line) or JSON (`.json`, a list of
    records): a folder of `<split>.jsonl` files, or one file whose records are split by
    validation_fraction / test_fraction (a seeded shuffle). Any of the shapes
    lm/data/conversations.py reads. Records: {"messages"}: the turns as a JSON list of
    {"role", "content"}.
  * preference: pairs of replies to one prompt, in the same files: {prompt, chosen,
    rejected} or ShareGPT's pairs. Records: {"prompt" (turns, JSON), "chosen", "rejected"}.

For a folder of split files (lm/data/source_files.py), a name starting with train goes to
train, val/valid/dev to validation and test to test. Chat and preference files and mixtures
are read by lm/data/chat_files.py. Each built dataset is named by a hash of its sources' checksums
and of the settings that shape it, and records those checksums in its metadata: editing a
source builds a new dataset, never reads a stale one. Datasets live under
`config.data.data_dir` (default `~/.cache/lm/tfds`).

`data.name` may also name a TFDS catalog dataset (CATALOG below), downloaded and prepared
as array_record by TFDS itself on first use (needs internet once), or a corpus lm fetches
itself (lm/data/downloads.py: multi30k).
"""

import contextlib
import dataclasses
import fcntl
import importlib
import io
import json
import logging
import os
import re

from lm.data import chat_files, labelled_files
from lm.data import corpus as corpus_lib
from lm.data import downloads
from lm.data.source_files import SPLITS
from lm.data.source_files import md5 as _md5
from lm.data.source_files import read_bytes as _read_bytes
from lm.data.source_files import split_files as _split_files
from lm.errors import UserError

VERSION = "1.1.0"  # 1.1: labelled records carry "value"
# TFDS catalog datasets: name -> (format, {our field: their feature}, the TFDS module that
# registers the builder; without TensorFlow, TFDS imports some of them only on request).
CATALOG = {
    "tiny_shakespeare": ("text", {"text": "text"}, "text.tiny_shakespeare"),
    "lm1b": ("text", {"text": "text"}, "text.lm1b"),
    "wmt14_translate/de-en": ("parallel", {"source": "{source}", "target": "{target}"},
                              "translate.wmt14"),
    "glue/sst2": ("labelled", {"text": "sentence", "label": "label"}, "text.glue"),
    "imdb_reviews": ("labelled", {"text": "text", "label": "label"}, "text.imdb"),
}
_ALIASES = {"wmt14_translate": "wmt14_translate/de-en"}
LOCAL_NAMES = ("python_stdlib",)


@dataclasses.dataclass
class Prepared:
  """A dataset on disk: random-access records per split, in one of the three formats."""
  format: str
  source: str  # where it came from, for logs
  fingerprint: str  # changes whenever the records would
  sources: dict  # split -> random-access sequence of dicts with the format's fields
  label_names: tuple = ()

  def num_examples(self, split):
    return len(self.sources[split]) if split in self.sources else 0


def default_data_dir():
  return os.path.join(corpus_lib.cache_dir(), "tfds")


# ---------------------------------------------------------------------------------------
# Reading local sources into split -> [(key, example)] lists, with checksums.


def _text_examples(data_config):
  if data_config.path:
    source = os.path.abspath(data_config.path)
    documents = corpus_lib.local_documents(data_config.path)
  elif data_config.name == "python_stdlib":
    documents = corpus_lib.python_stdlib_documents()
    source = "the Python standard library"
  else:
    raise UserError(f"config.data.name: unknown local corpus {data_config.name!r}")
  checksums = {name: _md5(text.encode("utf-8")) for name, text in documents}
  parts = corpus_lib.split_documents(documents, data_config.validation_fraction,
                                     data_config.test_fraction)
  examples = {split: [(f"{split}/{name}", {"id": name, "text": text})
                      for name, text in parts[split] if text]
              for split in SPLITS}
  examples = {split: ex for split, ex in examples.items() if ex}
  return source, checksums, examples, ()


def _lines(path):
  data = _read_bytes(path)
  text = corpus_lib.decode_utf8(data, path)
  lines = text.split("\n")
  if lines and lines[-1] == "":
    lines.pop()
  return _md5(data), [line.rstrip("\r") for line in lines]


def _parallel_examples(data_config):
  src, tgt = data_config.source_language, data_config.target_language
  folder = os.path.abspath(data_config.path)
  languages = {}
  for lang in (src, tgt):
    languages[lang] = _split_files(folder, rf"(.+)\.{re.escape(lang)}(?:\.gz)?")
  checksums, examples = {}, {}
  for split in SPLITS:
    paths = [languages[lang].get(split) for lang in (src, tgt)]
    if paths == [None, None]:
      continue
    if None in paths:
      raise UserError(f"config.data.path: {split} has a {paths[0] or paths[1]} file but no "
                      f"matching .{tgt if paths[1] is None else src} file")
    (sum_s, source_lines), (sum_t, target_lines) = _lines(paths[0]), _lines(paths[1])
    checksums.update({paths[0]: sum_s, paths[1]: sum_t})
    if len(source_lines) != len(target_lines):
      raise UserError(f"config.data.path: parallel files are misaligned: {paths[0]} has "
                      f"{len(source_lines):,} lines, {paths[1]} has {len(target_lines):,}")
    for i, (s, t) in enumerate(zip(source_lines, target_lines)):
      if not s.strip() or not t.strip():
        raise UserError(f"config.data.path: {paths[0] if not s.strip() else paths[1]} line "
                        f"{i + 1} is empty but its translation is not; the files are "
                        "probably misaligned")
    examples[split] = [(f"{split}/{i}", {"source": s, "target": t})
                       for i, (s, t) in enumerate(zip(source_lines, target_lines))]
  return folder, checksums, examples, ()


def _tagged_examples(data_config):
  folder = os.path.abspath(data_config.path)
  files = _split_files(folder, r"(.+)\.(?:conll|txt|iob|bio)")
  checksums, sentences = {}, {}
  for split, path in files.items():
    checksums[path], lines = _lines(path)
    sentences[split], words, tags = [], [], []
    for number, line in enumerate(lines + [""], start=1):
      fields = line.split()
      if fields and fields[0] == "-DOCSTART-":
        continue
      if not fields:
        if words:
          sentences[split].append((number, words, tags))
        words, tags = [], []
        continue
      if len(fields) < 2:
        raise UserError(f"config.data.path: {path} line {number} has a word but no tag "
                        f"({line!r}); tagged files need 'word ... tag' lines")
      words.append(fields[0])
      tags.append(fields[-1])
    if not sentences[split]:
      raise UserError(f"config.data.path: {path} holds no tagged sentences")
  names = tuple(sorted({t for _, _, tags in sentences["train"] for t in tags}))
  for split, items in sentences.items():
    for number, _, tags in items:
      unknown = sorted(set(tags) - set(names))
      if unknown:
        raise UserError(f"config.data.path: {files[split]}: the sentence ending at line "
                        f"{number} has tag {unknown[0]!r}, which the training file lacks")
  examples = {split: [(f"{split}/{number}", {"words": "\t".join(words),
                                             "tags": "\t".join(tags)})
                      for number, words, tags in items] for split, items in sentences.items()}
  return folder, checksums, examples, names


_READERS = {"text": _text_examples, "parallel": _parallel_examples,
            "labelled": labelled_files.labelled_examples, "tagged": _tagged_examples,
            "chat": chat_files.chat_examples, "preference": chat_files.preference_examples}


# ---------------------------------------------------------------------------------------
# TFDS builders.


def _builder_classes():
  """Defined on first use, so importing lm.data does not import tensorflow_datasets."""
  if _builder_classes.cache:
    return _builder_classes.cache
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  class _Local(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes the examples it is given; the subclass says their features."""
    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = {str(VERSION): "First version."}
    FEATURES = {}

    def __init__(self, *, name, examples, checksums, source, label_names, **kwargs):
      self._examples, self._checksums = examples, checksums
      self._source, self._label_names = source, label_names
      super().__init__(config=tfds.core.BuilderConfig(
          name=name, version=VERSION, release_notes=self.RELEASE_NOTES,
          description=f"{source}, by source checksum"), **kwargs)

    def _info(self):
      types = {"text": tfds.features.Text(), "int": np.int64, "float": np.float32}
      features = {k: types[v] for k, v in self.FEATURES.items()}
      return tfds.core.DatasetInfo(
          builder=self, features=tfds.features.FeaturesDict(features),
          metadata=tfds.core.MetadataDict(source=self._source, checksums=self._checksums,
                                          label_names=list(self._label_names)))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(split) for split in self._examples}

    def _generate_examples(self, split):
      yield from self._examples[split]

  class LmText(_Local):
    FEATURES = {"id": "text", "text": "text"}

  class LmParallel(_Local):
    FEATURES = {"source": "text", "target": "text"}

  class LmLabelled(_Local):
    FEATURES = {"text": "text", "label": "int", "value": "float"}

  class LmTagged(_Local):
    FEATURES = {"words": "text", "tags": "text"}

  class LmChat(_Local):
    FEATURES = {"messages": "text"}

  class LmMixture(_Local):
    FEATURES = {"messages": "text", "source": "int"}

  class LmPreference(_Local):
    FEATURES = {"prompt": "text", "chosen": "text", "rejected": "text"}

  _builder_classes.cache = {"text": LmText, "parallel": LmParallel, "labelled": LmLabelled,
                            "tagged": LmTagged, "chat": LmChat,
                            "preference": LmPreference, "mixture": LmMixture}
  return _builder_classes.cache


_builder_classes.cache = None


@contextlib.contextmanager
def _lock(data_dir, name):
  """Serialises preparation of one dataset across processes on this machine."""
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, f".{name.replace('/', '_')}.lock"), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _quiet():
  """TFDS narrates every build on stdout and absl's log; lm logs its own one line."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  tfds.disable_progress_bar()
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    absl_logger.setLevel(level)


def _settings_key(data_config):
  keys = {"text": ("validation_fraction", "test_fraction"),
          "parallel": ("source_language", "target_language"),
          "labelled": ("label_column", "text_column"), "tagged": (),
          "chat": ("validation_fraction", "test_fraction"),
          "preference": ("validation_fraction", "test_fraction")}[data_config.format]
  if data_config.format == "labelled" and os.path.isfile(data_config.path):
    keys += ("validation_fraction", "test_fraction")  # one JSON Lines file, split by them
  return {k: data_config[k] for k in keys}


def prepare(data_config):
  """Builds (once) and opens the dataset config.data names. Returns a Prepared."""
  data_dir = data_config.data_dir or default_data_dir()
  name = _ALIASES.get(data_config.name, data_config.name)
  if not data_config.path and name in downloads.DOWNLOADS:
    spec = downloads.DOWNLOADS[name]
    if data_config.format != spec.format:
      raise UserError(f"config.data.format: {name} is a {spec.format} dataset, not "
                      f"{data_config.format}")
    data_config = data_config.copy_and_resolve_references()
    data_config.path = downloads.fetch(name, data_dir)
  elif not data_config.path and name not in LOCAL_NAMES and not data_config.get("mixture"):
    return _prepare_catalog(name, data_config, data_dir)
  fmt = data_config.format
  if fmt not in _READERS:
    raise UserError(f"config.data.format: {fmt!r} is not one of {', '.join(_READERS)}")
  mixed = bool(data_config.get("mixture"))
  source, checksums, examples, label_names = (chat_files.mixture_examples if mixed else
                                              _READERS[fmt])(data_config)
  if not examples.get("train"):
    raise UserError(f"config.data: the train split of {source} is empty")
  settings = _settings_key(data_config)
  if mixed:  # what shapes the records: each source's reader and templates
    settings["mixture"] = [{k: v for k, v in e.items() if k not in ("path", "weight")}
                           for e in data_config.mixture]
  key = json.dumps({"version": VERSION, "format": fmt, "checksums": checksums,
                    "settings": settings}, sort_keys=True)
  fingerprint = _md5(key.encode("utf-8"))[:16]
  cls = _builder_classes()["mixture" if mixed else fmt]
  with _lock(data_dir, f"{fmt}-{fingerprint}"), _quiet():
    builder = cls(name=f"h{fingerprint}", examples=examples, checksums=checksums,
                  source=source, label_names=label_names, data_dir=data_dir,
                  file_format="array_record")
    builder.download_and_prepare()
  sources = {split: _Records(builder.as_data_source(split=split), None)
             for split in examples}
  return Prepared(format=fmt, source=source, fingerprint=f"{fmt}-{fingerprint}",
                  sources=sources, label_names=tuple(label_names))


def _prepare_catalog(name, data_config, data_dir):
  if name not in CATALOG:
    raise UserError(f"config.data.name: {name!r} is neither a local corpus "
                    f"({', '.join(LOCAL_NAMES)}), a download "
                    f"({', '.join(downloads.DOWNLOADS)}) nor a supported TFDS dataset "
                    f"({', '.join(CATALOG)}); or set config.data.path")
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  fmt, fields, module = CATALOG[name]
  importlib.import_module(f"tensorflow_datasets.{module}")
  fields = {k: v.format(source=data_config.source_language, target=data_config.target_language)
            for k, v in fields.items()}
  try:
    with _lock(data_dir, name), _quiet():
      builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
      builder.download_and_prepare()
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"config.data.name: cannot prepare TFDS dataset {name!r} in {data_dir} "
                    f"({type(e).__name__}: {e}); it downloads once and needs internet for "
                    "that; offline, point config.data.path at local files") from None
  sources = {}
  for split in SPLITS:
    try:
      sources[split] = _Records(builder.as_data_source(split=split), fields)
    except (ValueError, KeyError):  # the dataset has no such split
      continue
  if "train" not in sources or "validation" not in sources:
    raise UserError(f"config.data.name: TFDS dataset {name!r} lacks a train or validation "
                    "split")
  if fmt == "labelled" and "test" in sources:  # GLUE hides its test labels (-1)
    first = sources["test"][0] if len(sources["test"]) else {"label": 0}
    if first["label"] < 0:
      del sources["test"]
  label_names = ()
  if fmt == "labelled":
    label_names = tuple(builder.info.features[fields["label"]].names)
  return Prepared(format=fmt, source=f"tfds:{name}",
                  fingerprint=f"tfds-{name}-{builder.info.version}", sources=sources,
                  label_names=label_names)


class _Records:
  """Random access over a TFDS data source, as dicts of str / int with lm's field names."""

  def __init__(self, source, fields):
    self._source, self._fields = source, fields

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    record = self._source[index]
    if self._fields is not None:
      record = {ours: record[theirs] for ours, theirs in self._fields.items()}
    return {k: v.decode("utf-8") if isinstance(v, bytes) else
            (int(v) if k == "label" else v) for k, v in record.items()}
