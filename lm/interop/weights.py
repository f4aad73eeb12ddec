"""Tensor files: safetensors in and out, and PyTorch zip checkpoints read without torch.

    read_tensors(folder)  -> {name: numpy array}   (*.safetensors shards, or pytorch_model.bin)
    write_safetensors(path, tensors)               (written whole to path.tmp, then renamed)

`pytorch_model.bin` is read by a restricted unpickler that rebuilds tensors and nothing
else: a checkpoint that asks for any other class is refused, naming it.
"""

import json
import os
import pickle
import zipfile

import ml_dtypes
import numpy as np

from lm.errors import UserError

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
