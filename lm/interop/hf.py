"""Hugging Face checkpoints in and out of lm, verified to the logit (tests/test_interop.py).

    python -m lm.interop.hf import --src=HF_FOLDER --dst=LM_WORKDIR
    python -m lm.interop.hf export --src=LM_WORKDIR --dst=HF_FOLDER [--step=N]
    config.init_from = "hf:HF_FOLDER"      # fine-tune a Hugging Face checkpoint directly

A Hugging Face folder holds config.json, the weights (`*.safetensors`, or
`pytorch_model.bin` read by a restricted unpickler that rebuilds tensors and nothing else)
and the tokenizer (tokenizer.json; or vocab.txt, vocab.json + merges.txt, tokenizer.model).
Import writes an lm workdir whose checkpoint 0 holds the weights, the matching lm config and
the tokenizer: lm.sample and lm.serve run it, and `init_from` fine-tunes from it. Export
writes config.json, model.safetensors and the tokenizer, for `from_pretrained`.
The tensor mappings are in lm/interop/hf_models.py.
"""

import json
import os
import pickle
import zipfile

import ml_dtypes
import numpy as np

from lm.errors import UserError
from lm.interop import hf_models

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
           "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
           "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path):
  """{name: array} from a .safetensors file (8-byte header size, JSON header, raw data)."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
  except (ValueError, UnicodeDecodeError):
    raise UserError(f"{path}: not a safetensors file") from None
  out = {}
  base = 8 + size
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _DTYPES:
      raise UserError(f"{path}: tensor {name} has dtype {info['dtype']}, which lm cannot read")
    start, end = info["data_offsets"]
    if base + end > len(data):
      raise UserError(f"{path}: truncated (tensor {name} runs past the end of the file)")
    out[name] = np.frombuffer(data[base + start:base + end],
                              dtype=_DTYPES[info["dtype"]]).reshape(info["shape"])
  return out


def write_safetensors(path, tensors):
  names = sorted(tensors)
  header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
  codes = {np.dtype(v): k for k, v in _DTYPES.items()}
  for name in names:
    array = np.ascontiguousarray(tensors[name])
    blob = array.tobytes()
    header[name] = {"dtype": codes[array.dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + len(blob)]}
    blobs.append(blob)
    offset += len(blob)
  encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
  encoded += b" " * (-len(encoded) % 8)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(len(encoded).to_bytes(8, "little"))
    f.write(encoded)
    for blob in blobs:
      f.write(blob)
  os.replace(tmp, path)


class _Storage:
  def __init__(self, dtype):
    self.dtype = dtype


_TORCH_STORAGES = {"FloatStorage": np.float32, "DoubleStorage": np.float64,
                   "HalfStorage": np.float16, "BFloat16Storage": ml_dtypes.bfloat16,
                   "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
                   "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}


def _rebuild_tensor(storage, offset, size, stride, *_):
  array, itemsize = storage
  if not size:
    return array[offset:offset + 1].reshape(()).copy()
  return np.lib.stride_tricks.as_strided(array[offset:], shape=tuple(size),
                                         strides=tuple(s * itemsize for s in stride)).copy()


def read_torch_bin(path):
  """{name: array} from a PyTorch zip checkpoint without torch and without running pickled
  code: only tensor rebuilds, storages and OrderedDict are allowed; anything else is an
  error naming it."""
  try:
    archive = zipfile.ZipFile(path)
  except zipfile.BadZipFile:
    raise UserError(f"{path}: not a PyTorch zip checkpoint (old pickle-only files are not "
                    "read: they cannot be loaded safely)") from None
  names = archive.namelist()
  pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
  if pkl is None:
    raise UserError(f"{path}: no data.pkl inside")
  root = pkl[:-len("data.pkl")]

  class Restricted(pickle.Unpickler):
    def find_class(self, module, name):
      if (module, name) == ("collections", "OrderedDict"):
        import collections  # pylint: disable=import-outside-toplevel
        return collections.OrderedDict
      if module == "torch._utils" and name == "_rebuild_tensor_v2":
        return _rebuild_tensor
      if module == "torch" and name in _TORCH_STORAGES:
        return _Storage(_TORCH_STORAGES[name])
      raise UserError(f"{path}: refuses to unpickle {module}.{name} (only tensors are read)")

    def persistent_load(self, pid):
      kind, storage, key = pid[0], pid[1], pid[2]
      if kind != "storage" or not isinstance(storage, _Storage):
        raise UserError(f"{path}: unexpected persistent object {kind!r}")
      raw = archive.read(f"{root}data/{key}")
      dtype = np.dtype(storage.dtype)
      return np.frombuffer(raw, dtype=dtype), dtype.itemsize

  with archive.open(pkl) as f:
    state = Restricted(f).load()
  if not isinstance(state, dict):
    raise UserError(f"{path}: holds a {type(state).__name__}, not a state dict")
  return dict(state)


def read_tensors(folder):
  files = sorted(os.listdir(folder))
  shards = [f for f in files if f.endswith(".safetensors")]
  if shards:
    out = {}
    for name in shards:
      out.update(read_safetensors(os.path.join(folder, name)))
    return out
  if "pytorch_model.bin" in files:
    return read_torch_bin(os.path.join(folder, "pytorch_model.bin"))
  raise UserError(f"{folder}: no *.safetensors or pytorch_model.bin weights")


def _read_json(folder, name, required=True):
  path = os.path.join(folder, name)
  if not os.path.exists(path):
    if required:
      raise UserError(f"{folder}: no {name}")
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def read_tokenizer(folder, arch, config):
  """The checkpoint's own tokenizer, giving the ids `transformers` gives."""
  from lm.data import tokenizers as tk  # pylint: disable=import-outside-toplevel
  files = set(os.listdir(folder))
  settings = _read_json(folder, "tokenizer_config.json", required=False)
  if "tokenizer.json" in files:
    with open(os.path.join(folder, "tokenizer.json"), encoding="utf-8") as f:
      text = f.read()
  elif "vocab.txt" in files:
    from tokenizers import BertWordPieceTokenizer  # pylint: disable=import-outside-toplevel
    text = BertWordPieceTokenizer(os.path.join(folder, "vocab.txt"),
                                  lowercase=settings.get("do_lower_case", True)).to_str()
  elif {"vocab.json", "merges.txt"} <= files:
    from tokenizers import ByteLevelBPETokenizer  # pylint: disable=import-outside-toplevel
    text = ByteLevelBPETokenizer(os.path.join(folder, "vocab.json"),
                                 os.path.join(folder, "merges.txt")).to_str()
  elif "tokenizer.model" in files:
    import sentencepiece as spm  # pylint: disable=import-outside-toplevel
    with open(os.path.join(folder, "tokenizer.model"), "rb") as f:
      proto = f.read()
    sp = spm.SentencePieceProcessor(model_proto=proto)
    bos = config.get("bos_token_id", sp.bos_id())
    eos = config.get("eos_token_id", sp.eos_id())
    eos = eos[0] if isinstance(eos, list) else eos
    pad = config.get("pad_token_id")
    specials = {"pad": eos if pad is None else pad, "bos": bos, "eos": eos,
                "unk": sp.unk_id(), "mask": sp.unk_id()}
    return tk.SentencePieceFileTokenizer(proto, specials)
  else:
    raise UserError(f"{folder}: no tokenizer (tokenizer.json, vocab.txt, vocab.json + "
                    "merges.txt or tokenizer.model)")
  from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
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
  return tk.HfTokenizer(text, specials)


