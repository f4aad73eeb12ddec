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

The configs' side (config.json <-> config.model fields, which architecture an lm model
exports as) is lm/interop/hf_configs.py, whose names this module also offers.
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
from lm.interop.hf_configs import (ARCHITECTURES, GEMMA_FAMILY, LLAMA_FAMILY, architecture,
                                   exportable_as, hf_config, model_fields)

__all__ = ["ARCHITECTURES", "architecture", "exportable_as", "hf_config", "model_fields",
           "to_hf", "to_lm"]

_SKIPPED = (r"(.*\.)?attn\.(masked_)?bias", r".*rotary_emb\.inv_freq",
            r"(.*\.)?embeddings\.position_ids", r"cls\.seq_relationship\..*")


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
