"""Tokenizers behind one interface: byte, character and SentencePiece (unigram or BPE)
trained by lm, and the tokenizers of imported Hugging Face checkpoints (a `tokenizers`
tokenizer.json, or a SentencePiece .model with the checkpoint's own special ids).

Every tokenizer has `encode(text) -> int32 array`, `decode(ids) -> str` (special ids are
dropped), `prompt_ids(text)` (a prompt's ids as the model saw text in training: lm's own
tokenizers put bos first, as lm's data does; a checkpoint's tokenizer adds bos only where it
adds one itself), `vocab_size`, and the special ids `pad_id`, `bos_id`, `eos_id`, `unk_id`,
`mask_id`. A tokenizer serialises to a JSON-able dict (`to_dict`; a SentencePiece model
travels as its serialized proto), stored in every checkpoint, so a restored run decodes with
exactly the vocabulary it was trained with (`from_dict`).
"""

import base64
import hashlib
import io
import json

import numpy as np

from lm.chat_template import CHATML
from lm.errors import UserError

SPECIALS = ("pad", "bos", "eos", "unk", "mask")


class _LmChat:
  """Chat for the tokenizers lm trains: CHATML's markers are plain text to them, and a
  rendered conversation is a document (bos first)."""

  chat_template = CHATML
  chat_stop_text = "<|im_end|>"  # a reply ends at this text (lm.chat)
  texts_start_with_bos = True  # every text lm trains on starts with bos (prompt_ids)

  def chat_ids(self, rendered):
    return self.prompt_ids(rendered)

  def special_tokens(self):
    return {f"{name}_token": "" for name in SPECIALS}


class _AppendedSpecials(_LmChat):
  """Specials take the `len(SPECIALS)` ids after the `base` ordinary ones."""

  def prompt_ids(self, text):
    """bos, then the text: lm's data starts every document with bos."""
    return [self.bos_id, *self.encode(text).tolist()]

  def _set_specials(self, base):
    for i, name in enumerate(SPECIALS):
      setattr(self, f"{name}_id", base + i)
    self.vocab_size = base + len(SPECIALS)


class ByteTokenizer(_AppendedSpecials):
  """UTF-8 bytes are ids 0..255; the specials follow. Nothing to train; any text round-trips."""

  kind = "byte"

  def __init__(self):
    self._set_specials(256)

  def encode(self, text):
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def decode(self, ids):
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

  def to_dict(self):
    return {"kind": self.kind}


class CharTokenizer(_AppendedSpecials):
  """One id per character seen in the training text; unseen characters become `unk`."""

  kind = "char"

  def __init__(self, chars):
    self.chars = "".join(chars)
    if len(set(self.chars)) != len(self.chars):
      raise UserError("char tokenizer: its character list has duplicates")
    self._set_specials(len(self.chars))
    self._index = {c: i for i, c in enumerate(self.chars)}
    # Fast path for texts whose characters all lie in the Basic Multilingual Plane.
    self._table = np.full(0x10000, self.unk_id, dtype=np.int32)
    for c, i in self._index.items():
      if ord(c) < 0x10000:
        self._table[ord(c)] = i

  @classmethod
  def train(cls, texts):
    chars = set()
    for text in texts:
      chars.update(text)
    return cls(sorted(chars))

  def encode(self, text):
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    if codes.size and codes.max() >= 0x10000:
      return np.array([self._index.get(c, self.unk_id) for c in text], dtype=np.int32)
    return self._table[codes]

  def decode(self, ids):
    return "".join(self.chars[i] if 0 <= i < len(self.chars) else
                   ("\ufffd" if i == self.unk_id else "")
                   for i in (int(j) for j in ids))

  def to_dict(self):
    return {"kind": self.kind, "chars": self.chars}