class Converted:
  """A Hugging Face checkpoint in lm's terms."""

  def __init__(self, folder):
    folder = os.path.abspath(os.path.expanduser(folder))
    if not os.path.isdir(folder):
      raise UserError(f"{folder} is not a folder (a Hugging Face checkpoint: config.json, "
                      "weights, tokenizer)")
    self.folder = folder
    self.hf_config = _read_json(folder, "config.json")
    self.arch = hf_models.architecture(self.hf_config)
    self.fields, self.objective, self.tensors, self.notes = hf_models.to_lm(
        self.arch, self.hf_config, read_tensors(folder))
    self.tokenizer = read_tokenizer(folder, self.arch, self.hf_config)
    if self.tokenizer.vocab_size > self.fields["vocab_size"]:
      raise UserError(f"{folder}: the tokenizer has {self.tokenizer.vocab_size} ids, the model "
                      f"{self.fields['vocab_size']}")

  def lm_config(self):
    """An lm config that builds this model (task.objective: causal, or mlm for BERT)."""
    from lm.config import defaults  # pylint: disable=import-outside-toplevel
    config = defaults()
    config.model.update(self.fields)
    config.task.objective = self.objective
    config.data.tokenizer = "pretrained"
    config.data.seq_len = min(config.data.seq_len, self.fields["max_len"])
    config.mesh.data = 1
    if self.objective != "causal":
      config.sample.num_tokens = 0
    return config


