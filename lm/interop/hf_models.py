"""Hugging Face architectures <-> lm models: configs, and every tensor mapped explicitly.

    GPT-2   GPT2LMHeadModel / GPT2Model   -> Decoder (learned positions, LayerNorm, GELU,
                                             fused qkv split into query/key/value, tied head)
    Llama   LlamaForCausalLM / LlamaModel -> Decoder (RoPE, RMSNorm, SwiGLU, GQA)
    Mistral MistralForCausalLM            -> the Llama layout, every layer in a sliding window
    Qwen2   Qwen2ForCausalLM (Qwen2.5)    -> the Llama layout with query/key/value biases
    Qwen3   Qwen3ForCausalLM              -> the Llama layout with per-head q/k RMSNorm
    Gemma2  Gemma2ForCausalLM             -> Decoder (GeGLU, (1 + w) RMSNorm before and after
                                             each sub-layer, sqrt(d) embedding scale, scores
                                             and logits soft-capped, local/global layers)
    Gemma3  Gemma3ForCausalLM (gemma3_text) -> Gemma2's layout with q/k norms instead of the
                                             scores' soft cap, and a RoPE base per layer kind
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

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
GEMMA_FAMILY = ("gemma2", "gemma3_text")
ARCHITECTURES = ("gpt2", "bert") + LLAMA_FAMILY + GEMMA_FAMILY
_SKIPPED = (r"(.*\.)?attn\.(masked_)?bias", r".*rotary_emb\.inv_freq",
            r"(.*\.)?embeddings\.position_ids", r"cls\.seq_relationship\..*")


def architecture(hf_config):
  model_type = hf_config.get("model_type")
  if model_type in ARCHITECTURES:
    return model_type
  if model_type == "gemma3":
    raise UserError("config.json: model_type 'gemma3' is Gemma 3's vision-language model; "
                    "lm imports its text-only checkpoints (model_type gemma3_text, "
                    "Gemma3ForCausalLM)")
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


def _rope_theta(c, parameters=None, default=10000.0):
  """The RoPE base of `parameters` (a rope_parameters dict; default: the config's own)."""
  parameters = (c.get("rope_parameters") or {}) if parameters is None else parameters
  scaling = c.get("rope_scaling") or parameters
  _require(scaling.get("rope_type", scaling.get("type", "default")) == "default",
           f"rope scaling {scaling.get('rope_type', scaling.get('type'))!r} is not supported")
  return float(parameters.get("rope_theta", c.get("rope_theta", default)))


def _layer_types(arch, c):
  """Each layer's kind, "sliding_attention" or "full_attention", as transformers builds it."""
  n, window = c["num_hidden_layers"], c.get("sliding_window")
  if c.get("layer_types"):
    return list(c["layer_types"])
  if arch == "mistral":
    local = lambda i: bool(window)
  elif arch == "gemma2":
    local = lambda i: (i + 1) % 2 != 0
  elif arch == "gemma3_text":
    local = lambda i: (i + 1) % c.get("sliding_window_pattern", 6) != 0
  elif arch in ("qwen2", "qwen3"):
    local = lambda i: bool(c.get("use_sliding_window")) and i >= c.get("max_window_layers", n)
  else:
    local = lambda i: False
  return ["sliding_attention" if local(i) else "full_attention" for i in range(n)]


def _windows(arch, c):
  """(sliding_window, global_every) for the layers' kinds: lm's local layers are all of
  them (global_every 0) or all but every n-th."""
  local = [t == "sliding_attention" for t in _layer_types(arch, c)]
  _require(set(_layer_types(arch, c)) <= {"sliding_attention", "full_attention"},
           f"layer_types {sorted(set(_layer_types(arch, c)))} (lm has sliding_attention and "
           "full_attention)")
  if not any(local):
    return 0, 0
  window = c.get("sliding_window")
  _require(bool(window), "sliding_attention layers without a sliding_window")
  if all(local):
    return int(window), 0
  every = local.index(False) + 1
  _require(all(is_local == ((i + 1) % every != 0) for i, is_local in enumerate(local)),
           "layer_types: lm alternates local and global layers regularly (every n-th "
           "global); this pattern is not one")
  return int(window), every


def _gemma_fields(arch, c):
  d, heads = c["hidden_size"], c["num_attention_heads"]
  _require(c.get("hidden_activation", c.get("hidden_act")) in ("gelu_pytorch_tanh", None),
           f"hidden_activation {c.get('hidden_activation')!r} (Gemma's is gelu_pytorch_tanh)")
  _require(not c.get("attention_bias"), "biases are not supported")
  _require(not c.get("use_bidirectional_attention"), "bidirectional attention")
  window, every = _windows(arch, c)
  fields = dict(num_layers=c["num_hidden_layers"], num_heads=heads,
                num_kv_heads=c.get("num_key_value_heads") or heads, d_model=d,
                head_size=int(c.get("head_dim") or d // heads), d_ff=c["intermediate_size"],
                vocab_size=c["vocab_size"], max_len=c["max_position_embeddings"],
                norm="rmsnorm_1p", norm_eps=c.get("rms_norm_eps", 1e-6),
                norm_position="sandwich", positions="rope", mlp="geglu", use_bias=False,
                tie_embeddings=True, type_vocab_size=0, pooler=False, embed_scale=True,
                query_pre_attn_scalar=float(c.get("query_pre_attn_scalar") or 0.0),
                attn_softcap=float(c.get("attn_logit_softcapping") or 0.0),
                final_softcap=float(c.get("final_logit_softcapping") or 0.0),
                sliding_window=window, global_every=every)
  _require(c.get("tie_word_embeddings", True), "untied embeddings (Gemma ties them)")
  parameters = c.get("rope_parameters") or {}
  if arch == "gemma3_text":
    fields["qk_norm"] = True
    per_kind = "full_attention" in parameters or "sliding_attention" in parameters
    fields["rope_theta"] = _rope_theta(
        c, parameters.get("full_attention", {}) if per_kind else parameters, 1e6)
    local = (_rope_theta({}, parameters["sliding_attention"]) if per_kind and
             "sliding_attention" in parameters else float(c.get("rope_local_base_freq", 1e4)))
    if window:
      fields["rope_local_theta"] = local
  else:
    fields["rope_theta"] = _rope_theta(c)
  return fields


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
  if arch in GEMMA_FAMILY:
    return _gemma_fields(arch, c), "causal"
  if arch in LLAMA_FAMILY:
    d, heads = c["hidden_size"], c["num_attention_heads"]
    _require(c.get("hidden_act", "silu") == "silu", f"hidden_act {c.get('hidden_act')!r}")
    _require(not c.get("attention_bias") and not c.get("mlp_bias"),
             "biases on every projection are not supported (lm has Qwen2's on q/k/v)")
    window, every = _windows(arch, c)
    return dict(num_layers=c["num_hidden_layers"], num_heads=heads,
                num_kv_heads=c.get("num_key_value_heads") or heads, d_model=d,
                head_size=0 if c.get("head_dim") in (None, d // heads) else int(c["head_dim"]),
                d_ff=c["intermediate_size"], vocab_size=c["vocab_size"],
                max_len=c["max_position_embeddings"], norm="rmsnorm",
                norm_eps=c.get("rms_norm_eps", 1e-6), norm_position="pre", positions="rope",
                rope_theta=_rope_theta(c), mlp="swiglu", use_bias=False,
                qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3", sliding_window=window,
                global_every=every, tie_embeddings=bool(c.get("tie_word_embeddings", False)),
                type_vocab_size=0, pooler=False), "causal"
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
  dh = m.get("head_size") or d // h
  same = lambda x: x
  t = lambda x: x.T
  heads_in = lambda n: (lambda x: x.T.reshape(d, n, dh), lambda x: x.reshape(d, n * dh).T)
  heads_out = (lambda x: x.T.reshape(h, dh, d), lambda x: x.reshape(h * dh, d).T)
  gemma = arch in GEMMA_FAMILY
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
  if arch in LLAMA_FAMILY + GEMMA_FAMILY:
    attn = "layers.{i}.self_attn."
    rules = [
        ("embed_tokens.weight", "embed/embedding", same, same),
        ("layers.{i}.input_layernorm.weight", "layer_{i}/ln_1/scale", same, same),
        (attn + "q_proj.weight", "layer_{i}/attn/query/kernel", *heads_in(h)),
        (attn + "k_proj.weight", "layer_{i}/attn/key/kernel", *heads_in(k)),
        (attn + "v_proj.weight", "layer_{i}/attn/value/kernel", *heads_in(k)),
        (attn + "o_proj.weight", "layer_{i}/attn/out/kernel", *heads_out),
        ("layers.{i}.post_attention_layernorm.weight",
         "layer_{i}/ln_1_post/scale" if gemma else "layer_{i}/ln_2/scale", same, same),
        ("layers.{i}.mlp.gate_proj.weight", "layer_{i}/mlp/wi_gate/kernel", t, t),
        ("layers.{i}.mlp.up_proj.weight", "layer_{i}/mlp/wi_up/kernel", t, t),
        ("layers.{i}.mlp.down_proj.weight", "layer_{i}/mlp/wo/kernel", t, t),
        ("norm.weight", "ln_f/scale", same, same),
    ]
    if gemma:
      rules += [("layers.{i}.pre_feedforward_layernorm.weight", "layer_{i}/ln_2/scale",
                 same, same),
                ("layers.{i}.post_feedforward_layernorm.weight", "layer_{i}/ln_2_post/scale",
                 same, same)]
    if m.get("qkv_bias"):
      rules += [(attn + f"{p}_proj.bias", f"layer_{{i}}/attn/{ours}/bias", *bias_heads(n))
                for p, ours, n in (("q", "query", h), ("k", "key", k), ("v", "value", k))]
    if m.get("qk_norm"):
      rules += [(attn + "q_norm.weight", "layer_{i}/attn/query_norm/scale", same, same),
                (attn + "k_norm.weight", "layer_{i}/attn/key_norm/scale", same, same)]
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
_PREFIXES = {"gpt2": "transformer.", "bert": "bert.",
             **{a: "model." for a in LLAMA_FAMILY + GEMMA_FAMILY}}
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
  d, h = fields["d_model"], fields["num_heads"]
  dh = fields.get("head_size") or d // h
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
  d, h = fields["d_model"], fields["num_heads"]
  dh = fields.get("head_size") or d // h
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
  prefix = {**_PREFIXES, "bert": "bert." if "mlm_head/bias" in params else ""}[arch]
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
  if arch in LLAMA_FAMILY + GEMMA_FAMILY:
    head_dim = m.get("head_size") or m["d_model"] // m["num_heads"]
    layer_types = [("sliding_attention" if _is_local(m, i) else "full_attention")
                   for i in range(m["num_layers"])]
    rope = {"rope_type": "default", "rope_theta": m["rope_theta"]}
    out = {**common, "model_type": arch,
           "architectures": [_CAUSAL_LM.get(arch, arch.capitalize() + "ForCausalLM")],
           "num_hidden_layers": m["num_layers"], "num_attention_heads": m["num_heads"],
           "num_key_value_heads": m["num_kv_heads"], "hidden_size": m["d_model"],
           "intermediate_size": m["d_ff"], "max_position_embeddings": m["max_len"],
           "rms_norm_eps": m["norm_eps"], "rope_theta": m["rope_theta"],
           "rope_parameters": rope, "tie_word_embeddings": m["tie_embeddings"],
           "attention_bias": False, "head_dim": head_dim, "attention_dropout": 0.0,
           "sliding_window": m.get("sliding_window") or None, "layer_types": layer_types}
    if arch in LLAMA_FAMILY:
      out.update(hidden_act="silu", mlp_bias=False)
      if arch in ("qwen2", "qwen3"):
        out.update(use_sliding_window=bool(m.get("sliding_window")), max_window_layers=0)
      if arch == "llama":
        del out["sliding_window"], out["layer_types"]
      if arch == "mistral":  # every layer local; with layer_types transformers reads Ministral
        del out["layer_types"]
      return out
    out.update(hidden_activation="gelu_pytorch_tanh",
               # transformers wants an int where the value is one
               query_pre_attn_scalar=_number(m.get("query_pre_attn_scalar") or head_dim),
               attn_logit_softcapping=m.get("attn_softcap") or None,
               final_logit_softcapping=m.get("final_softcap") or None)
    if arch == "gemma3_text":
      out["rope_parameters"] = {"full_attention": rope, "sliding_attention": {
          "rope_type": "default",
          "rope_theta": m.get("rope_local_theta") or m["rope_theta"]}}
      out["use_bidirectional_attention"] = False
    return out
  return {**common, "model_type": "bert",
          "architectures": ["BertForMaskedLM" if has_mlm_head else "BertModel"],
          "num_hidden_layers": m["num_layers"], "num_attention_heads": m["num_heads"],
          "hidden_size": m["d_model"], "intermediate_size": m["d_ff"],
          "max_position_embeddings": m["max_len"], "type_vocab_size": max(m["type_vocab_size"], 1),
          "layer_norm_eps": m["norm_eps"], "hidden_act": "gelu" if m["mlp"] == "gelu" else
          "gelu_new", "position_embedding_type": "absolute", "hidden_dropout_prob": 0.0,
          "attention_probs_dropout_prob": 0.0}


def _number(x):
  return int(x) if float(x).is_integer() else float(x)


_CAUSAL_LM = {"gemma3_text": "Gemma3ForCausalLM"}


def _is_local(m, i):
  window, every = m.get("sliding_window"), m.get("global_every")
  return bool(window) and (not every or (i + 1) % every != 0)


def _decoder_family(m):
  """Which Hugging Face decoder a RoPE decoder's fields make (or a UserError)."""
  gemma = {"norm": "rmsnorm_1p", "norm_position": "sandwich", "mlp": "geglu",
           "embed_scale": True, "tie_embeddings": True}
  if m.get("norm_position") == "sandwich" or m.get("embed_scale"):
    arch = "gemma3_text" if m.get("qk_norm") else "gemma2"
    wanted = {**gemma, "use_bias": False, "qkv_bias": False}
    if arch == "gemma2":
      wanted["rope_local_theta"] = 0.0
    else:
      wanted["attn_softcap"] = 0.0
    return arch, wanted
  wanted = {"norm": "rmsnorm", "norm_position": "pre", "mlp": "swiglu", "use_bias": False,
            "attn_softcap": 0.0, "final_softcap": 0.0, "query_pre_attn_scalar": 0.0,
            "rope_local_theta": 0.0}
  if m.get("qk_norm"):
    return "qwen3", {**wanted, "qkv_bias": False, "global_every": 0}
  if m.get("qkv_bias"):
    return "qwen2", {**wanted, "global_every": 0}
  if m.get("sliding_window"):
    return "mistral", {**wanted, "global_every": 0}
  return "llama", wanted


_PLAIN = {"qkv_bias": False, "qk_norm": False, "sliding_window": 0, "embed_scale": False,
          "attn_softcap": 0.0, "final_softcap": 0.0, "query_pre_attn_scalar": 0.0,
          "head_size": 0}  # what GPT-2 and BERT have


def exportable_as(fields, architecture):
  """The Hugging Face architecture an lm model (a task's `architecture`: decoder, encoder or
  encoder_decoder) is, or a UserError naming what does not fit."""
  m = fields
  def check(arch, wanted):
    defaults = {"qkv_bias": False, "qk_norm": False, "sliding_window": 0, "global_every": 0,
                "embed_scale": False, "attn_softcap": 0.0, "final_softcap": 0.0,
                "query_pre_attn_scalar": 0.0, "rope_local_theta": 0.0, "head_size": 0}
    value = lambda k: m.get(k, defaults.get(k))
    wrong = [f"model.{k}={value(k)!r} (wants {v!r})" for k, v in wanted.items()
             if value(k) != v]
    if wrong:
      raise UserError(f"this model cannot be exported as {arch}: {', '.join(wrong)}")
    return arch
  if architecture == "encoder_decoder":
    raise UserError("lm exports decoders (as gpt2, llama, mistral, qwen2, qwen3, gemma2 or "
                    "gemma3_text) and encoders (as bert), not "
                    "encoder-decoders")
  if architecture == "decoder":
    if m["positions"] == "rope":
      return check(*_decoder_family(m))
    check("gpt2", {"norm": "layernorm", "norm_position": "pre", "use_bias": True,
                   "tie_embeddings": True, "num_kv_heads": m["num_heads"], **_PLAIN})
    if m["mlp"] not in ("gelu", "gelu_tanh"):
      raise UserError(f"this model cannot be exported as gpt2: model.mlp={m['mlp']!r}")
    return "gpt2"
  return check("bert", {"norm": "layernorm", "norm_position": "post", "positions": "learned",
                        "use_bias": True, "num_kv_heads": m["num_heads"], "mlp": "gelu",
                        **_PLAIN})
