"""Fine-tuning through the loop: task heads learn, init_from loads a pretrained body, the
head's own learning rate, early stopping and the best checkpoint, and sweeps."""

import json
import os

import chex
import jax
import ml_collections
import numpy as np
import pytest
from conftest import tiny_config

from lm import pretrained, report, sharding, tasks
from lm.checkpoint import Checkpointer
from lm.config import ConfigError
from lm.data import make_data
from lm.data.examples import classification_example
from lm.errors import UserError
from lm.inference import load
from lm.loop import run
from lm.sweep import format_table, parse_sweeps, sweep
from lm.train import Trainer, make_optimizer

WORDS = {"good": 1, "great": 1, "fine": 1, "bad": 0, "awful": 0, "poor": 0}
SUBJECTS = ["the film", "this movie", "it", "the plot"]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
  """Sentiment by one word; dev holds the training sentences (the head must overfit)."""
  folder = tmp_path_factory.mktemp("labelled")
  rows = [(f"{s} was {w}", label) for s in SUBJECTS for w, label in WORDS.items()]
  for split in ("train", "dev"):
    with open(folder / f"{split}.tsv", "w", encoding="utf-8") as f:
      f.write("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
  return str(folder)


@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
  """CoNLL: capitalised words are NAME, the rest O."""
  folder = tmp_path_factory.mktemp("tagged")
  sentences = [["Ada", "met", "Bob", "in", "Paris"], ["we", "saw", "Rome"],
               ["Carl", "likes", "tea"], ["they", "left", "Oslo", "today"]]
  text = "-DOCSTART- O\n\n" + "\n\n".join(
      "\n".join(f"{w} X {'NAME' if w[0].isupper() else 'O'}" for w in s) for s in sentences)
  for split in ("train", "dev"):
    (folder / f"{split}.conll").write_text(text + "\n", encoding="utf-8")
  return str(folder)


def task_config(path, objective, fmt, **overrides):
  c = tiny_config(**{"task.objective": objective, "data.path": path, "data.format": fmt,
                     "train.learning_rate": 3e-3, "train.min_learning_rate": 3e-4,
                     "train.warmup_steps": 5, "train.num_steps": 60, "train.eval_every": 30,
                     "train.checkpoint_every": 1000, "train.log_every": 30,
                     "sample.num_tokens": 0, "data.seq_len": 24, "model.use_bias": True,
                     **overrides})
  return c


def test_classification_head_overfits_a_tiny_labelled_set(labelled, tmp_path, one_device):
  config = task_config(labelled, "classification", "labelled", **{"model.pooler": True})
  result = run(config, str(tmp_path / "run"), devices=one_device)
  assert result.eval["validation"]["accuracy"] == 1.0
  assert result.eval["validation"]["examples"] == len(SUBJECTS) * len(WORDS)
  assert result.eval["validation"]["macro_f1"] == 1.0
  # The best checkpoint is kept apart, and is what the final figures describe.
  best = Checkpointer(str(tmp_path / "run"), 1, folder="best")
  assert best.all_steps() == [result.best["step"]]
  assert best.read_meta(result.best["step"])["best"]["validation"]["accuracy"] == 1.0
  # lm.report.classify on the loaded workdir: padded, bucketed batches give each text's own
  # probabilities (one unpadded row at a time through the model), and the run's accuracy.
  loaded = load(str(tmp_path / "run"), decoder=False)
  assert loaded.label_names == ("0", "1")
  texts = [f"{s} was {w}" for s in SUBJECTS for w in WORDS][:7]
  probs = report.classify(loaded, texts, batch_size=4)
  chex.assert_shape(probs, (7, 2))
  apply = jax.jit(lambda x: loaded.model.apply({"params": loaded.params}, x))
  for text, row in zip(texts, probs):
    example = classification_example({"text": text, "label": 0}, loaded.tokenizer, 24)
    ids = example["inputs"][None, :example["length"]]
    logits = apply(ids)
    np.testing.assert_allclose(row, jax.nn.softmax(np.asarray(logits[0], np.float64)),
                               atol=1e-5)
  labels = [WORDS[t.split()[-1]] for t in texts]
  assert list(probs.argmax(-1)) == labels


def test_tagging_head_learns_tags_at_each_words_first_token(tagged, tmp_path, one_device):
  config = task_config(tagged, "tagging", "tagged", **{"train.num_steps": 80,
                                                       "train.eval_every": 40})
  data = make_data(config)
  assert data.prepared.label_names == ("NAME", "O")
  batch = data.eval_batches("validation", 8, 24, batching=tasks.get("tagging").batching)[0]
  records = data.prepared.sources["validation"]
  for i in range(len(records)):  # one scored token per word, carrying the word's tag
    words = records[i]["words"].split("\t")
    first = batch["weights"][i] > 0
    np.testing.assert_array_equal(batch["tags"][i][first],
                                  [0 if w[0].isupper() else 1 for w in words])
    starts = np.flatnonzero(first)  # each word starts where the previous one's tokens end
    lengths = [len(w) + (k > 0) for k, w in enumerate(words)]  # chars, with the space
    np.testing.assert_array_equal(starts, 1 + np.cumsum([0] + lengths[:-1]))
  result = run(config, str(tmp_path / "run"), devices=one_device)
  assert result.eval["validation"]["tokens"] == 15
  assert result.eval["validation"]["accuracy"] == 1.0


def test_regression_trains_on_numeric_labels(tmp_path, one_device):
  folder = tmp_path / "data"
  folder.mkdir()
  rows = [(" ".join(["yes"] * n + ["no"] * (6 - n)), n / 2) for n in range(7)] * 3
  for split in ("train", "dev"):
    (folder / f"{split}.tsv").write_text(
        "sentence\tscore\n" + "".join(f"{t}\t{y}\n" for t, y in rows), encoding="utf-8")
  config = task_config(str(folder), "regression", "labelled",
                       **{"data.label_column": "score", "task.pooling": "mean"})
  result = run(config, str(tmp_path / "run"), devices=one_device)
  validation = result.eval["validation"]
  assert validation["pearson"] > 0.9 and validation["spearman"] > 0.9
  assert validation["examples"] == len(rows)


def test_init_from_loads_the_pretrained_body_and_a_fresh_head(labelled, tmp_path, one_device):
  mlm = task_config(labelled, "mlm", "labelled", **{"train.num_steps": 4, "train.warmup_steps": 1,
                                                    "train.eval_every": 2,
                                                    "model.norm_position": "post"})
  run(mlm, str(tmp_path / "mlm"), devices=one_device)
  with pytest.raises(UserError, match="holds a mlm model"):  # lm.sample / lm.serve refuse it
    load(str(tmp_path / "mlm"))
  config = task_config(labelled, "classification", "labelled", **{"model.d_model": 48})
  config.init_from = str(tmp_path / "mlm")
  source = pretrained.open_pretrained(config.init_from)
  assert "/best/" in source.where
  config, changed = pretrained.with_architecture(config, source.meta["config"])
  assert "d_model=32 (config had 48)" in changed and config.model.norm_position == "post"
  data = make_data(config, tokenizer_spec=source.meta["tokenizer"])
  mesh = sharding.make_mesh(config.mesh, one_device)
  trainer = Trainer(config, data.tokenizer.vocab_size, mesh, num_labels=2)
  fresh = jax.device_get(trainer.init_state().params)
  params = pretrained.load_params(source, fresh, trainer.task.head_keys,
                                  sharding.replicated(mesh))
  # A second path to the pretrained weights: restore the MLM run's own state.
  mlm_trainer = Trainer(mlm, data.tokenizer.vocab_size, mesh)
  best = Checkpointer(str(tmp_path / "mlm"), 1, folder="best")
  saved = best.restore_state(
      best.all_steps()[0], sharding.abstract_like(mlm_trainer.abstract_state, mlm_trainer.state_shardings))
  chex.assert_trees_all_equal(params["encoder"], jax.device_get(saved.params["encoder"]))
  chex.assert_trees_all_equal(params["classification_head"], fresh["classification_head"])
  # A model that does not fit names the tensor.
  config.model.d_ff = 96
  other = Trainer(config, data.tokenizer.vocab_size, mesh, num_labels=2)
  with pytest.raises(UserError, match=r"encoder/layer_0/mlp/wi/kernel: checkpoint"):
    pretrained.load_params(source, jax.device_get(other.init_state().params),
                           other.task.head_keys, sharding.replicated(mesh))


def test_init_from_errors_name_the_problem(tmp_path):
  with pytest.raises(UserError, match="is not a folder"):
    pretrained.open_pretrained(str(tmp_path / "missing"))
  with pytest.raises(UserError, match="holds no checkpoint"):
    pretrained.open_pretrained(str(tmp_path))


def test_head_learning_rate_scales_only_the_heads_updates():
  t = ml_collections.ConfigDict(dict(learning_rate=1e-3, min_learning_rate=1e-4,
                                     warmup_steps=0, num_steps=10, b1=0.9, b2=0.99,
                                     weight_decay=0.1, grad_clip=0.0, head_learning_rate=0.0))
  params = {"encoder": {"w": np.ones((3, 2), np.float32)},
            "classification_head": {"w": np.full((2, 2), 2.0, np.float32),
                                    "b": np.zeros(2, np.float32)}}
  grads = jax.tree.map(lambda p: np.linspace(-1, 1, p.size).reshape(p.shape), params)
  plain, _ = make_optimizer(t).update(grads, make_optimizer(t).init(params), params)
  t.head_learning_rate = 5e-3
  opt = make_optimizer(t, ("classification_head",))
  mixed, _ = opt.update(grads, opt.init(params), params)
  t.learning_rate, t.min_learning_rate, t.head_learning_rate = 5e-3, 5e-4, 0.0
  fast, _ = make_optimizer(t).update(grads, make_optimizer(t).init(params), params)
  chex.assert_trees_all_close(mixed["encoder"], plain["encoder"])
  chex.assert_trees_all_close(mixed["classification_head"], fast["classification_head"],
                              rtol=1e-6)


def test_early_stopping_keeps_the_best_and_a_rerun_does_not_train_on(labelled, tmp_path,
                                                                     one_device):
  # A learning rate too small to change any prediction: every evaluation ties the first.
  config = task_config(labelled, "classification", "labelled",
                       **{"train.learning_rate": 1e-9, "train.min_learning_rate": 0.0,
                          "train.num_steps": 40, "train.eval_every": 5,
                          "train.early_stopping": 2})
  workdir = str(tmp_path / "run")
  result = run(config, workdir, devices=one_device)
  assert result.final_step == 15 and result.best["step"] == 5
  assert Checkpointer(workdir, 1, folder="best").all_steps() == [5]
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    logged = [json.loads(line) for line in f]
  assert [r["step"] for r in logged if "eval/accuracy" in r] == [5, 10, 15]
  again = run(config, workdir, devices=one_device)
  assert again.final_step == 15 and again.eval["validation"] == result.eval["validation"]


def test_sweep_runs_the_grid_and_ranks_it(labelled, tmp_path, one_device, monkeypatch):
  config = task_config(labelled, "classification", "labelled",
                       **{"train.num_steps": 30, "train.eval_every": 30,
                          "train.min_learning_rate": 0.0})
  monkeypatch.setattr(jax, "devices", lambda *a: one_device)
  axes = parse_sweeps(config, ["train.learning_rate=1e-9,3e-3"])
  assert axes == [("train.learning_rate", [1e-9, 3e-3])]
  rows, name = sweep(config, axes, str(tmp_path / "sweep"))
  assert name == "accuracy"
  assert [r["setting"]["train.learning_rate"] for r in rows] == [3e-3, 1e-9]
  assert rows[0]["score"] > 0.9 and rows[1]["score"] < 0.6
  assert os.path.isdir(os.path.join(tmp_path, "sweep", "train.learning_rate=0.003", "best"))
  table = format_table(rows, name, ["train.learning_rate"])
  assert table.splitlines()[1].split()[:2] == ["0.003", f"{rows[0]['score']:.4f}"]
  with open(tmp_path / "sweep" / "sweep.jsonl", encoding="utf-8") as f:
    saved = [json.loads(line) for line in f]
  assert [r["score"] for r in saved] == [r["score"] for r in rows]


def test_a_sweep_checks_every_setting_before_running_any(labelled, tmp_path, monkeypatch,
                                                         one_device):
  monkeypatch.setattr(jax, "devices", lambda *a: one_device)
  config = task_config(labelled, "classification", "labelled")
  axes = parse_sweeps(config, ["train.learning_rate=1e-2,1e-5"])  # 1e-5 < min_learning_rate
  with pytest.raises(ConfigError, match=r"min_learning_rate.*in the sweep setting "
                                        r"train.learning_rate=1e-05"):
    sweep(config, axes, str(tmp_path / "sweep"))
  assert not os.path.exists(tmp_path / "sweep")


@pytest.mark.parametrize("spec, message", [
    ("train.learnin_rate=1,2", "unknown field"),
    ("train.batch_size=8,x", "not a int"),
    ("train.batch_size", "expected field=v1,v2"),
])
def test_bad_sweeps_name_the_field(spec, message):
  with pytest.raises(ConfigError, match=message):
    parse_sweeps(tiny_config(), [spec])