def import_checkpoint(src, dst):
  """Writes the Hugging Face checkpoint `src` as the lm workdir `dst` (checkpoint 0)."""
  import jax  # pylint: disable=import-outside-toplevel
  from lm import metrics, pretrained, sharding  # pylint: disable=import-outside-toplevel
  from lm.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  from lm.train import Trainer  # pylint: disable=import-outside-toplevel
  converted = Converted(src)
  if os.path.isdir(os.path.join(dst, "checkpoints")) and os.listdir(
      os.path.join(dst, "checkpoints")):
    raise UserError(f"--dst: {dst} already holds checkpoints; choose an empty folder")
  config = converted.lm_config()
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  trainer = Trainer(config, converted.tokenizer.vocab_size, mesh)
  source = pretrained.Pretrained(f"{converted.arch} checkpoint {converted.folder}", {},
                                 lambda _: dict(converted.tensors))
  for note in converted.notes:
    metrics.log(f"lm: {converted.folder}: {note}; it keeps lm's initialisation")
  params = pretrained.load_params(source, jax.device_get(trainer.init_state().params),
                                  trainer.task.head_keys, sharding.replicated(mesh))
  state = trainer.state_from_params(params)
  os.makedirs(dst, exist_ok=True)
  checkpointer = Checkpointer(dst, 1)
  meta = {"config": config.to_dict(), "tokenizer": converted.tokenizer.to_dict(),
          "data_fingerprint": f"hf:{converted.folder}", "imported_from": converted.folder}
  checkpointer.save(0, state, meta)
  checkpointer.close()
  with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as f:
    json.dump(meta["config"], f, indent=2)
  metrics.log(f"lm: imported {converted.arch} ({trainer.num_params:,} parameters) from "
              f"{converted.folder} into {os.path.abspath(dst)}/checkpoints/0")
  return config


def export_checkpoint(src, dst, step=None, best=False):
  """Writes the lm workdir `src`'s checkpoint (newest, `step`, or the best) as a Hugging Face
  folder `dst`: config.json, model.safetensors and the tokenizer's files."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax.sharding import SingleDeviceSharding  # pylint: disable=import-outside-toplevel
  from lm import metrics, pretrained  # pylint: disable=import-outside-toplevel
  from lm.data.tokenizers import from_dict  # pylint: disable=import-outside-toplevel
  source = pretrained.from_workdir(os.path.abspath(src),
                                   ("best",) if best else ("checkpoints",), step)
  config = source.meta["config"]
  fields = config["model"]
  objective = config.get("task", {}).get("objective", "causal")
  if config["model"].get("scan_layers"):
    fields = {**fields, "scan_layers": False}
  arch = hf_models.exportable_as(fields, objective)
  flat = pretrained.unstack_layers(source.read(SingleDeviceSharding(jax.devices()[0])))
  dropped = sorted({n.split("/")[0] for n in flat if n.endswith("_head") or
                    n.startswith(("classification_head", "tagging_head"))})
  tensors = hf_models.to_hf(arch, fields, flat)
  tokenizer = from_dict(source.meta["tokenizer"])
  os.makedirs(dst, exist_ok=True)
  write_safetensors(os.path.join(dst, "model.safetensors"), tensors)
  with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as f:
    json.dump(hf_models.hf_config(arch, fields, tokenizer, "mlm_head/bias" in flat), f,
              indent=2)
  _write_tokenizer(dst, tokenizer, arch)
  kept = [n for n in dropped if n != "mlm_head"]
  metrics.log(f"lm: exported {source.where} as {arch} to {os.path.abspath(dst)}"
              + (f" (without {', '.join(kept)}: transformers' {arch} has no such head)"
                 if kept else ""))


def _write_tokenizer(dst, tokenizer, arch):
  from lm import metrics  # pylint: disable=import-outside-toplevel
  if hasattr(tokenizer, "tokenizer_json"):
    with open(os.path.join(dst, "tokenizer.json"), "w", encoding="utf-8") as f:
      f.write(tokenizer.tokenizer_json)
    from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
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


def main(argv=None):
  import argparse  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(prog="python -m lm.interop.hf",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("command", choices=("import", "export"))
  parser.add_argument("--src", required=True, help="import: a Hugging Face folder; export: "
                      "an lm workdir")
  parser.add_argument("--dst", required=True, help="import: an lm workdir to create; "
                      "export: a folder for from_pretrained")
  parser.add_argument("--step", type=int, default=None, help="export: this checkpoint")
  parser.add_argument("--best", action="store_true", help="export: the best checkpoint")
  args = parser.parse_args(argv)
  try:
    if args.command == "import":
      import_checkpoint(args.src, args.dst)
    else:
      export_checkpoint(args.src, args.dst, args.step, args.best)
  except UserError as e:
    print(f"lm: error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  main()
