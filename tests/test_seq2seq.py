"""The encoder-decoder (lm/models/encoder_decoder.py) and the seq2seq objective: padding of
the source is invisible, the decoder is causal, scanned and looped layers agree, label
smoothing matches numpy, and a toy translation trains through the loop."""

import json
import random
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, tiny_config, user_env

from lm import objectives, report, search, trees
from lm.data import examples
from lm.inference import load
from lm.loop import run
from lm.models import ModelConfig
from lm.models.encoder_decoder import EncoderDecoder

VOCAB = 30


def model(**fields):
  c = tiny_config(**{"model.use_bias": True, **{f"model.{k}": v for k, v in fields.items()}})
  cfg = ModelConfig.from_config(c.model, VOCAB, "cpu")
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
  stacked = trees.nest(trees.stack_layers(trees.flatten(params)))
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


# Search (lm/search.py).

def markov_step(table):
  """A toy model: the next token's logits depend on the last token only."""
  def step(tokens_N, cache):
    return table[tokens_N], cache
  return step


def exhaustive_best(logp, bos, eos, max_len, alpha):
  """Every sequence of up to max_len tokens (ending in eos, or cut at max_len), scored."""
  best = (-np.inf, None)
  frontier = [((), 0.0, bos)]
  for length in range(1, max_len + 1):
    grown = []
    for seq, score, last in frontier:
      for token in range(logp.shape[1]):
        s = score + logp[last, token]
        if token == eos or length == max_len:
          final = s / search.length_penalty(length, alpha) if token == eos else -np.inf
          best = max(best, (final, seq + (token,)), key=lambda x: x[0])
        else:
          grown.append((seq + (token,), s, token))
    frontier = grown
  return best


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beam_search_finds_the_best_hypothesis_of_a_toy_model(alpha):
  rng = np.random.default_rng(4)
  v, bos, eos, max_len = 5, 0, 1, 4
  logits = rng.normal(0, 2, (v, v)).astype(np.float32)
  logp = np.asarray(jax.nn.log_softmax(logits))
  want_score, want = exhaustive_best(logp, bos, eos, max_len, alpha)
  # A beam as wide as every hypothesis is exact.
  k = v ** max_len
  table = jnp.asarray(logits)
  tokens, scores, lengths = jax.jit(lambda c: search.beam_search_core(
      markov_step(table), c, table[jnp.full((k,), bos)], lambda c, r: c, 1, k, max_len, eos,
      alpha))(jnp.zeros(()))
  assert tuple(int(x) for x in tokens[0, 0, :lengths[0, 0]]) == want
  np.testing.assert_allclose(float(scores[0, 0]), want_score, rtol=1e-5)
  assert np.all(np.diff(np.asarray(scores[0])) <= 1e-6)  # best first


def test_beam_search_beats_greedy_where_greedy_is_short_sighted():
  # bos -> a 0.6 | b 0.4; a -> c 0.7 | eos 0.3; c -> eos 0.6 | a 0.4; b -> eos 0.99.
  # Greedy takes a, c, eos (0.6 * 0.7 * 0.6 = 0.252); "b eos" is better (0.396).
  names = ["bos", "eos", "a", "b", "c"]
  p = np.full((5, 5), 1e-6)
  p[0, 2], p[0, 3] = 0.6, 0.4
  p[2, 1], p[2, 4] = 0.3, 0.7
  p[3, 1] = 0.99
  p[4, 1], p[4, 2] = 0.6, 0.4
  table = jnp.asarray(np.log(p / p.sum(1, keepdims=True)), jnp.float32)
  g_tokens, g_lengths = search.greedy_core(markov_step(table), jnp.zeros(()),
                                           table[jnp.array([0])], 3, 1)
  assert [names[t] for t in g_tokens[0, :g_lengths[0]]] == ["a", "c", "eos"]
  tokens, _, lengths = search.beam_search_core(markov_step(table), jnp.zeros(()),
                                               table[jnp.array([0, 0])], lambda c, r: c, 1,
                                               2, 3, 1)
  assert [names[t] for t in tokens[0, 0, :lengths[0, 0]]] == ["b", "eos"]


