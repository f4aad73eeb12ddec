"""A Hugging Face folder in lm's terms, and the tokenizer files written back into one.

    Converted(folder)   config.json -> lm model fields, the tensors renamed to lm's
                        (lm/interop/hf_models.py), and the checkpoint's own tokenizer;
                        a GGUF file the same way (lm/interop/gguf_file.py)
    write_tokenizer(dst, tokenizer, arch)

This module reads and writes files only; lm/interop/hf.py holds the import and export
commands, and lm/pretrained.py opens a folder for `config.init_from = "hf:FOLDER"`.
"""

import json
import os

import sentencepiece as spm
from tokenizers import BertWordPieceTokenizer, ByteLevelBPETokenizer, Tokenizer

from lm import metrics, tasks
from lm.config import defaults
from lm.data import tokenizers as tk
from lm.errors import UserError
from lm.interop import hf_models
from lm.interop.weights import read_tensors

def read_json(folder, name, required=True):
  path = os.path.join(folder, name)
  if not os.path.exists(path):
    if required:
      raise UserError(f"{folder}: no {name}")
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def read_chat_template(folder, settings):
  """The folder's chat template: chat_template.jinja, or tokenizer_config.json's (a string,
  or a list of named templates of which "default" is the one)."""
  path = os.path.join(folder, "chat_template.jinja")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      return f.read()
  template = settings.get("chat_template")
  if isinstance(template, list):
    named = {t.get("name"): t.get("template") for t in template}
    template = named.get("default")
  return template


def read_tokenizer(folder, arch, config):
  """The checkpoint's own tokenizer, giving the ids `transformers` gives."""
  files = set(os.listdir(folder))
  settings = read_json(folder, "tokenizer_config.json", required=False)
  chat_template = read_chat_template(folder, settings)
  if "tokenizer.json" in files:
    with open(os.path.join(folder, "tokenizer.json"), encoding="utf-8") as f:
      text = f.read()
  elif "vocab.txt" in files:
    text = BertWordPieceTokenizer(os.path.join(folder, "vocab.txt"),
                                  lowercase=settings.get("do_lower_case", True)).to_str()
  elif {"vocab.json", "merges.txt"} <= files:
    text = ByteLevelBPETokenizer(os.path.join(folder, "vocab.json"),
                                 os.path.join(folder, "merges.txt")).to_str()
  elif "tokenizer.model" in files:
    with open(os.path.join(folder, "tokenizer.model"), "rb") as f:
      proto = f.read()
    sp = spm.SentencePieceProcessor(model_proto=proto)
    bos = config.get("bos_token_id", sp.bos_id())
    eos = config.get("eos_token_id", sp.eos_id())
    eos = eos[0] if isinstance(eos, list) else eos
    pad = config.get("pad_token_id")
    specials = {"pad": eos if pad is None else pad, "bos": bos, "eos": eos,
                "unk": sp.unk_id(), "mask": sp.unk_id()}
    return tk.SentencePieceFileTokenizer(proto, specials,
                                         adds_bos=settings.get("add_bos_token", True),
                                         chat_template=chat_template)
  else:
    raise UserError(f"{folder}: no tokenizer (tokenizer.json, vocab.txt, vocab.json + "
                    "merges.txt or tokenizer.model)")
  tok = Tokenizer.from_str(text)
  if arch == "bert":
    ids = {name: tok.token_to_id(settings.get(f"{name}_token", token)) for name, token in
           (("pad", "[PAD]"), ("cls", "[CLS]"), ("sep", "[SEP]"), ("unk", "[UNK]"),
            ("mask", "[MASK]"))}
    missing = [k for k, v in ids.items() if v is None]
    if missing:
      raise UserError(f"{folder}: the tokenizer lacks BERT's special tokens {missing}")
    specials = {"pad": ids["pad"], "bos": ids["cls"], "eos": ids["sep"], "unk": ids["unk"],
                "mask": ids["mask"]}
    return tk.HfTokenizer(text, specials, end_with_eos=True)
  eos = config.get("eos_token_id")
  eos = eos[0] if isinstance(eos, list) else eos
  bos = config.get("bos_token_id", eos)
  if eos is None:
    raise UserError(f"{folder}: config.json has no eos_token_id")
  pad = config.get("pad_token_id")
  unk = tok.token_to_id(settings.get("unk_token") or "<unk>")
  specials = {"pad": eos if pad is None else pad, "bos": eos if bos is None else bos,
              "eos": eos, "unk": eos if unk is None else unk, "mask": eos}
  adds_bos = settings.get("add_bos_token")  # None: as tokenizer.json's post-processor does
  return tk.HfTokenizer(text, specials, adds_bos=adds_bos, chat_template=chat_template)


