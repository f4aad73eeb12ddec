"""Hugging Face config.json <-> lm's config.model fields, per architecture: which fields a
checkpoint's config makes (`model_fields`), the config.json transformers builds an lm model
from (`hf_config`), and which architecture an lm model exports as (`exportable_as`).
lm/interop/hf_models.py maps the tensors.

Layer kinds (a sliding window or the whole context) come from config.json's `layer_types`,
or each family's own default rule; lm has every layer local, or every n-th global.
"""

from lm.errors import UserError

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
GEMMA_FAMILY = ("gemma2", "gemma3_text")
ARCHITECTURES = ("gpt2", "bert") + LLAMA_FAMILY + GEMMA_FAMILY

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