@pytest.fixture(scope="module")
def trained_toy(toy_parallel, tmp_path_factory):
  """The toy translation model after a short training (shared by the decoding tests)."""
  workdir = str(tmp_path_factory.mktemp("toy_run"))
  c = tiny_config(**{"task.objective": "seq2seq", "data.path": toy_parallel,
                     "data.format": "parallel", "data.seq_len": 40, "model.max_len": 40,
                     "model.d_model": 64, "model.d_ff": 128, "train.batch_size": 16,
                     "train.num_steps": 300, "train.eval_every": 300, "train.log_every": 100,
                     "train.checkpoint_every": 300, "train.learning_rate": 3e-3,
                     "train.warmup_steps": 10, "task.label_smoothing": 0.1,
                     "sample.num_tokens": 0})
  result = run(c, workdir, devices=jax.devices()[:1])
  return workdir, result


@pytest.mark.slow  # trains the toy translation model: 300 steps
def test_a_toy_translation_trains_through_the_loop(trained_toy):
  _, result = trained_toy
  # Characters of the target given the source: near-certain once the word map is learnt.
  assert result.eval["test"]["accuracy"] > 0.85, result.eval
  assert result.eval["test"]["loss"] < 0.6
  # Beam-search translations of the test split, scored by sacrebleu.
  assert result.eval["test"]["bleu"] > 70 and result.eval["test"]["chrf"] > 80, result.eval


@pytest.mark.slow  # trains the toy translation model: 300 steps
def test_cached_decoding_equals_uncached_and_beam_one_equals_greedy(trained_toy):
  workdir, _ = trained_toy
  loaded = load(workdir, decoder=False)
  tok, model, params = loaded.tokenizer, loaded.model, loaded.params
  texts = ["the big cat sees a dog", "red house", "a small blue tree runs"]
  sources = [[*tok.encode(t).tolist(), tok.eos_id] for t in texts]
  width = max(map(len, sources))
  ids = np.array([s + [tok.pad_id] * (width - len(s)) for s in sources], np.int32)
  segments = (np.arange(width)[None] < np.array([len(s) for s in sources])[:, None])
  segments = segments.astype(np.int32)
  max_len = 24
  greedy = search.translate_ids(model, params, ids, segments, max_len, tok.bos_id, tok.eos_id)
  # Uncached: the whole target prefix through the decoder at every step (same batch). The
  # prefix sits in a buffer of fixed width (the decoder is causal: what follows position t
  # changes nothing there), so the pass compiles once.
  apply = jax.jit(model.apply)
  prefix = np.full((len(texts), max_len + 1), tok.pad_id, np.int32)
  prefix[:, 0] = tok.bos_id
  finished = np.zeros(len(texts), bool)
  t = 0
  while t < max_len and not finished.all():
    logits = apply({"params": params}, ids, segments, prefix)
    nxt = np.where(finished, tok.pad_id, np.argmax(logits[:, t], -1))
    finished |= nxt == tok.eos_id
    prefix[:, t + 1] = nxt
    t += 1
  uncached = []
  for row in prefix[:, 1:t + 1].tolist():
    uncached.append(row[:row.index(tok.eos_id)] if tok.eos_id in row else row)
  assert greedy == uncached
  # The cached decoder's logits along the greedy path equal the uncached ones.
  from lm.models.encoder_decoder import init_cache  # pylint: disable=import-outside-toplevel
  v = {"params": params}
  memory = model.apply(v, ids[:1], segments[:1], method="encode")
  cache = init_cache(model.cfg, 1, max_len, width)
  path = ([tok.bos_id] + greedy[0])[:max_len]  # the cache has max_len slots
  stepwise = []
  for i, token in enumerate(path):
    logits, cache = model.apply(v, memory if i == 0 else None, segments[:1],
                                np.array([[token]], np.int32), cache=cache, method="decode")
    stepwise.append(logits[0, 0])
  whole = apply(v, ids[:1], segments[:1], np.array([path], np.int32))[0]
  chex.assert_trees_all_close(np.stack(stepwise), whole, atol=1e-5)
  tokens, _, lengths = search._beam(model, params, ids, segments, max_len, tok.bos_id,  # pylint: disable=protected-access
                                    tok.eos_id, 1, 0.0)
  assert search._cut(tokens[:, 0], lengths[:, 0], tok.eos_id) == greedy  # pylint: disable=protected-access
  assert tok.decode(greedy[1]) == "rot haus"


