"""Checkpoints: exact round trip, exact resume, and refusal to resume a different config."""

import json
import os
import shutil
import struct
import subprocess
import sys

import chex
import jax
import pytest

from conftest import REPO, metrics_records, run_config, tiny_config, user_env
from lm import loop, sharding
from lm.checkpoint import Checkpointer
from lm import data as data_lib
from lm.data import SentencePieceTokenizer, make_data
from lm.errors import UserError
from lm.train import Trainer


def test_save_restore_round_trip_is_exact(tmp_path, one_device):
  config = tiny_config()
  data = make_data(config)
  trainer = Trainer(config, data.tokenizer.vocab_size,
                    sharding.make_mesh(config.mesh, one_device))
  state = trainer.init_state()
  batches = data.train_batches(8, 16, 0)
  for step in range(2):  # non-trivial optimizer state
    state, _ = trainer.train_step(state, trainer.shard_batch(batches[step]))
  saved = jax.device_get(state)
  checkpointer = Checkpointer(str(tmp_path), keep=2)
  meta = {"config": config.to_dict(), "tokenizer": data.tokenizer.to_dict(),
          "data_fingerprint": data.fingerprint}
  checkpointer.save(2, state, meta)
  checkpointer.wait()
  restored = checkpointer.restore_state(2, sharding.abstract_like(trainer.abstract_state,
                                                         trainer.state_shardings))
  chex.assert_trees_all_equal(jax.device_get(restored), saved)
  assert checkpointer.read_meta(2) == json.loads(json.dumps(meta))
  checkpointer.close()


def test_train_2n_equals_train_n_resume_train_n(tmp_path, one_device):
  config = tiny_config(**{"train.num_steps": 8, "train.checkpoint_every": 100,
                          "model.dropout": 0.1})  # dropout: the RNG must resume too
  straight = loop.run(config, str(tmp_path / "a"), devices=one_device)
  first = loop.run(config, str(tmp_path / "b"), devices=one_device, stop_after=4)
  assert first.final_step == 4 and first.eval == {}  # stopped early: no final eval
  second = loop.run(config, str(tmp_path / "b"), devices=one_device)
  assert sorted(first.train_losses) == [1, 2, 3, 4]
  # The Grain iterator's position travels in the checkpoint: 4 batches consumed.
  assert Checkpointer(str(tmp_path / "b"), 3).read_meta(4)["data_state"]["next_index"] == 4
  assert sorted(second.train_losses) == [5, 6, 7, 8]
  resumed = {**first.train_losses, **second.train_losses}
  assert resumed == straight.train_losses  # bit for bit, not approximately
  assert second.eval == straight.eval
  assert second.sample == straight.sample


def test_resume_refuses_a_different_model(tmp_path, one_device):
  workdir = str(tmp_path / "run")
  loop.run(tiny_config(), workdir, devices=one_device, stop_after=3)
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  with pytest.raises(UserError, match=r"different config \(model.d_model: 32 -> 64\)"):
    loop.run(tiny_config(**{"model.d_model": 64}), workdir, devices=one_device)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before
  # Changing only how long it runs is a resume, not a different experiment.
  result = loop.run(tiny_config(**{"train.num_steps": 7}), workdir, devices=one_device)
  assert min(result.train_losses) == 4 and result.final_step == 7


