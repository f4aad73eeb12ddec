"""A GGUF file (llama.cpp's format) in lm's terms, read with the `gguf` package.

    GgufCheckpoint(path)   the metadata as a Hugging Face config.json dict, every tensor
                           dequantized to float32 under its Hugging Face name, and the file's
                           own tokenizer (vocabulary, merges, special ids, chat template)

lm/interop/hf.py imports it (`python -m lm.interop.hf import --src=FILE.gguf --dst=DIR`)
through the same tensor mappings as a Hugging Face folder (lm/interop/hf_models.py), so a
GGUF model and its Hugging Face original become the same lm model.

Architectures: llama, qwen2, qwen3, gemma2 and gemma3 (text), as llama.cpp's converter
writes them. llama.cpp stores a Llama's query and key rows permuted for its interleaved
RoPE; lm (like transformers) rotates halves, so those rows are put back on reading (Qwen and
Gemma files keep them as they are). llama.cpp stores Gemma's norms as 1 + w: w on reading.
What llama.cpp does not store it derives (Gemma's query scaling, its layers' pattern and
local RoPE base); lm does the same, and writes what it would otherwise lose under keys of
its own (lm.query_pre_attn_scalar), which llama.cpp ignores.
"""

import os

import numpy as np

from lm.errors import UserError
from lm.interop import gguf_tokenizer
from lm.interop.gguf_tokenizer import value as _value

# GGUF metadata -> the config.json keys lm/interop/hf_models.py reads, per architecture.
_LLAMA_KEYS = {"block_count": "num_hidden_layers", "embedding_length": "hidden_size",
               "feed_forward_length": "intermediate_size",
               "attention.head_count": "num_attention_heads",
               "attention.head_count_kv": "num_key_value_heads",
               "attention.layer_norm_rms_epsilon": "rms_norm_eps",
               "rope.freq_base": "rope_theta", "context_length": "max_position_embeddings",
               "attention.key_length": "head_dim", "attention.sliding_window": "sliding_window",
               "attn_logit_softcapping": "attn_logit_softcapping",
               "final_logit_softcapping": "final_logit_softcapping"}
# GGUF architecture -> (lm/interop/hf_models.py's architecture, transformers' class).
ARCHITECTURES = {"llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM"),
                 "qwen3": ("qwen3", "Qwen3ForCausalLM"),
                 "gemma2": ("gemma2", "Gemma2ForCausalLM"),
                 "gemma3": ("gemma3_text", "Gemma3ForCausalLM")}
GEMMA = ("gemma2", "gemma3")

# GGUF tensor names -> Hugging Face's, for the llama layout.
_LLAMA_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
_QWEN_TENSORS = {
    **{f"attn_{x}.bias": f"model.layers.{{i}}.self_attn.{x}_proj.bias" for x in "qkv"},
    "attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
}
_GEMMA_TENSORS = {  # Gemma's four norms per layer: ffn_norm is the one before the MLP
    "post_attention_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "ffn_norm.weight": "model.layers.{i}.pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "model.layers.{i}.post_feedforward_layernorm.weight",
}


def tensor_names(gguf_arch):
  """{GGUF tensor name: Hugging Face name} ({i}: the layer) for one architecture."""
  names = {**_LLAMA_TENSORS, **_QWEN_TENSORS}
  if gguf_arch in GEMMA:
    names.update(_GEMMA_TENSORS)
  return names
# Quantization types read (dequantized by gguf.quants); others are refused by name.
QUANTIZATIONS = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K",
                 "Q4_K", "Q5_K", "Q6_K")


def _reader(path):
  import gguf  # pylint: disable=import-outside-toplevel
  if not os.path.isfile(path):
    raise UserError(f"--src: {path} is not a file")
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # pylint: disable=broad-except  (the reader's errors vary by damage)
    raise UserError(f"{path}: not a readable GGUF file ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else 'truncated or corrupt'})") from None


