"""The encoder-decoder (lm/models/encoder_decoder.py) and the seq2seq objective: padding of
the source is invisible, the decoder is causal, scanned and looped layers agree, label
smoothing matches numpy, and a toy translation trains through the loop."""

import random

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from lm import objectives, pretrained
from lm.loop import run
from lm.models import ModelConfig
from lm.models.encoder_decoder import EncoderDecoder

VOCAB = 30


def model(**fields):
  c = tiny_config(**{"model.use_bias": True, **{f"model.{k}": v for k, v in fields.items()}})
  cfg = ModelConfig.from_config(c.model, VOCAB)
  m = EncoderDecoder(cfg)
  tokens = jnp.ones((1, 6), jnp.int32)
  params = nn.unbox(m.init(jax.random.key(0), tokens, tokens, tokens)["params"])
  return m, params


def example(seed=0):
  rng = np.random.default_rng(seed)
  source = rng.integers(3, VOCAB, (2, 7)).astype(np.int32)
  source_segments = np.array([[1] * 7, [1] * 4 + [0] * 3], np.int32)  # row 1: 3 pads
  target = rng.integers(3, VOCAB, (2, 5)).astype(np.int32)
  return source, source_segments, target


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_padded_source_positions_are_invisible(norm_position):
  m, params = model(norm_position=norm_position)
  source, segments, target = example()
  apply = jax.jit(m.apply)
  logits = apply({"params": params}, source, segments, target)
  # Other tokens in row 1's padding change nothing ...
  changed = source.copy()
  changed[1, 4:] = [5, 6, 7]
  chex.assert_trees_all_close(apply({"params": params}, changed, segments, target), logits,
                              atol=1e-6)
  # ... nor does dropping the padding (row 1 alone, 4 real source tokens).
  alone = apply({"params": params}, source[1:, :4], segments[1:, :4], target[1:])
  chex.assert_trees_all_close(alone[0], logits[1], atol=1e-5)
  # A real source token does change the output.
  changed = source.copy()
  changed[1, 0] = (source[1, 0] + 1) % VOCAB
  assert np.abs(apply({"params": params}, changed, segments, target)[1] - logits[1]).max() > 1e-4


def test_the_decoder_is_causal_and_memory_comes_from_encode():
  m, params = model()
  source, segments, target = example(1)
  v = {"params": params}
  apply = jax.jit(m.apply)
  logits = apply(v, source, segments, target)
  later = target.copy()
  later[:, 3:] = 1
  chex.assert_trees_all_close(apply(v, source, segments, later)[:, :3], logits[:, :3],
                              atol=1e-6)
  memory = jax.jit(lambda v, s, g: m.apply(v, s, g, method="encode"))(v, source, segments)
  chex.assert_shape(memory, (2, 7, 32))
  decode = jax.jit(lambda v, mem, g, t: m.apply(v, mem, g, t, method="decode"))
  chex.assert_trees_all_close(decode(v, memory, segments, target), logits, atol=1e-6)


def test_scanned_layers_equal_looped_layers():
  looped, params = model()
  scanned, _ = model(scan_layers=True)
  stacked = pretrained._nest(pretrained.stack_layers(pretrained._flat(params)))  # pylint: disable=protected-access
  source, segments, target = example(2)
  chex.assert_trees_all_close(
      jax.jit(scanned.apply)({"params": stacked}, source, segments, target),
      jax.jit(looped.apply)({"params": params}, source, segments, target), atol=1e-5)


def test_label_smoothing_loss_equals_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
  targets = rng.integers(0, 5, (2, 3))
  weights = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
  e = 0.1
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  soft = np.full((2, 3, 5), e / 5)
  soft[np.arange(2)[:, None], np.arange(3)[None, :], targets] += 1 - e
  want = -(soft * log_p).sum(-1)
  loss, weight = objectives.token_loss(jnp.asarray(logits), jnp.asarray(targets),
                                       jnp.asarray(weights), label_smoothing=e)
  np.testing.assert_allclose(float(loss), (want * weights).sum(), rtol=1e-5)
  assert float(weight) == 3.0


@pytest.fixture(scope="module")
def toy_parallel(tmp_path_factory):
  """Word-for-word 'translation' of random phrases: learnable in a few hundred steps."""
  folder = tmp_path_factory.mktemp("parallel")
  en = "the a cat dog sees runs big small red blue house tree".split()
  de = "der ein katze hund sieht rennt gross klein rot blau haus baum".split()
  rng = random.Random(0)
  for split, n in (("train", 300), ("val", 30), ("test", 30)):
    phrases = [[rng.randrange(len(en)) for _ in range(rng.randint(2, 5))] for _ in range(n)]
    (folder / f"{split}.en").write_text("".join(" ".join(en[i] for i in p) + "\n"
                                                for p in phrases))
    (folder / f"{split}.de").write_text("".join(" ".join(de[i] for i in p) + "\n"
                                                for p in phrases))
  return str(folder)


def test_a_toy_translation_trains_through_the_loop(toy_parallel, tmp_path, one_device):
  c = tiny_config(**{"task.objective": "seq2seq", "data.path": toy_parallel,
                     "data.format": "parallel", "data.seq_len": 32, "model.max_len": 32,
                     "model.d_model": 64, "model.d_ff": 128, "train.batch_size": 16,
                     "train.num_steps": 150, "train.eval_every": 150, "train.log_every": 50,
                     "train.checkpoint_every": 150, "train.learning_rate": 3e-3,
                     "train.warmup_steps": 10, "task.label_smoothing": 0.1,
                     "sample.num_tokens": 0})
  result = run(c, str(tmp_path), devices=one_device)
  # Characters of the target given the source: near-certain once the word map is learnt.
  assert result.eval["test"]["accuracy"] > 0.85, result.eval
  assert result.eval["test"]["loss"] < 0.6
