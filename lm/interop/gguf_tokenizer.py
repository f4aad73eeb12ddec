"""A GGUF file's tokenizer in lm's terms, and an lm tokenizer in GGUF's.

    read(reader, path)     tokenizer.ggml.* metadata -> an lm tokenizer: byte-level BPE
                           ("gpt2") as an HfTokenizer, SentencePiece ("llama": Llama 2,
                           Mistral, Gemma) as a SentencePiece model
    vocabulary(tokenizer)  an lm tokenizer -> what lm/interop/gguf_file.py's writer stores

Both give the ids `AutoTokenizer` gives for the same file (tests/test_gguf.py).
"""

from lm.data import tokenizers as tk
from lm.errors import UserError

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types (SentencePiece's piece types)


def value(reader, key, default=None):
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def _byte_spelling():
  """GPT-2's byte -> printable character table (byte-level BPE vocabularies spell bytes so)."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) +
               list(range(ord("®"), ord("ÿ") + 1)))
  codes, extra = list(printable), 0
  for b in range(256):
    if b not in printable:
      printable.append(b)
      codes.append(256 + extra)
      extra += 1
  return {b: chr(c) for b, c in zip(printable, codes)}


# tokenizer.ggml.pre values whose split differs from GPT-2's (llama.cpp's names).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
                        "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
                        "qwen2": _QWEN2_SPLIT}


def _special_ids(reader, path):
  ids = {name: value(reader, f"tokenizer.ggml.{key}") for name, key in (
      ("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
      ("pad", "padding_token_id"))}
  if ids["eos"] is None:
    raise UserError(f"{path}: GGUF metadata has no tokenizer.ggml.eos_token_id")
  return ids


def read(reader, path):
  """The file's tokenizer as lm's: byte-level BPE (tokenizer.ggml.model "gpt2") as an
  HfTokenizer, SentencePiece (tokenizer.ggml.model "llama": Llama 2, Mistral, Gemma) as a
  SentencePiece model; with its special ids, whether it adds bos, and its chat template."""
  model = value(reader, "tokenizer.ggml.model")
  if model == "llama":
    return _read_sentencepiece(reader, path)
  if model != "gpt2":
    raise UserError(f"{path}: tokenizer {model!r} is not supported; lm reads GGUF byte-level "
                    "BPE (tokenizer.ggml.model gpt2) and SentencePiece (llama) tokenizers")
  return _read_byte_level_bpe(reader, path)


def _read_sentencepiece(reader, path):
  """llama.cpp's SentencePiece vocabulary (pieces, scores and types, which are
  SentencePiece's own piece types) as the BPE SentencePiece model it came from: identity
  normalisation, the space prefix as the file says, byte fallback when it has byte pieces."""
  from sentencepiece import sentencepiece_model_pb2 as pb  # pylint: disable=import-outside-toplevel
  tokens = value(reader, "tokenizer.ggml.tokens")
  scores = value(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
  types = value(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
  ids = _special_ids(reader, path)
  proto = pb.ModelProto()
  trainer = proto.trainer_spec
  trainer.model_type = pb.TrainerSpec.BPE
  trainer.vocab_size = len(tokens)
  trainer.byte_fallback = 6 in types
  unknown = [i for i, kind in enumerate(types) if kind == 2]
  trainer.unk_id = int(ids["unk"]) if ids["unk"] is not None else (unknown or [0])[0]
  trainer.bos_id = -1 if ids["bos"] is None else int(ids["bos"])
  trainer.eos_id = int(ids["eos"])
  trainer.pad_id = -1 if ids["pad"] is None else int(ids["pad"])
  for name, i in (("unk", trainer.unk_id), ("bos", trainer.bos_id), ("eos", trainer.eos_id),
                  ("pad", trainer.pad_id)):
    if i >= 0:
      setattr(trainer, f"{name}_piece", tokens[i])
  normalizer = proto.normalizer_spec
  normalizer.name = "identity"
  normalizer.add_dummy_prefix = bool(value(reader, "tokenizer.ggml.add_space_prefix", True))
  normalizer.remove_extra_whitespaces = False
  normalizer.escape_whitespaces = True
  for token, score, kind in zip(tokens, scores, types):
    piece = proto.pieces.add()
    piece.piece, piece.score, piece.type = token, float(score), int(kind)
  try:
    eos = int(ids["eos"])
    bos = eos if ids["bos"] is None else int(ids["bos"])
    specials = {"pad": eos if ids["pad"] is None else int(ids["pad"]), "bos": bos,
                "eos": eos, "unk": trainer.unk_id, "mask": eos}
    return tk.SentencePieceFileTokenizer(
        proto.SerializeToString(), specials,
        adds_bos=bool(value(reader, "tokenizer.ggml.add_bos_token", True)),
        chat_template=value(reader, "tokenizer.chat_template"))
  except (RuntimeError, IndexError) as e:
    raise UserError(f"{path}: its SentencePiece vocabulary does not make a model "
                    f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def _read_byte_level_bpe(reader, path):
  """The vocabulary as the file spells it, its merges, its control tokens kept whole."""
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
  from tokenizers import processors  # pylint: disable=import-outside-toplevel
  tokens = value(reader, "tokenizer.ggml.tokens")
  merges = value(reader, "tokenizer.ggml.merges") or []
  types = value(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
  spelling = _byte_spelling()
  alphabet = set(spelling.values())
  respell = lambda t: t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode())
  vocab = {respell(t): i for i, t in enumerate(tokens)}
  pairs = [tuple(m.split(" ", 1)) for m in merges]
  tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
  split = PRE_TOKENIZER_SPLITS.get(value(reader, "tokenizer.ggml.pre"))
  if split is None:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  else:
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  control = [AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, types)
             if kind == _CONTROL and set(t) <= alphabet]
  user = [AddedToken(t, special=False, normalized=False) for t, kind in zip(tokens, types)
          if kind == _USER_DEFINED and t in vocab]
  tok.add_special_tokens(control)
  tok.add_tokens(user)
  ids = _special_ids(reader, path)
  eos = int(ids["eos"])
  bos = eos if ids["bos"] is None else int(ids["bos"])
  adds_bos = bool(value(reader, "tokenizer.ggml.add_bos_token", False))
  if adds_bos:
    bos_token = tokens[bos]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B",
        special_tokens=[(bos_token, bos)])
  specials = {"pad": eos if ids["pad"] is None else int(ids["pad"]), "bos": bos, "eos": eos,
              "unk": eos if ids["unk"] is None else int(ids["unk"]), "mask": eos}
  return tk.HfTokenizer(tok.to_str(), specials, adds_bos=adds_bos,
                        chat_template=value(reader, "tokenizer.chat_template"))



def _sentencepiece_vocabulary(tokenizer):
  """A BPE SentencePiece model's pieces, scores and types (llama.cpp's "llama" tokenizer)
  and whether it prefixes a space; llama.cpp normalises nothing, so only models with
  identity normalisation (Llama's, Gemma's, lm's) are written."""
  from sentencepiece import sentencepiece_model_pb2 as pb  # pylint: disable=import-outside-toplevel
  proto = pb.ModelProto()
  proto.ParseFromString(tokenizer.model_proto)
  if proto.trainer_spec.model_type != pb.TrainerSpec.BPE:
    raise UserError("GGUF export writes BPE SentencePiece models (llama.cpp reads a unigram "
                    "one differently); this tokenizer is a unigram model")
  if proto.normalizer_spec.name not in ("identity", "") or proto.normalizer_spec.precompiled_charsmap:
    raise UserError(f"GGUF export: the SentencePiece model normalises text "
                    f"({proto.normalizer_spec.name}), which llama.cpp does not")
  return {"model": "llama", "tokens": [p.piece for p in proto.pieces],
          "scores": [p.score for p in proto.pieces], "types": [p.type for p in proto.pieces],
          "merges": [], "add_space_prefix": proto.normalizer_spec.add_dummy_prefix}


def vocabulary(tokenizer):
  """The GGUF form of an lm tokenizer: {model, tokens, types, merges, and for SentencePiece
  scores and add_space_prefix}. A checkpoint's byte-level BPE tokenizer.json as it is; lm's
  byte tokenizer as 256 single bytes (no merges) and its specials; a BPE SentencePiece
  model (a checkpoint's, or one lm trained) as llama.cpp's "llama" vocabulary."""
  import json  # pylint: disable=import-outside-toplevel
  if tokenizer.kind in ("spm", "bpe"):
    return _sentencepiece_vocabulary(tokenizer)
  if tokenizer.kind == "byte":
    spelling = _byte_spelling()
    specials = [f"<|{name}|>" for name in tk.SPECIALS]
    return {"model": "gpt2", "tokens": [spelling[b] for b in range(256)] + specials,
            "types": [1] * 256 + [_CONTROL] * 5, "merges": []}
  spec = json.loads(tokenizer.tokenizer_json) if tokenizer.kind == "hf" else None
  model = (spec or {}).get("model") or {}
  if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("decoder")):
    raise UserError(f"GGUF export writes byte-level BPE tokenizers (and lm's byte tokenizer); "
                    f"this model's is {tokenizer.kind}"
                    f"{' ' + model.get('type', '') if model else ''}")
  tokens = [None] * tokenizer.vocab_size
  types = [1] * tokenizer.vocab_size
  for token, i in model["vocab"].items():
    tokens[i] = token
  for added in spec.get("added_tokens", []):
    tokens[added["id"]] = added["content"]
    types[added["id"]] = _CONTROL if added.get("special") else _USER_DEFINED
  missing = [i for i, t in enumerate(tokens) if t is None]
  if missing:
    raise UserError(f"GGUF export: the tokenizer has no token for ids {missing[:5]}")
  merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
  return {"model": "gpt2", "tokens": tokens, "types": types, "merges": merges}