class Converted:
  """A Hugging Face checkpoint in lm's terms."""

  def __init__(self, folder):
    """`folder`: a Hugging Face folder, or a GGUF file (lm/interop/gguf_file.py)."""
    folder = os.path.abspath(os.path.expanduser(folder))
    self.folder = folder
    if folder.endswith(".gguf"):
      from lm.interop.gguf_file import GgufCheckpoint  # pylint: disable=import-outside-toplevel
      checkpoint = GgufCheckpoint(folder)
      self.hf_config, self.arch = checkpoint.hf_config, checkpoint.arch
      tensors, self.tokenizer = checkpoint.tensors, checkpoint.tokenizer
    elif not os.path.isdir(folder):
      raise UserError(f"{folder} is not a folder (a Hugging Face checkpoint: config.json, "
                      "weights, tokenizer) or a .gguf file")
    else:
      self.hf_config = read_json(folder, "config.json")
      self.arch = hf_models.architecture(self.hf_config)
      tensors = read_tensors(folder)
      self.tokenizer = read_tokenizer(folder, self.arch, self.hf_config)
    self.fields, self.objective, self.tensors, self.notes = hf_models.to_lm(
        self.arch, self.hf_config, tensors)
    if self.tokenizer.vocab_size > self.fields["vocab_size"]:
      raise UserError(f"{folder}: the tokenizer has {self.tokenizer.vocab_size} ids, the model "
                      f"{self.fields['vocab_size']}")

  def lm_config(self):
    """An lm config that builds this model (task.objective: causal, or mlm for BERT)."""
    config = defaults()
    config.model.update(self.fields)
    config.task.objective = self.objective
    config.data.tokenizer = "pretrained"
    config.data.seq_len = min(config.data.seq_len, self.fields["max_len"])
    config.mesh.data = 1
    if not tasks.get(self.objective).ends_with_sample:
      config.sample.num_tokens = 0
    return config


def write_tokenizer(dst, tokenizer, arch):
  if hasattr(tokenizer, "tokenizer_json"):
    with open(os.path.join(dst, "tokenizer.json"), "w", encoding="utf-8") as f:
      f.write(tokenizer.tokenizer_json)
    tok = Tokenizer.from_str(tokenizer.tokenizer_json)
    name = lambda i: tok.id_to_token(i)
    settings = {"tokenizer_class": "BertTokenizer" if arch == "bert" else "PreTrainedTokenizerFast",
                "pad_token": name(tokenizer.pad_id), "unk_token": name(tokenizer.unk_id)}
    if arch == "bert":
      settings.update(cls_token=name(tokenizer.bos_id), sep_token=name(tokenizer.eos_id),
                      mask_token=name(tokenizer.mask_id))
    else:
      settings.update(bos_token=name(tokenizer.bos_id), eos_token=name(tokenizer.eos_id))
  elif hasattr(tokenizer, "model_proto"):
    with open(os.path.join(dst, "tokenizer.model"), "wb") as f:
      f.write(tokenizer.model_proto)
    settings = {"tokenizer_class": "LlamaTokenizer"}
  else:
    metrics.log(f"lm: warning: lm's {tokenizer.kind} tokenizer has no Hugging Face "
                "equivalent; the folder holds the model only")
    return
  with open(os.path.join(dst, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(settings, f, indent=2)
