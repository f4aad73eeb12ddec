"""lm/inspect.py: attention maps, logit lens, per-token losses, neighbours and figures."""

import io
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import pytest

from lm import inspect
from lm.data import ByteTokenizer, CharTokenizer
from lm.models import Decoder, ModelConfig

matplotlib.use("Agg")
TEXT = "to be or not to be"


@pytest.fixture(scope="module", params=["layernorm", "rmsnorm"])
def setup(request):
  tok = CharTokenizer.train([TEXT])
  cfg = ModelConfig(vocab_size=tok.vocab_size, num_layers=3, num_heads=4, num_kv_heads=2,
                    d_model=32, d_ff=64, max_len=32, positions="rope", norm=request.param,
                    use_bias=request.param == "layernorm")
  model = Decoder(cfg)
  params = nn.unbox(model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"])
  return model, params, tok, [tok.bos_id, *tok.encode(TEXT).tolist()]


def test_attention_rows_sum_to_one_and_respect_the_causal_mask(setup):
  model, params, _, tokens = setup
  maps = inspect.attention_maps(model, params, tokens)
  n = len(tokens)
  assert maps.shape == (3, 4, n, n)
  np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)
  assert np.all(maps[..., np.triu_indices(n, 1)[0], np.triu_indices(n, 1)[1]] == 0.0)
  assert maps[0, 0, 0, 0] == pytest.approx(1.0)  # the first token can only see itself


def test_logit_lens_at_the_last_layer_is_the_models_own_logits(setup):
  model, params, _, tokens = setup
  lens = inspect.logit_lens(model, params, tokens)
  own = np.asarray(model.apply({"params": params}, jnp.asarray([tokens])))[0]
  assert lens.shape == (3,) + own.shape
  np.testing.assert_allclose(lens[-1], own, atol=1e-4)
  assert not np.allclose(lens[0], own, atol=1e-2)  # earlier layers read differently


def test_token_losses_match_a_direct_cross_entropy(setup):
  model, params, _, tokens = setup
  losses = inspect.token_losses(model, params, tokens)
  logits = np.asarray(model.apply({"params": params}, jnp.asarray([tokens])))[0, :-1]
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  np.testing.assert_allclose(losses, -np.log(probs[np.arange(len(tokens) - 1), tokens[1:]]),
                             rtol=1e-4)


def test_embedding_neighbours_are_ranked_by_cosine(setup):
  _, params, tok, _ = setup
  neighbours = inspect.embedding_neighbours(params, tok, int(tok.encode("t")[0]), k=4)
  sims = [s for _, s in neighbours]
  assert len(neighbours) == 4 and sims == sorted(sims, reverse=True)
  assert all(-1.0 <= s <= 1.0 for s in sims)


def test_figures_are_labelled_png_images(setup, tmp_path):
  model, params, tok, tokens = setup
  figures = [
      inspect.plot_attention(inspect.attention_maps(model, params, tokens), tok, tokens, 1),
      inspect.plot_logit_lens(inspect.logit_lens(model, params, tokens), tok, tokens),
      inspect.plot_token_losses(inspect.token_losses(model, params, tokens), tok, tokens),
  ]
  metrics = tmp_path / "metrics.jsonl"
  metrics.write_text("\n".join(json.dumps({"step": s, "train/loss": 3.0 - 0.1 * s})
                               for s in range(1, 6)))
  figures.append(inspect.plot_metrics(inspect.read_metrics(str(metrics))))
  for fig in figures:
    ax = fig.axes[0]
    assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    assert buffer.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
  labels = [t.get_text() for t in figures[0].axes[0].get_xticklabels()]
  assert labels[1:4] == ["t", "o", " "]  # token labels on the axes
  # The logit lens writes each cell's top token as the text it decodes to.
  decoded = {repr(tok.decode([i]))[1:-1] for i in range(tok.vocab_size)}
  cells = [t.get_text() for t in figures[1].axes[0].texts]
  assert len(cells) == 3 * len(tokens) and set(cells) <= decoded


def test_head_roles_recognise_constructed_heads():
  n = 5
  previous = np.zeros((n, n))
  previous[0, 0] = 1.0
  previous[np.arange(1, n), np.arange(n - 1)] = 1.0
  maps = np.stack([np.eye(n), previous, np.tril(np.ones((n, n))) / np.arange(1, n + 1)[:, None]])
  roles = inspect.head_roles(maps[None])  # one layer, three heads
  np.testing.assert_allclose(roles["itself"][0], [1.0, 0.0, np.mean(1 / np.arange(2, n + 1))])
  np.testing.assert_allclose(roles["previous token"][0],
                             [0.0, 1.0, np.mean(1 / np.arange(2, n + 1))])
  np.testing.assert_allclose(roles["first token"][0], [0.0, 0.25, np.mean(1 / np.arange(2, n + 1))])


def test_token_losses_html_colours_each_token_and_escapes_the_text():
  tok = ByteTokenizer()
  ids = [tok.bos_id, *tok.encode("if a<b:\n").tolist()]
  losses = np.linspace(0.0, 2.0, len(ids) - 1)
  page = inspect.token_losses_html(losses, tok, ids)
  assert page.count("<span") == len(ids) - 1 == 8
  assert "rgba(220, 40, 40, 0.00)" in page and "rgba(220, 40, 40, 1.00)" in page
  assert f'title="{losses[3]:.2f} nats"' in page
  assert "&lt;" in page and "a<b" not in page  # the text is escaped, not markup
