"""Looking inside a decoder: attention maps, head roles, the logit lens, per-token losses
(also as coloured HTML text), embedding neighbours.

Functions return numpy arrays; the `plot_*` functions turn them into matplotlib figures with
titled axes and token labels (the notebooks in colab/ call these, so nothing important lives
only in a notebook). The model records its attention weights and residual stream into flax's
"intermediates" collection only when asked to (`mutable=["intermediates"]`), at no cost
otherwise.
"""

import html
import json

import jax
import jax.numpy as jnp
import numpy as np


def _intermediates(model, params, tokens):
  tokens_1xL = jnp.asarray(np.asarray(tokens, np.int32)[None])
  logits, state = model.apply({"params": params}, tokens_1xL, mutable=["intermediates"])
  return np.asarray(logits[0]), jax.device_get(state["intermediates"])


def _per_layer(model, inter, path):
  """[layers, ...] of a value sown under `path` in each block (looped or scanned layers)."""
  if model.cfg.scan_layers:  # sown once inside nn.scan: stacked on a leading layers axis
    node = inter["layers"]
    for key in path:
      node = node[key]
    return np.asarray(node[0])[:, 0]
  out = []
  for i in range(model.cfg.num_layers):
    node = inter
    for key in ((f"layer_{i}",) + path[1:] if path[0] == "block" else (f"{path[0]}_{i}",)):
      node = node[key]
    out.append(np.asarray(node[0])[0])
  return np.stack(out)


def attention_maps(model, params, tokens):
  """Attention weights [layers, heads, L, L] for one token sequence (rows sum to 1)."""
  _, inter = _intermediates(model, params, tokens)
  return _per_layer(model, inter, ("block", "attn", "attention"))


def residual_stream(model, params, tokens):
  """The residual stream after every block: [layers, L, d_model]."""
  _, inter = _intermediates(model, params, tokens)
  return _per_layer(model, inter, ("residual",))


def _final_norm(cfg, params, x):
  scale = np.asarray(params["ln_f"]["scale"], np.float64)
  if cfg.norm == "rmsnorm":
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * scale
  centred = x - x.mean(-1, keepdims=True)
  y = centred / np.sqrt(np.mean(centred ** 2, -1, keepdims=True) + cfg.norm_eps) * scale
  return y + np.asarray(params["ln_f"]["bias"]) if "bias" in params["ln_f"] else y


def logit_lens(model, params, tokens):
  """Logits [layers, L, V] read from every block's residual stream through the model's final
  norm and unembedding (nostalgebraist's logit lens); the last layer's are the model's own."""
  cfg = model.cfg
  x = residual_stream(model, params, tokens).astype(np.float64)
  h = _final_norm(cfg, params, x)
  if cfg.tie_embeddings:
    unembed = np.asarray(params["embed"]["embedding"], np.float64).T
  else:
    unembed = np.asarray(params["lm_head"]["kernel"], np.float64)
  logits = h @ unembed
  if "lm_head" in params and "bias" in params["lm_head"]:
    logits = logits + np.asarray(params["lm_head"]["bias"])
  return logits


def top_tokens(logits, tokenizer, k=1):
  """For logits [..., V]: the decoded top-k tokens and their probabilities."""
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  order = np.argsort(-probs, axis=-1)[..., :k]
  texts = np.vectorize(lambda i: tokenizer.decode([int(i)]))(order)
  return texts, np.take_along_axis(probs, order, -1)