def unpermute_rope_rows(w_OxI, heads):
  """llama.cpp's permutation of a query/key projection undone: within each head its rows
  (pairs interleaved for RoPE) go back to the two halves transformers rotates."""
  out, rest = w_OxI.shape[0], w_OxI.shape[1:]
  return (w_OxI.reshape(heads, out // heads // 2, 2, *rest).swapaxes(1, 2)
          .reshape(w_OxI.shape))


class GgufCheckpoint:
  """A GGUF file's model: `arch`, `hf_config` (config.json keys), `tensors` (Hugging Face
  names, float32 numpy) and `tokenizer` (an lm HfTokenizer with its chat template)."""

  def __init__(self, path):
    self.path = os.path.abspath(os.path.expanduser(path))
    reader = _reader(self.path)
    arch = _value(reader, "general.architecture")
    if arch not in ARCHITECTURES:
      raise UserError(f"{self.path}: GGUF architecture {arch!r} is not supported; lm reads "
                      f"{', '.join(ARCHITECTURES)}")
    self.gguf_arch = arch
    self.arch, hf_class = ARCHITECTURES[arch]
    self.hf_config = self._config(reader, arch, hf_class)
    self.tensors = self._tensors(reader)
    if "lm_head.weight" not in self.tensors:
      self.hf_config["tie_word_embeddings"] = True
    self.tokenizer = gguf_tokenizer.read(reader, self.path)
    self.hf_config["vocab_size"] = int(
        _value(reader, f"{arch}.vocab_size", self.tensors["model.embed_tokens.weight"].shape[0]))

  def _config(self, reader, arch, hf_class):
    config = {"model_type": self.arch, "architectures": [hf_class],
              "hidden_act": "silu", "tie_word_embeddings": False}
    for key, name in _LLAMA_KEYS.items():
      value = _value(reader, f"{arch}.{key}")
      if value is not None:
        config[name] = value
    if arch in ("llama", "qwen2", "qwen3") and config.get("sliding_window"):
      raise UserError(f"{self.path}: a sliding window in a {arch} GGUF file is not supported")
    missing = [k for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                           "intermediate_size") if k not in config]
    if missing:
      raise UserError(f"{self.path}: GGUF metadata lacks {arch}.* for {', '.join(missing)}")
    config.setdefault("max_position_embeddings", 2048)
    scaling = _value(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
      raise UserError(f"{self.path}: RoPE scaling {scaling!r} is not supported")
    rope_dims = _value(reader, f"{arch}.rope.dimension_count")
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if rope_dims not in (None, head_dim):
      raise UserError(f"{self.path}: partial RoPE ({rope_dims} of {head_dim} dimensions) is "
                      "not supported")
    if arch in GEMMA:
      self._gemma_config(reader, arch, config, head_dim)
    return config

  def _gemma_config(self, reader, arch, config, head_dim):
    """What llama.cpp derives for Gemma rather than reading it: the query scaling (1/sqrt of
    the head size; of d_model / heads for the 27B models), the layers' pattern (every 2nd
    layer global in Gemma 2, every 6th in Gemma 3) and Gemma 3's local RoPE base (10,000)."""
    del config["hidden_act"]
    config["hidden_activation"] = "gelu_pytorch_tanh"
    config["tie_word_embeddings"] = True
    layers, d, heads = (config["num_hidden_layers"], config["hidden_size"],
                        config["num_attention_heads"])
    is_27b = layers == {"gemma2": 46, "gemma3": 62}[arch]
    config["query_pre_attn_scalar"] = _value(
        reader, "lm.query_pre_attn_scalar", d // heads if is_27b else head_dim)
    pattern = _value(reader, f"{arch}.attention.sliding_window_pattern",
                     2 if arch == "gemma2" else 6)
    if isinstance(pattern, list):  # one flag per layer: whether it is local
      local = [bool(x) for x in pattern]
    else:
      local = [(i + 1) % int(pattern) != 0 for i in range(layers)]
    config["layer_types"] = ["sliding_attention" if x else "full_attention" for x in local]
    if arch == "gemma2":
      config.setdefault("attn_logit_softcapping", 50.0)
      config.setdefault("final_logit_softcapping", 30.0)
    else:
      config["rope_parameters"] = {
          "full_attention": {"rope_type": "default",
                             "rope_theta": float(config.pop("rope_theta", 1e6))},
          "sliding_attention": {"rope_type": "default", "rope_theta": float(
              _value(reader, f"{arch}.rope.freq_base_swa", 10000.0))}}

  def _tensors(self, reader):
    import gguf  # pylint: disable=import-outside-toplevel
    config = self.hf_config
    heads, kv_heads = config["num_attention_heads"], config.get(
        "num_key_value_heads", config["num_attention_heads"])
    tensors = {}
    for tensor in reader.tensors:
      kind = tensor.tensor_type.name
      if kind not in QUANTIZATIONS:
        raise UserError(f"{self.path}: tensor {tensor.name} is {kind}, a quantization lm does "
                        f"not read ({', '.join(QUANTIZATIONS)})")
      name = _hf_name(tensor.name, self.gguf_arch)
      if name is None:
        raise UserError(f"{self.path}: unexpected tensor {tensor.name} for a {self.gguf_arch} "
                        "model")
      try:
        values = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type),
                            np.float32)
      except Exception as e:  # pylint: disable=broad-except
        raise UserError(f"{self.path}: tensor {tensor.name} ({kind}) cannot be read: "
                        f"{type(e).__name__}") from None
      expected = tuple(int(n) for n in reversed(tensor.shape.tolist()))
      values = values.reshape(expected)
      if self.gguf_arch == "llama" and name.endswith("q_proj.weight"):
        values = unpermute_rope_rows(values, heads)
      elif self.gguf_arch == "llama" and name.endswith("k_proj.weight"):
        values = unpermute_rope_rows(values, kv_heads)
      if self.gguf_arch in GEMMA and name.endswith("norm.weight"):
        values = values - 1.0  # llama.cpp stores Gemma's (1 + w)
      tensors[name] = values
    return tensors