def test_checkpoints_from_before_the_loss_scale_field_still_resume(tmp_path, one_device):
  workdir = str(tmp_path / "run")
  config = tiny_config()
  loop.run(config, workdir, devices=one_device, stop_after=3)
  trainer = Trainer(config, make_data(config).tokenizer.vocab_size,
                    sharding.make_mesh(config.mesh, one_device))
  abstract = sharding.abstract_like(trainer.abstract_state, trainer.state_shardings)
  checkpointer = Checkpointer(workdir, keep=3)
  meta, state = checkpointer.read_meta(3), checkpointer.restore_state(3, abstract)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "3"))
  checkpointer.manager.reload()
  # Saved as lm did before TrainState had a loss_scale field.
  checkpointer.save(3, {"step": state.step, "params": state.params,
                        "opt_state": state.opt_state, "skipped": state.skipped}, meta)
  checkpointer.close()
  result = loop.run(config, workdir, devices=one_device)
  assert min(result.train_losses) == 4 and result.final_step == config.train.num_steps
  assert not os.path.exists(os.path.join(workdir, "corrupt_checkpoints"))
  # A float16 run's state (with its loss scale) is not quietly read as a float32 one's.
  f16 = tiny_config(**{"model.dtype": "float16"})
  loop.run(f16, str(tmp_path / "f16"), devices=one_device, stop_after=3)
  checkpointer = Checkpointer(str(tmp_path / "f16"), keep=3)
  with pytest.raises(UserError, match=r"holds a train state of loss_scale, opt_state, params, "
                     r"skipped, step; this run's is opt_state, params, skipped, step"):
    checkpointer.restore_state(3, abstract)
  checkpointer.close()


def test_run_writes_metrics_tensorboard_and_keeps_last_checkpoints(tmp_path, one_device):
  config = tiny_config(**{"train.num_steps": 9, "train.checkpoint_every": 2,
                          "train.keep_checkpoints": 2, "train.log_every": 3})
  workdir = str(tmp_path / "run")
  result = loop.run(config, workdir, devices=one_device)
  records = metrics_records(workdir)
  train = [r for r in records if "train/loss" in r]
  assert [r["step"] for r in train] == [3, 6, 9]
  assert all(r["train/loss"] == pytest.approx(result.train_losses[r["step"]]) for r in train)
  assert {"perf/tokens_per_s", "perf/ms_per_step", "perf/mfu"} <= set(train[0])
  evals = [r for r in records if "eval/loss" in r]
  assert evals[-1]["step"] == 9 and evals[-1]["eval/loss"] == pytest.approx(
      result.eval["validation"]["loss"])
  assert any("test/loss" in r for r in records)
  events = os.listdir(os.path.join(workdir, "tensorboard"))
  assert any(name.startswith("events.out.tfevents") for name in events)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["8", "9"]
  assert run_config(workdir)["model"]["d_model"] == 32
  assert result.sample.startswith("def ") and len(result.sample) > len("def ")


def test_tensorboard_events_hold_the_scalars_and_torch_is_not_imported(tmp_path):
  """In a fresh process (PyTorch, where installed, stays unloaded: tensorboardX would
  import it); the event file is read back record by record."""
  code = ("import sys; from lm import metrics; w = metrics.MetricWriter(sys.argv[1]); "
          "w.write(3, {'train/loss': 2.5}); w.write_text(3, 'sample', 'hi'); w.close(); "
          "assert 'torch' not in sys.modules, 'torch was imported'")
  done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                        text=True, env=user_env(PYTHONPATH=REPO), timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  folder = tmp_path / "tensorboard"
  raw = (folder / os.listdir(folder)[0]).read_bytes()
  scalars, offset = [], 0
  while offset < len(raw):  # TFRecord framing: length, its CRC, the data, its CRC
    (length,) = struct.unpack("<Q", raw[offset:offset + 8])
    event = event_pb2.Event.FromString(raw[offset + 12:offset + 12 + length])
    offset += 16 + length
    scalars += [(v.tag, event.step, v.simple_value) for v in event.summary.value
                if v.HasField("simple_value")]
  assert scalars == [("train/loss", 3, 2.5)]


def test_resume_after_a_lost_checkpoint_logs_each_step_once(tmp_path, one_device):
  config = tiny_config(**{"train.num_steps": 6, "train.checkpoint_every": 3})
  workdir = str(tmp_path / "run")
  first = loop.run(config, workdir, devices=one_device)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))  # as if killed before saving it
  again = loop.run(config, workdir, devices=one_device)
  assert sorted(again.train_losses) == [4, 5, 6]
  records = metrics_records(workdir)
  steps = [r["step"] for r in records if "train/loss" in r]
  assert steps == [1, 2, 3, 4, 5, 6]
  for r in records:
    if "train/loss" in r:
      assert r["train/loss"] == pytest.approx(first.train_losses[r["step"]], rel=0, abs=0)