class SentencePieceTokenizer(_LmChat):
  """A SentencePiece model with ids pad 0, unk 1, bos 2, eos 3, mask 4 (`<mask>`).

  Trained with identity normalisation, whitespace kept as is and byte fallback, so any text
  (code, indentation, newlines, emoji) decodes back to exactly itself.
  """

  def __init__(self, model_proto):
    import sentencepiece as spm  # pylint: disable=import-outside-toplevel
    self.model_proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
    self.kind = self._model_type()
    self.vocab_size = self._sp.vocab_size()
    self.pad_id, self.unk_id = self._sp.pad_id(), self._sp.unk_id()
    self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
    self.mask_id = self._sp.piece_to_id("<mask>")
    if min(self.pad_id, self.bos_id, self.eos_id) < 0 or self.mask_id == self.unk_id:
      raise UserError("sentencepiece model: it lacks one of the special pieces lm needs "
                      "(pad, bos, eos, <mask>); train it with lm")

  def _model_type(self):
    from sentencepiece import sentencepiece_model_pb2  # pylint: disable=import-outside-toplevel
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(self.model_proto)
    return {1: "unigram", 2: "bpe"}.get(proto.trainer_spec.model_type, "unigram")

  @classmethod
  def train(cls, texts, model_type, vocab_size, max_chars=200_000_000):
    """Trains on `texts` (the training split only), read up to `max_chars` characters."""
    import sentencepiece as spm  # pylint: disable=import-outside-toplevel
    proto = io.BytesIO()
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=_training_sentences(texts, max_chars), model_writer=proto,
          vocab_size=vocab_size, model_type=model_type, character_coverage=1.0,
          normalization_rule_name="identity", remove_extra_whitespaces=False,
          allow_whitespace_only_pieces=True, byte_fallback=True, split_digits=True,
          pad_id=0, unk_id=1, bos_id=2, eos_id=3, user_defined_symbols=["<mask>"],
          max_sentence_length=1 << 16, num_threads=2, minloglevel=2,
          hard_vocab_limit=True, train_extremely_large_corpus=False)
    except RuntimeError as e:
      message = str(e).strip().splitlines()[-1]
      if "Vocabulary size" in message or "vocab_size" in message:
        raise UserError(f"config.data.vocab_size: {vocab_size} does not fit this training "
                        f"text ({message}); {model_type} with byte fallback needs at least "
                        "the 5 specials + 256 bytes + the distinct characters") from None
      raise UserError(f"sentencepiece training failed: {message}") from None
    return cls(proto.getvalue())

  def prompt_ids(self, text):
    """bos, then the text: lm's data starts every document with bos."""
    return [self.bos_id, *self.encode(text).tolist()]

  def encode(self, text):
    return np.asarray(self._sp.encode(text), dtype=np.int32)

  def decode(self, ids):
    return self._sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

  def id_to_token(self, i):
    return self._sp.id_to_piece(int(i))

  def to_dict(self):
    return {"kind": self.kind, "model": base64.b64encode(self.model_proto).decode("ascii")}


class _GivenSpecials:
  """Special ids as a pretrained checkpoint defines them (several may share one id, as
  GPT-2's <|endoftext|> is its bos, eos and pad)."""

  def _set_specials(self, specials):
    for name in SPECIALS:
      setattr(self, f"{name}_id", int(specials[name]))
    self.specials = {name: int(specials[name]) for name in SPECIALS}

  def prompt_ids(self, text):
    """The text's ids as the checkpoint's own tokenizer gives them: bos first only if it
    adds one (Llama's does; GPT-2's and SmolLM2's do not)."""
    return ([self.bos_id] if self.adds_bos else []) + self.encode(text).tolist()

  chat_stop_text = None  # replies end at the stop ids (eos, bos)
  texts_start_with_bos = False  # as the checkpoint's tokenizer has it (adds_bos)

  def chat_ids(self, rendered):
    """A rendered conversation's ids, as apply_chat_template(tokenize=True) gives them: the
    template writes any bos itself, and its special tokens are read as such."""
    return self.encode(rendered).tolist()

  def special_tokens(self):
    """bos_token, eos_token, ... as text: what transformers hands a chat template."""
    return {f"{name}_token": self.id_to_token(getattr(self, f"{name}_id"))
            for name in ("bos", "eos", "unk", "pad")}