def _hf_name(gguf_name, gguf_arch):
  names = tensor_names(gguf_arch)
  if gguf_name in names and "{i}" not in names[gguf_name]:
    return names[gguf_name]
  parts = gguf_name.split(".", 2)
  if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in names:
    return names[parts[2]].format(i=int(parts[1]))
  return None


# Writing: an lm decoder as a GGUF file transformers and llama.cpp read.

EXPORT_TYPES = ("f32", "f16", "bf16")
# lm/interop/hf_models.py's architectures -> GGUF's (Mistral's window has no GGUF form
# llama.cpp reads: its Mistral files are llama ones, without the window).
WRITES = {hf: gguf_arch for gguf_arch, (hf, _) in ARCHITECTURES.items()}


def permute_rope_rows(w_OxI, heads):
  """unpermute_rope_rows's inverse: the two halves of each head interleaved, as llama.cpp
  stores a query/key projection."""
  out, rest = w_OxI.shape[0], w_OxI.shape[1:]
  return (w_OxI.reshape(heads, 2, out // heads // 2, *rest).swapaxes(1, 2)
          .reshape(w_OxI.shape))


def _write_architecture(writer, arch, c):
  """The hyper-parameters llama.cpp reads for `arch` (a GGUF architecture), and those it
  derives written where lm's reader finds them."""
  head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
  writer.add_rope_dimension_count(head_dim)
  if arch != "llama":
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
  if arch not in GEMMA:
    writer.add_rope_freq_base(float(c["rope_theta"]))
    return
  local = [t == "sliding_attention" for t in c["layer_types"]]
  if any(local):
    writer.add_sliding_window(int(c["sliding_window"]))
  writer.add_sliding_window_pattern(local)
  writer.add_float32("lm.query_pre_attn_scalar", float(c["query_pre_attn_scalar"]))
  if arch == "gemma2":
    writer.add_rope_freq_base(float(c["rope_theta"]))
    writer.add_attn_logit_softcapping(float(c.get("attn_logit_softcapping") or 0.0))
    writer.add_final_logit_softcapping(float(c.get("final_logit_softcapping") or 0.0))
  else:
    if c.get("final_logit_softcapping"):
      writer.add_final_logit_softcapping(float(c["final_logit_softcapping"]))
    writer.add_rope_freq_base(float(c["rope_parameters"]["full_attention"]["rope_theta"]))
    writer.add_float32(f"{arch}.rope.freq_base_swa",
                       float(c["rope_parameters"]["sliding_attention"]["rope_theta"]))


def write(path, hf_config, tensors, tokenizer, dtype="f32"):
  """Writes a decoder (a Hugging Face config.json dict of one of WRITES' architectures and
  tensors under Hugging Face names) with `tokenizer` as a GGUF file at `path`, its matrices
  in `dtype` (f32, f16 or bf16; norms and biases stay float32, as llama.cpp keeps them)."""
  import gguf  # pylint: disable=import-outside-toplevel
  if dtype not in EXPORT_TYPES:
    raise UserError(f"--gguf_type: {dtype!r} is not one of {', '.join(EXPORT_TYPES)}")
  c = hf_config
  if c["model_type"] not in WRITES:
    raise UserError(f"GGUF export writes {', '.join(WRITES)} models; this one is "
                    f"{c['model_type']} (export it to a Hugging Face folder instead)")
  arch = WRITES[c["model_type"]]
  vocabulary = gguf_tokenizer.vocabulary(tokenizer)
  heads, kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
  kind = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
          "bf16": gguf.GGMLQuantizationType.BF16}[dtype]
  partial = path + ".partial"
  writer = gguf.GGUFWriter(partial, arch)
  writer.add_block_count(c["num_hidden_layers"])
  writer.add_context_length(c["max_position_embeddings"])
  writer.add_embedding_length(c["hidden_size"])
  writer.add_feed_forward_length(c["intermediate_size"])
  writer.add_head_count(heads)
  writer.add_head_count_kv(kv_heads)
  _write_architecture(writer, arch, c)
  writer.add_layer_norm_rms_eps(float(c["rms_norm_eps"]))
  writer.add_vocab_size(c["vocab_size"])
  writer.add_file_type({"f32": 0, "f16": 1, "bf16": 32}[dtype])
  writer.add_tokenizer_model(vocabulary["model"])
  writer.add_tokenizer_pre("default")
  writer.add_token_list(vocabulary["tokens"])
  writer.add_token_types(vocabulary["types"])
  if vocabulary["merges"]:
    writer.add_token_merges(vocabulary["merges"])
  if "scores" in vocabulary:
    writer.add_token_scores(vocabulary["scores"])
    writer.add_add_space_prefix(bool(vocabulary["add_space_prefix"]))
  writer.add_bos_token_id(tokenizer.bos_id)
  writer.add_eos_token_id(tokenizer.eos_id)
  writer.add_pad_token_id(tokenizer.pad_id)
  writer.add_unk_token_id(tokenizer.unk_id)
  writer.add_add_bos_token(bool(getattr(tokenizer, "adds_bos", True)))
  if getattr(tokenizer, "chat_template", None):
    writer.add_chat_template(tokenizer.chat_template)
  names = {hf: gguf_name for gguf_name, hf in tensor_names(arch).items()}
  for name, values in tensors.items():
    values = np.asarray(values, np.float32)
    generic = name
    layer = None
    if name.startswith("model.layers."):
      layer, rest = name[len("model.layers."):].split(".", 1)
      generic = "model.layers.{i}." + rest
    if generic not in names:
      raise UserError(f"GGUF export: no GGUF name for tensor {name}")
    gguf_name = names[generic] if layer is None else f"blk.{layer}.{names[generic]}"
    if arch == "llama" and name.endswith("q_proj.weight"):
      values = permute_rope_rows(values, heads)
    elif arch == "llama" and name.endswith("k_proj.weight"):
      values = permute_rope_rows(values, kv_heads)
    if arch in GEMMA and name.endswith("norm.weight"):
      values = values + 1.0
    if values.ndim == 1 or dtype == "f32":
      writer.add_tensor(gguf_name, values)
    else:
      writer.add_tensor(gguf_name, gguf.quants.quantize(values, kind), raw_dtype=kind)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  os.replace(partial, path)  # a failed export leaves no half-written file under its name