def token_losses(model, params, tokens):
  """Next-token loss (nats) of tokens[1:], each predicted from the tokens before it."""
  logits, _ = _intermediates(model, params, tokens)
  logits = logits[:-1].astype(np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  return -logp[np.arange(len(tokens) - 1), np.asarray(tokens[1:])]


def token_losses_html(losses, tokenizer, tokens, scale=None):
  """The text of tokens[1:] with each token's background red in proportion to its loss
  (nats; `scale` = full red, default the largest), its loss shown on hover."""
  scale = float(scale or max(float(np.max(losses)), 1e-9))
  spans = []
  for token, loss in zip(tokens[1:], losses):
    text = html.escape(tokenizer.decode([int(token)])).replace("\n", "&#8629;\n")
    alpha = min(float(loss) / scale, 1.0)
    spans.append(f'<span title="{loss:.2f} nats" style="background: rgba(220, 40, 40, '
                 f'{alpha:.2f})">{text}</span>')
  return ('<pre style="white-space: pre-wrap; line-height: 1.6">' + "".join(spans)
          + "</pre>")


def head_roles(maps):
  """How much each head [layers, heads] attends, on average over the queries that have a
  choice (positions 1 on), to the previous token, to the first token and to itself: the
  simplest roles heads take."""
  n = maps.shape[-1]
  queries = np.arange(1, n)
  return {"previous token": maps[..., queries, queries - 1].mean(-1),
          "first token": maps[..., queries, 0].mean(-1),
          "itself": maps[..., queries, queries].mean(-1)}


def embedding_neighbours(params, tokenizer, token_id, k=8):
  """The k tokens whose input embeddings are closest (cosine) to token_id's."""
  e = np.asarray(params["embed"]["embedding"], np.float64)
  e = e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
  sims = e @ e[token_id]
  order = [i for i in np.argsort(-sims) if i != token_id][:k]
  return [(tokenizer.decode([int(i)]) or repr(int(i)), float(sims[i])) for i in order]


def read_metrics(path):
  """{"train/loss": (steps, values), "eval/loss": ...} from a workdir's metrics.jsonl."""
  curves = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      record = json.loads(line)
      for key, value in record.items():
        if key.endswith("loss"):
          curves.setdefault(key, ([], []))
          curves[key][0].append(record["step"])
          curves[key][1].append(value)
  return curves


# Figures.


def _labels(tokenizer, tokens):
  return [repr(tokenizer.decode([int(t)]))[1:-1] or f"<{int(t)}>" for t in tokens]


def plot_attention(maps, tokenizer, tokens, layer, heads=None):
  """Heatmaps of one layer's heads: query tokens down, key tokens across."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  heads = list(range(maps.shape[1])) if heads is None else list(heads)
  labels = _labels(tokenizer, tokens)
  side = max(3.2, 0.13 * len(labels) + 1.0)  # room for every token label
  fig, axes = plt.subplots(1, len(heads), figsize=(side * len(heads) + 1.2, side + 0.8),
                           squeeze=False, layout="constrained")
  for k, (ax, h) in enumerate(zip(axes[0], heads)):
    image = ax.imshow(maps[layer, h], cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_title(f"layer {layer}, head {h}")
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query" if k == 0 else "")
  fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="attention weight")
  return fig


def plot_logit_lens(lens_logits, tokenizer, tokens):
  """Top-1 token and its probability at every layer (rows) and position (columns)."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  texts, probs = top_tokens(lens_logits, tokenizer, k=1)
  layers, length = probs.shape[:2]
  fig, ax = plt.subplots(figsize=(0.6 * length + 2, 0.45 * layers + 1.5))
  image = ax.imshow(probs[..., 0], cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
  for i in range(layers):
    for j in range(length):
      ax.text(j, i, repr(str(texts[i, j, 0]))[1:-1], ha="center", va="center", fontsize=7)
  ax.set_xticks(range(length), _labels(tokenizer, tokens), rotation=90, fontsize=7)
  ax.set_yticks(range(layers), [f"after block {i}" for i in range(layers)], fontsize=7)
  ax.set_xlabel("input token (prediction is for the next one)")
  ax.set_ylabel("layer")
  ax.set_title("logit lens: top next-token guess per layer")
  fig.colorbar(image, ax=ax, label="probability")
  return fig


def plot_token_losses(losses, tokenizer, tokens):
  """Each predicted token as a bar coloured and sized by its loss."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  labels = _labels(tokenizer, tokens[1:])
  fig, ax = plt.subplots(figsize=(0.35 * len(labels) + 2, 3.2))
  colours = plt.get_cmap("Reds")(np.clip(losses / max(losses.max(), 1e-9), 0.0, 1.0))
  ax.bar(range(len(labels)), losses, color=colours)
  ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
  ax.set_xlabel("predicted token")
  ax.set_ylabel("loss (nats)")
  ax.set_title(f"per-token loss, mean {losses.mean():.3f} nats")
  return fig


def plot_metrics(curves):
  """Training and evaluation loss curves from read_metrics()."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for key, (steps, values) in sorted(curves.items()):
    ax.plot(steps, values, marker="o" if len(steps) < 30 else None, label=key)
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats per token)")
  ax.set_title("loss curves")
  ax.legend()
  return fig