class HfTokenizer(_GivenSpecials):
  """A Hugging Face `tokenizers` tokenizer (tokenizer.json): WordPiece, byte-level BPE, ...

  `encode` gives the text's ids without special tokens; `end_with_eos`: classification
  inputs are bos + text + eos, as BERT's [CLS] ... [SEP]."""

  kind = "hf"

  def __init__(self, tokenizer_json, specials, end_with_eos=False, adds_bos=None,
               chat_template=None):
    """`adds_bos`: whether the checkpoint's tokenizer starts a text with bos (None: as its
    post-processor does). `chat_template`: the checkpoint's Jinja chat template, if any."""
    from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
    self.tokenizer_json = tokenizer_json
    self._tok = Tokenizer.from_str(tokenizer_json)
    self._tok.no_padding()  # lm pads and cuts its own rows
    self._tok.no_truncation()
    self._set_specials(specials)
    self.end_with_eos = bool(end_with_eos)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    if adds_bos is None:
      with_specials = self._tok.encode("a", add_special_tokens=True).ids
      adds_bos = with_specials[:1] == [self.bos_id] != self._tok.encode("a").ids[:1]
    self.adds_bos = bool(adds_bos)
    self.chat_template = chat_template

  def encode(self, text):
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

  def decode(self, ids):
    return self._tok.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size],
                            skip_special_tokens=True)

  def id_to_token(self, i):
    return self._tok.id_to_token(int(i))

  def to_dict(self):
    return {"kind": self.kind, "json": self.tokenizer_json, "specials": self.specials,
            "end_with_eos": self.end_with_eos, "adds_bos": self.adds_bos,
            "chat_template": self.chat_template}


class SentencePieceFileTokenizer(_GivenSpecials):
  """A checkpoint's own SentencePiece model (Llama's tokenizer.model), with its ids."""

  kind = "spm"

  def __init__(self, model_proto, specials, end_with_eos=False, adds_bos=True,
               chat_template=None):
    """`adds_bos`: LlamaTokenizer's add_bos_token (its default: True)."""
    import sentencepiece as spm  # pylint: disable=import-outside-toplevel
    self.model_proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
    self._set_specials(specials)
    self.end_with_eos = bool(end_with_eos)
    self.vocab_size = self._sp.vocab_size()
    self.adds_bos = bool(adds_bos)
    self.chat_template = chat_template

  def encode(self, text):
    return np.asarray(self._sp.encode(text), dtype=np.int32)

  def decode(self, ids):
    return self._sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

  def id_to_token(self, i):
    return self._sp.id_to_piece(int(i))

  def to_dict(self):
    return {"kind": self.kind, "model": base64.b64encode(self.model_proto).decode("ascii"),
            "specials": self.specials, "end_with_eos": self.end_with_eos,
            "adds_bos": self.adds_bos, "chat_template": self.chat_template}


def _training_sentences(texts, max_chars, piece=4096):
  """Documents cut at line ends into pieces SentencePiece accepts as 'sentences'."""
  total = 0
  for text in texts:
    start = 0
    while start < len(text) and total < max_chars:
      end = min(len(text), start + piece)
      if end < len(text):
        newline = text.rfind("\n", start, end)
        end = newline + 1 if newline > start else end
      yield text[start:end]
      total += end - start
      start = end
    if total >= max_chars:
      return


def from_dict(spec):
  kind = spec.get("kind")
  if kind == "byte":
    return ByteTokenizer()
  if kind == "char":
    return CharTokenizer(spec["chars"])
  if kind in ("unigram", "bpe"):
    return SentencePieceTokenizer(base64.b64decode(spec["model"]))
  if kind == "hf":
    return HfTokenizer(spec["json"], spec["specials"], spec.get("end_with_eos", False),
                       spec.get("adds_bos"), spec.get("chat_template"))
  if kind == "spm":
    return SentencePieceFileTokenizer(base64.b64decode(spec["model"]), spec["specials"],
                                      spec.get("end_with_eos", False),
                                      spec.get("adds_bos", True), spec.get("chat_template"))
  raise UserError(f"unknown tokenizer in checkpoint metadata: {kind!r}")


def fingerprint(tokenizer):
  """A short hash of what the tokenizer does, naming caches of tokenized data."""
  return hashlib.md5(json.dumps(tokenizer.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def train_tokenizer(data_config, train_texts):
  """The tokenizer config.data asks for, trained on `train_texts` (an iterable of str)."""
  kind = data_config.tokenizer
  if kind == "byte":
    return ByteTokenizer()
  if kind == "char":
    return CharTokenizer.train(train_texts)
  if kind in ("unigram", "bpe"):
    return SentencePieceTokenizer.train(train_texts, kind, data_config.vocab_size)
  if kind == "pretrained":
    raise UserError("config.data.tokenizer: 'pretrained' is the tokenizer of config.init_from, "
                    "and init_from is empty")
  raise UserError(f"config.data.tokenizer: unknown tokenizer {kind!r}")

