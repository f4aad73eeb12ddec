"""Hugging Face architectures <-> lm models: configs, and every tensor mapped explicitly.

    GPT-2   GPT2LMHeadModel / GPT2Model   -> Decoder (learned positions, LayerNorm, GELU,
                                             fused qkv split into query/key/value, tied head)
    Llama   LlamaForCausalLM / LlamaModel -> Decoder (RoPE, RMSNorm, SwiGLU, GQA)
    BERT    BertModel / BertForMaskedLM   -> EncoderWithHead(mlm) (post-norm, token types,
                                             pooler; the MLM head when the checkpoint has one)

`to_lm(arch, hf_config, tensors)` returns (lm model fields, objective, {lm name: array});
`to_hf(arch, model_config, params)` the reverse. lm names are "/"-joined parameter paths
(`layer_0/attn/query/kernel`). A tensor the mapping does not know, or one it needs and does
not find, or one of the wrong shape, is an error that names it; only buffers that carry no
weights (position ids, attention masks, rotary frequencies) are skipped.

torch Linear weights are [out, in]; lm kernels are [in, ..., out] with heads split out
(query [D, H, Dh], out [H, Dh, D]); GPT-2's Conv1D weights are already [in, out].
"""

import re

import numpy as np

from lm.errors import UserError

ARCHITECTURES = ("gpt2", "llama", "bert")
_SKIPPED = (r"(.*\.)?attn\.(masked_)?bias", r".*rotary_emb\.inv_freq",
            r"(.*\.)?embeddings\.position_ids", r"cls\.seq_relationship\..*")


def architecture(hf_config):
  model_type = hf_config.get("model_type")
  if model_type in ARCHITECTURES:
    return model_type
  if model_type in ("mistral", "qwen2") and not hf_config.get("attention_bias", False):
    return "llama"  # the same layout; sliding windows and biases are refused below
  raise UserError(f"config.json: model_type {model_type!r} is not supported; lm imports "
                  f"{', '.join(ARCHITECTURES)}")


def _require(condition, message):
  if not condition:
    raise UserError(f"config.json: {message}")


def _activation(name):
  table = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
           "gelu_python": "gelu"}
  _require(name in table, f"activation {name!r} is not one lm has (gelu, gelu_new)")
  return table[name]


def _rope_theta(c):
  parameters = c.get("rope_parameters") or {}
  scaling = c.get("rope_scaling") or parameters
  _require(scaling.get("rope_type", scaling.get("type", "default")) == "default",
           f"rope scaling {scaling.get('rope_type', scaling.get('type'))!r} is not supported")
  return float(parameters.get("rope_theta", c.get("rope_theta", 10000.0)))