def test_shape_mismatch_is_named_per_parameter(tmp_path, one_device):
  workdir = str(tmp_path / "run")
  loop.run(tiny_config(), workdir, devices=one_device, stop_after=3)
  config = tiny_config(**{"model.d_ff": 48})
  data = make_data(config)
  other = Trainer(config, data.tokenizer.vocab_size, sharding.make_mesh(config.mesh, one_device))
  checkpointer = Checkpointer(workdir, keep=3)
  with pytest.raises(UserError, match=r"layer_0/mlp/wi/kernel: checkpoint \(32, 64\) vs model "
                     r"\(32, 48\).*layer_0/mlp/wo/kernel: checkpoint \(64, 32\) vs model"):
    checkpointer.check_shapes(3, other.abstract_state)
  checkpointer.close()


def test_overwrite_discards_a_different_experiment(tmp_path, one_device):
  workdir = str(tmp_path / "run")
  loop.run(tiny_config(), workdir, devices=one_device, stop_after=3)
  other = tiny_config(**{"model.d_model": 64})
  with pytest.raises(UserError, match="--overwrite"):
    loop.run(other, workdir, devices=one_device)
  result = loop.run(other, workdir, devices=one_device, overwrite=True)
  assert min(result.train_losses) == 1 and result.final_step == 6
  assert run_config(workdir)["model"]["d_model"] == 64


def test_resume_on_a_mesh_is_bit_identical(tmp_path):
  config = tiny_config(**{"train.num_steps": 6, "train.checkpoint_every": 100,
                          "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
                          "model.vocab_size": 96, "model.dropout": 0.1})
  devices = jax.devices()
  straight = loop.run(config, str(tmp_path / "a"), devices=devices)
  loop.run(config, str(tmp_path / "b"), devices=devices, stop_after=3)
  resumed = loop.run(config, str(tmp_path / "b"), devices=devices)
  assert {**{s: straight.train_losses[s] for s in (1, 2, 3)}, **resumed.train_losses} == \
      straight.train_losses
  assert resumed.eval == straight.eval


def test_overwrite_with_bad_input_discards_nothing(tmp_path, one_device):
  workdir = str(tmp_path / "run")
  loop.run(tiny_config(), workdir, devices=one_device, stop_after=3)
  before = sorted(os.listdir(workdir))
  with pytest.raises(UserError, match="config.data.path"):
    loop.run(tiny_config(**{"data.path": str(tmp_path / "missing.txt")}), workdir,
             devices=one_device, overwrite=True)
  assert sorted(os.listdir(workdir)) == before
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["3"]


def test_resume_uses_the_checkpointed_sentencepiece_model(tmp_path, one_device, monkeypatch):
  config = tiny_config(**{"data.tokenizer": "bpe", "data.vocab_size": 400,
                          "train.num_steps": 4})
  workdir = str(tmp_path / "run")
  straight = loop.run(config, str(tmp_path / "straight"), devices=one_device)
  loop.run(config, workdir, devices=one_device, stop_after=2)
  with open(os.path.join(workdir, "tokenizer.model"), "rb") as f:
    saved = SentencePieceTokenizer(f.read())  # a standard SentencePiece model file
  assert saved.vocab_size == 400 and saved.decode(saved.encode("def f(x):\n")) == "def f(x):\n"

  def no_training(*_):
    raise AssertionError("a resumed run must not train a new tokenizer")

  monkeypatch.setattr(data_lib, "train_tokenizer", no_training)
  resumed = loop.run(config, workdir, devices=one_device)
  assert resumed.train_losses == {s: v for s, v in straight.train_losses.items() if s > 2}
  assert resumed.sample == straight.sample