@pytest.mark.slow
def test_the_translate_command(trained_toy, toy_parallel, tmp_path):
  workdir, _ = trained_toy
  source = tmp_path / "in.en"
  source.write_text("the cat\nblue house sees a dog\n")
  (tmp_path / "ref.de").write_text("der katze\nblau haus sieht ein hund\n")
  out = subprocess.run([sys.executable, "-m", "lm.translate", f"--workdir={workdir}",
                        f"--input={source}", f"--output={tmp_path / 'out.de'}",
                        f"--reference={tmp_path / 'ref.de'}", "--beam_size=3"],
                       cwd=REPO, env=user_env(), capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert (tmp_path / "out.de").read_text() == "der katze\nblau haus sieht ein hund\n"
  assert json.loads(out.stdout.strip().splitlines()[-1])["bleu"] == 100.0
  # The notebooks' beam sweep (lm/report.py), in this process: the command's translations.
  sweep = report.beam_sweep(load(workdir, decoder=False), source.read_text().splitlines(),
                            (tmp_path / "ref.de").read_text().splitlines(), (1, 3))
  assert [r["beam_size"] for r in sweep] == [1, 3]
  assert sweep[1]["hypotheses"] == (tmp_path / "out.de").read_text().splitlines()
  assert sweep[1]["bleu"] == pytest.approx(100.0) and sweep[1]["seconds"] > 0
  bad = subprocess.run([sys.executable, "-m", "lm.translate", f"--workdir={workdir}",
                        f"--input={tmp_path / 'missing'}", f"--output={tmp_path / 'x'}"],
                       cwd=REPO, env=user_env(), capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and "cannot read" in bad.stderr


# Span corruption (lm/data/examples.py).

def test_span_corruption_can_be_undone_and_has_t5s_proportions():
  class Tok:  # the ids the example needs
    vocab_size, pad_id, bos_id, eos_id = 50, 0, 1, 2

  rng = np.random.default_rng(0)
  ids = rng.integers(3, 50, 100).astype(np.int32)
  window = {"inputs": np.concatenate([ids, np.zeros(28, np.int32)]),
            "segment_ids": np.concatenate([np.ones(100, np.int32), np.zeros(28, np.int32)])}
  out = examples.span_corruption_example(window, Tok, 10, np.random.default_rng(1), 128)
  source = out["source"][out["source_segment_ids"] > 0].tolist()
  target = out["targets"][out["segment_ids"] > 0].tolist()
  assert source[-1] == target[-1] == Tok.eos_id
  sentinels = [t for t in source if t >= Tok.vocab_size]
  assert sentinels == list(range(50, 50 + len(sentinels))) and 3 <= len(sentinels) <= 10
  # Putting every span back where its sentinel stands gives the window's tokens again.
  spans, current = {}, None
  for t in target[:-1]:
    if t >= Tok.vocab_size:
      current = spans.setdefault(t, [])
    else:
      current.append(t)
  restored = [x for t in source[:-1] for x in (spans[t] if t in spans else [t])]
  assert restored == ids.tolist()
  assert sum(map(len, spans.values())) == 15  # 15% noise
  # The decoder reads bos + the target, shifted.
  assert out["inputs"][0] == Tok.bos_id
  np.testing.assert_array_equal(out["inputs"][1:len(target)], target[:-1])


@pytest.mark.slow
def test_span_corruption_pretraining_feeds_a_translation_model(toy_parallel, tmp_path,
                                                               one_device):
  pretrain = tiny_config(**{"task.objective": "span_corruption", "model.extra_tokens": 8,
                            "data.seq_len": 32, "model.max_len": 32, "train.num_steps": 4,
                            "train.eval_every": 4, "train.checkpoint_every": 4,
                            "sample.num_tokens": 0})
  result = run(pretrain, str(tmp_path / "pretrain"), devices=one_device)
  assert np.isfinite(result.eval["validation"]["loss"])
  assert 0 < result.eval["validation"]["accuracy"] < 1
  # The translation run takes its architecture (extra tokens included) and its weights.
  finetune = tiny_config(**{"task.objective": "seq2seq", "data.path": toy_parallel,
                            "data.format": "parallel", "data.seq_len": 32,
                            "train.num_steps": 2, "train.eval_every": 2,
                            "train.checkpoint_every": 2, "sample.num_tokens": 0,
                            "task.beam_size": 1, "task.bleu_sentences": 3})
  finetune.init_from = str(tmp_path / "pretrain")
  finetune.data.tokenizer = "pretrained"
  tuned = run(finetune, str(tmp_path / "finetune"), devices=one_device)
  assert tuned.config.model.extra_tokens == 8
  assert np.isfinite(tuned.eval["test"]["bleu"])
  assert tuned.eval["test"]["sentences"] == 3  # task.bleu_sentences: a quicker figure