def model_fields(arch, c):
  """lm config.model fields (and the objective) for a Hugging Face config.json dict."""
  if arch == "gpt2":
    _require(not c.get("scale_attn_by_inverse_layer_idx"), "scale_attn_by_inverse_layer_idx")
    d = c["n_embd"]
    return dict(num_layers=c["n_layer"], num_heads=c["n_head"], num_kv_heads=c["n_head"],
                d_model=d, d_ff=c.get("n_inner") or 4 * d, vocab_size=c["vocab_size"],
                max_len=c["n_positions"], norm="layernorm", norm_eps=c["layer_norm_epsilon"],
                norm_position="pre", positions="learned", mlp=_activation(
                    c.get("activation_function", "gelu_new")), use_bias=True,
                tie_embeddings=True, type_vocab_size=0, pooler=False), "causal"
  if arch == "llama":
    d, heads = c["hidden_size"], c["num_attention_heads"]
    _require(c.get("hidden_act", "silu") == "silu", f"hidden_act {c.get('hidden_act')!r}")
    _require(not c.get("attention_bias") and not c.get("mlp_bias"), "biases are not supported")
    _require(c.get("head_dim") in (None, d // heads), "head_dim != hidden_size / heads")
    _require(not c.get("sliding_window") or not c.get("use_sliding_window", True),
             "sliding-window attention is not supported")
    return dict(num_layers=c["num_hidden_layers"], num_heads=heads,
                num_kv_heads=c.get("num_key_value_heads") or heads, d_model=d,
                d_ff=c["intermediate_size"], vocab_size=c["vocab_size"],
                max_len=c["max_position_embeddings"], norm="rmsnorm",
                norm_eps=c.get("rms_norm_eps", 1e-6), norm_position="pre", positions="rope",
                rope_theta=_rope_theta(c), mlp="swiglu", use_bias=False,
                tie_embeddings=bool(c.get("tie_word_embeddings", False)), type_vocab_size=0,
                pooler=False), "causal"
  _require(c.get("position_embedding_type", "absolute") == "absolute",
           "BERT position_embedding_type must be absolute")
  return dict(num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
              num_kv_heads=c["num_attention_heads"], d_model=c["hidden_size"],
              d_ff=c["intermediate_size"], vocab_size=c["vocab_size"],
              max_len=c["max_position_embeddings"], norm="layernorm",
              norm_eps=c.get("layer_norm_eps", 1e-12), norm_position="post",
              positions="learned", mlp=_activation(c.get("hidden_act", "gelu")), use_bias=True,
              tie_embeddings=True, type_vocab_size=c.get("type_vocab_size", 0),
              pooler=True), "mlm"


def _rules(arch, m):
  """[(hf name pattern, lm name template, to_lm(array), to_hf(array))]: {i} is the layer."""
  d, h, k = m["d_model"], m["num_heads"], m["num_kv_heads"]
  dh = d // h
  same = lambda x: x
  t = lambda x: x.T
  heads_in = lambda n: (lambda x: x.T.reshape(d, n, dh), lambda x: x.reshape(d, n * dh).T)
  heads_out = (lambda x: x.T.reshape(h, dh, d), lambda x: x.reshape(h * dh, d).T)
  bias_heads = lambda n: (lambda x: x.reshape(n, dh), lambda x: x.reshape(n * dh))
  if arch == "gpt2":
    return [
        ("wte.weight", "embed/embedding", same, same),
        ("wpe.weight", "pos_embed/embedding", same, same),
        ("h.{i}.ln_1.weight", "layer_{i}/ln_1/scale", same, same),
        ("h.{i}.ln_1.bias", "layer_{i}/ln_1/bias", same, same),
        ("h.{i}.attn.c_attn.weight", "layer_{i}/attn/{qkv}/kernel", None, None),
        ("h.{i}.attn.c_attn.bias", "layer_{i}/attn/{qkv}/bias", None, None),
        ("h.{i}.attn.c_proj.weight", "layer_{i}/attn/out/kernel",
         lambda x: x.reshape(h, dh, d), lambda x: x.reshape(h * dh, d)),
        ("h.{i}.attn.c_proj.bias", "layer_{i}/attn/out/bias", same, same),
        ("h.{i}.ln_2.weight", "layer_{i}/ln_2/scale", same, same),
        ("h.{i}.ln_2.bias", "layer_{i}/ln_2/bias", same, same),
        ("h.{i}.mlp.c_fc.weight", "layer_{i}/mlp/wi/kernel", same, same),
        ("h.{i}.mlp.c_fc.bias", "layer_{i}/mlp/wi/bias", same, same),
        ("h.{i}.mlp.c_proj.weight", "layer_{i}/mlp/wo/kernel", same, same),
        ("h.{i}.mlp.c_proj.bias", "layer_{i}/mlp/wo/bias", same, same),
        ("ln_f.weight", "ln_f/scale", same, same),
        ("ln_f.bias", "ln_f/bias", same, same),
    ]
  if arch == "llama":
    rules = [
        ("embed_tokens.weight", "embed/embedding", same, same),
        ("layers.{i}.input_layernorm.weight", "layer_{i}/ln_1/scale", same, same),
        ("layers.{i}.self_attn.q_proj.weight", "layer_{i}/attn/query/kernel", *heads_in(h)),
        ("layers.{i}.self_attn.k_proj.weight", "layer_{i}/attn/key/kernel", *heads_in(k)),
        ("layers.{i}.self_attn.v_proj.weight", "layer_{i}/attn/value/kernel", *heads_in(k)),
        ("layers.{i}.self_attn.o_proj.weight", "layer_{i}/attn/out/kernel", *heads_out),
        ("layers.{i}.post_attention_layernorm.weight", "layer_{i}/ln_2/scale", same, same),
        ("layers.{i}.mlp.gate_proj.weight", "layer_{i}/mlp/wi_gate/kernel", t, t),
        ("layers.{i}.mlp.up_proj.weight", "layer_{i}/mlp/wi_up/kernel", t, t),
        ("layers.{i}.mlp.down_proj.weight", "layer_{i}/mlp/wo/kernel", t, t),
        ("norm.weight", "ln_f/scale", same, same),
    ]
    if not m["tie_embeddings"]:
      rules.append(("lm_head.weight", "lm_head/kernel", t, t))
    return rules
  e = "encoder/"
  rules = [
      ("embeddings.word_embeddings.weight", e + "embed/embedding", same, same),
      ("embeddings.position_embeddings.weight", e + "pos_embed/embedding", same, same),
      ("embeddings.LayerNorm.weight", e + "ln_embed/scale", same, same),
      ("embeddings.LayerNorm.bias", e + "ln_embed/bias", same, same),
  ]
  if m["type_vocab_size"]:
    rules.append(("embeddings.token_type_embeddings.weight", e + "type_embed/embedding",
                  same, same))
  layer = "encoder.layer.{i}."
  for name, ours in (("query", "query"), ("key", "key"), ("value", "value")):
    rules += [(layer + f"attention.self.{name}.weight", e + f"layer_{{i}}/attn/{ours}/kernel",
               *heads_in(h)),
              (layer + f"attention.self.{name}.bias", e + f"layer_{{i}}/attn/{ours}/bias",
               *bias_heads(h))]
  rules += [
      (layer + "attention.output.dense.weight", e + "layer_{i}/attn/out/kernel", *heads_out),
      (layer + "attention.output.dense.bias", e + "layer_{i}/attn/out/bias", same, same),
      (layer + "attention.output.LayerNorm.weight", e + "layer_{i}/ln_1/scale", same, same),
      (layer + "attention.output.LayerNorm.bias", e + "layer_{i}/ln_1/bias", same, same),
      (layer + "intermediate.dense.weight", e + "layer_{i}/mlp/wi/kernel", t, t),
      (layer + "intermediate.dense.bias", e + "layer_{i}/mlp/wi/bias", same, same),
      (layer + "output.dense.weight", e + "layer_{i}/mlp/wo/kernel", t, t),
      (layer + "output.dense.bias", e + "layer_{i}/mlp/wo/bias", same, same),
      (layer + "output.LayerNorm.weight", e + "layer_{i}/ln_2/scale", same, same),
      (layer + "output.LayerNorm.bias", e + "layer_{i}/ln_2/bias", same, same),
  ]
  if m["pooler"]:
    rules += [("pooler.dense.weight", e + "pooler/kernel", t, t),
              ("pooler.dense.bias", e + "pooler/bias", same, same)]
  return rules


MLM_HEAD_RULES = [
    ("cls.predictions.transform.dense.weight", "mlm_head/dense/kernel"),
    ("cls.predictions.transform.dense.bias", "mlm_head/dense/bias"),
    ("cls.predictions.transform.LayerNorm.weight", "mlm_head/norm/scale"),
    ("cls.predictions.transform.LayerNorm.bias", "mlm_head/norm/bias"),
    ("cls.predictions.bias", "mlm_head/bias"),
]
_PREFIXES = {"gpt2": "transformer.", "llama": "model.", "bert": "bert."}
_OLD_NAMES = ((".gamma", ".weight"), (".beta", ".bias"))  # early BERT LayerNorm names


def _normalise(arch, tensors):
  """Strips the task model's prefix (transformer. / model. / bert.) and old LayerNorm names."""
  out = {}
  for name, value in tensors.items():
    if name.startswith(_PREFIXES[arch]):
      name = name[len(_PREFIXES[arch]):]
    for old, new in _OLD_NAMES:
      if "LayerNorm" in name and name.endswith(old):
        name = name[:-len(old)] + new
    out[name] = value
  return out


def _expand(rules, num_layers):
  for hf, ours, to_lm, to_hf in rules:
    for i in range(num_layers) if "{i}" in hf else [None]:
      yield hf.replace("{i}", str(i)), ours.replace("{i}", str(i)), to_lm, to_hf


def to_lm(arch, hf_config, tensors):
  """(model fields, objective, {lm name: float32 array}, notes) from a checkpoint's tensors."""
  fields, objective = model_fields(arch, hf_config)
  tensors = _normalise(arch, tensors)
  if arch == "bert" and "pooler.dense.weight" not in tensors:
    fields["pooler"] = False
  out, used, problems = {}, set(), []
  d, h, dh = fields["d_model"], fields["num_heads"], fields["d_model"] // fields["num_heads"]
  for hf, ours, convert, _ in _expand(_rules(arch, fields), fields["num_layers"]):
    if hf not in tensors:
      problems.append(f"{hf}: missing")
      continue
    value = np.asarray(tensors[hf], np.float32)
    used.add(hf)
    if "{qkv}" in ours:  # GPT-2's fused [D, 3D] projection
      expected = (d, 3 * d) if hf.endswith("weight") else (3 * d,)
      if value.shape != expected:
        problems.append(f"{hf}: shape {value.shape}, expected {expected}")
        continue
      for part, name in zip(np.split(value, 3, axis=-1), ("query", "key", "value")):
        out[ours.replace("{qkv}", name)] = (part.reshape(d, h, dh) if hf.endswith("weight")
                                            else part.reshape(h, dh))
      continue
    try:
      out[ours] = convert(value)
    except ValueError:
      problems.append(f"{hf}: shape {value.shape} does not fit the config")
  notes = []
  if arch == "bert":
    if "cls.predictions.bias" in tensors:
      for hf, ours in MLM_HEAD_RULES:
        if hf not in tensors:
          problems.append(f"{hf}: missing")
          continue
        used.add(hf)
        value = np.asarray(tensors[hf], np.float32)
        out[ours] = value.T if hf.endswith("dense.weight") else value
      used.update(n for n in ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
                  if n in tensors)  # the tied embedding and a copy of the bias
    else:
      notes.append("no masked-LM head in the checkpoint (cls.predictions.*)")
  if "lm_head.weight" in tensors and fields["tie_embeddings"]:
    embedding = tensors["wte.weight" if arch == "gpt2" else "embed_tokens.weight"]
    if not np.array_equal(np.asarray(tensors["lm_head.weight"]), np.asarray(embedding)):
      problems.append("lm_head.weight: differs from the token embedding, but the config ties "
                      "them")
    used.add("lm_head.weight")
  extra = [n for n in tensors if n not in used and not any(re.fullmatch(p, n)
                                                            for p in _SKIPPED)]
  problems += [f"{n}: not a tensor of a {arch} model lm knows" for n in sorted(extra)]
  for name, value in out.items():
    expected = _expected_shape(name, fields)
    if expected is not None and value.shape != expected:
      problems.append(f"{name}: shape {value.shape}, expected {expected}")
  if problems:
    raise UserError(f"{arch} checkpoint does not map onto lm: " + "; ".join(problems[:8]) +
                    (f" ... ({len(problems)} problems)" if len(problems) > 8 else ""))
  return fields, objective, out, notes


def _expected_shape(name, m):
  d, v = m["d_model"], m["vocab_size"]
  if name.endswith("embed/embedding") and "pos" not in name and "type" not in name:
    return (v, d)
  if name.endswith("pos_embed/embedding"):
    return (m["max_len"], d)
  return None


def to_hf(arch, fields, params):
  """{hf name: float32 array} from lm params ("/"-joined names), the inverse of to_lm."""
  out = {}
  d, h, dh = fields["d_model"], fields["num_heads"], fields["d_model"] // fields["num_heads"]
  for hf, ours, _, convert in _expand(_rules(arch, fields), fields["num_layers"]):
    if "{qkv}" in ours:
      parts = [params[ours.replace("{qkv}", n)] for n in ("query", "key", "value")]
      shape = (d, h * dh) if hf.endswith("weight") else (h * dh,)
      out[hf] = np.concatenate([np.reshape(p, shape) for p in parts], axis=-1)
      continue
    out[hf] = convert(np.asarray(params[ours]))
  if arch == "bert" and not fields["type_vocab_size"]:  # BERT always has a type embedding
    out["embeddings.token_type_embeddings.weight"] = np.zeros((1, d), np.float32)
  if arch == "bert" and "mlm_head/bias" in params:
    for hf, ours in MLM_HEAD_RULES:
      value = np.asarray(params[ours])
      out[hf] = value.T if hf.endswith("dense.weight") else value
  prefix = {"gpt2": "transformer.", "llama": "model.", "bert": "bert." if
            "mlm_head/bias" in params else ""}[arch]
  out = {(n if n.startswith(("lm_head", "cls.")) else prefix + n): np.ascontiguousarray(
      v, dtype=np.float32) for n, v in out.items()}
  return out


def hf_config(arch, fields, tokenizer, has_mlm_head=False):
  """A config.json dict that transformers builds the same model from."""
  m = fields
  common = {"vocab_size": m["vocab_size"], "bos_token_id": tokenizer.bos_id,
            "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id,
            "torch_dtype": "float32"}
  if arch == "gpt2":
    return {**common, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
            "n_layer": m["num_layers"], "n_head": m["num_heads"], "n_embd": m["d_model"],
            "n_inner": m["d_ff"], "n_positions": m["max_len"], "n_ctx": m["max_len"],
            "layer_norm_epsilon": m["norm_eps"], "tie_word_embeddings": True,
            "activation_function": "gelu_new" if m["mlp"] == "gelu_tanh" else "gelu",
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
  if arch == "llama":
    return {**common, "model_type": "llama", "architectures": ["LlamaForCausalLM"],
            "num_hidden_layers": m["num_layers"], "num_attention_heads": m["num_heads"],
            "num_key_value_heads": m["num_kv_heads"], "hidden_size": m["d_model"],
            "intermediate_size": m["d_ff"], "max_position_embeddings": m["max_len"],
            "rms_norm_eps": m["norm_eps"], "rope_theta": m["rope_theta"],
            "rope_parameters": {"rope_type": "default", "rope_theta": m["rope_theta"]},
            "hidden_act": "silu", "tie_word_embeddings": m["tie_embeddings"],
            "attention_bias": False, "mlp_bias": False, "head_dim": m["d_model"] // m["num_heads"]}
  return {**common, "model_type": "bert",
          "architectures": ["BertForMaskedLM" if has_mlm_head else "BertModel"],
          "num_hidden_layers": m["num_layers"], "num_attention_heads": m["num_heads"],
          "hidden_size": m["d_model"], "intermediate_size": m["d_ff"],
          "max_position_embeddings": m["max_len"], "type_vocab_size": max(m["type_vocab_size"], 1),
          "layer_norm_eps": m["norm_eps"], "hidden_act": "gelu" if m["mlp"] == "gelu" else
          "gelu_new", "position_embedding_type": "absolute", "hidden_dropout_prob": 0.0,
          "attention_probs_dropout_prob": 0.0}


def exportable_as(fields, architecture):
  """The Hugging Face architecture an lm model (a task's `architecture`: decoder, encoder or
  encoder_decoder) is, or a UserError naming what does not fit."""
  m = fields
  def check(arch, wanted):
    wrong = [f"model.{k}={m[k]!r} (wants {v!r})" for k, v in wanted.items() if m[k] != v]
    if wrong:
      raise UserError(f"this model cannot be exported as {arch}: {', '.join(wrong)}")
    return arch
  if architecture == "encoder_decoder":
    raise UserError("lm exports decoders (as gpt2 or llama) and encoders (as bert), not "
                    "encoder-decoders")
  if architecture == "decoder":
    if m["positions"] == "rope":
      return check("llama", {"norm": "rmsnorm", "norm_position": "pre", "mlp": "swiglu",
                             "use_bias": False})
    check("gpt2", {"norm": "layernorm", "norm_position": "pre", "use_bias": True,
                   "tie_embeddings": True, "num_kv_heads": m["num_heads"]})
    if m["mlp"] not in ("gelu", "gelu_tanh"):
      raise UserError(f"this model cannot be exported as gpt2: model.mlp={m['mlp']!r}")
    return "gpt2"
  return check("bert", {"norm": "layernorm", "norm_position": "post", "positions": "learned",
                        "use_bias": True, "num_kv_heads": m["num_heads"], "mlp": "gelu"})
