"""Where a run starts: a workdir's newest checkpoint, config.init_from, or from scratch.

    found = find(config, workdir, overwrite, num_devices)   # before any data or model
    found.check_data(data)                                  # the corpus it trained on
    start = found.start(trainer)                            # -> Start: state, step, ...

`find` reads only metadata: the newest readable checkpoint of the workdir (its config must
match, lm/checkpoint.py), or else the pretrained run config.init_from names. With
init_from the architecture comes from the pretrained checkpoint: `found.config` is the
config with it (lm.pretrained.with_architecture); the config passed in is never edited.
`start` restores the state (falling back to older checkpoints that restore completely), or
initialises it, from init_from's parameters where there are any, and places a PEFT run's
frozen base on the mesh. Nothing is written to the workdir here.
"""

import dataclasses
import os

import jax

from lm import config as config_lib
from lm import metrics, pretrained, sharding
from lm.checkpoint import Checkpointer, config_differences
from lm.errors import UserError


@dataclasses.dataclass
class Start:
  """The state a run starts from, and what its checkpoints carry on."""
  state: object  # train state on the mesh
  step: int  # 0 for a fresh run
  data_state: object = None  # the Grain iterator's state at `step` (None: from the start)
  best: dict = None  # {"step", "validation", "bad_evals"}: the best evaluation so far
  base: dict = None  # the init_from checkpoint the parameters (or a PEFT base) came from

  @property
  def resumed(self):
    return self.step > 0


@dataclasses.dataclass
class Found:
  config: object  # the run's config, init_from's architecture taken over
  workdir: str
  checkpointer: Checkpointer = None  # the workdir's, when it holds checkpoints
  step: int = None  # of the newest readable checkpoint there
  meta: dict = None  # its metadata
  source: pretrained.Pretrained = None  # config.init_from, for a run that starts afresh

  @property
  def tokenizer_spec(self):
    """The tokenizer the checkpoint (or the pretrained model) was trained with, or None."""
    if self.meta:
      return self.meta["tokenizer"]
    return self.source.meta["tokenizer"] if self.source else None

  def check_data(self, data):
    if self.meta and self.meta["data_fingerprint"] != data.fingerprint:
      raise UserError(f"config.data: the corpus at {data.source} changed since the "
                      "checkpoint in this workdir was written; resuming would train on other "
                      "data")

  def start(self, trainer):
    """The Start: restored from the workdir, else initialised (from init_from)."""
    restored = self._restore(trainer) if self.step is not None else None
    if restored is None:
      return self._fresh(trainer)
    if trainer.frozen is None:  # a resumed PEFT run: its checkpoints hold no frozen base
      self._place_base(trainer, restored)
    return restored

  def _restore(self, trainer):
    step, state = _restore(self.checkpointer, trainer, self.step)
    if state is None:
      metrics.log("lm: warning: no checkpoint in the workdir could be restored; starting over")
      return None
    meta = self.meta if step == self.step else self.checkpointer.read_meta(step)
    data_state = meta.get("data_state")
    if data_state is None:  # an older checkpoint has its own data position, if any
      raise UserError(f"checkpoint {step} in {self.workdir} has no data pipeline state; "
                      "it was written by an older lm and cannot resume exactly")
    return Start(state, step, data_state, meta.get("best"), meta.get("base"))

  def _fresh(self, trainer):
    mesh = trainer.mesh
    if self.config.init_from and self.source is None:  # a restart of a run from init_from
      self.source = pretrained.open_pretrained(self.config.init_from)
    state, base = trainer.init_state(), None
    if self.source is not None:
      tensors = self.source.read(sharding.replicated(mesh))
      base = pretrained.describe_base(self.source, tensors)
      params = pretrained.load_params(
          self.source, jax.device_get(trainer.full_params(state.params)),
          trainer.task.head_keys, sharding.replicated(mesh), tensors)
      del tensors
      state = trainer.state_from_params(params)
    self.source = None  # its tensors (an HF checkpoint keeps them all) are not needed now
    return Start(state, 0, base=base)

  def _place_base(self, trainer, start):
    if start.base is None:
      raise UserError(f"checkpoint {start.step} in {self.workdir} has no pointer to its "
                      "base checkpoint (config.init_from); it cannot be resumed")
    replicated = sharding.replicated(trainer.mesh)
    tensors = pretrained.read_base(start.base, replicated)
    trainer.set_base(pretrained.load_params(
        pretrained.Pretrained(start.base["where"], {}, None), trainer.abstract_params,
        trainer.task.head_keys, replicated, tensors, announce=False))


def find(config, workdir, overwrite, num_devices):
  """The Found start of a run of `config` in `workdir` (metadata only; nothing written)."""
  found = Found(config, workdir)
  if not overwrite and os.path.isdir(os.path.join(workdir, "checkpoints")):
    found.checkpointer = Checkpointer(workdir, config.train.keep_checkpoints)
    found.config, found.step, found.meta = _latest_meta(found.checkpointer, config)
  if config.init_from and found.meta is None:
    found.source = pretrained.open_pretrained(config.init_from)
    found.config, changes = pretrained.with_architecture(config, found.source.meta["config"])
    if changes:
      metrics.log(f"lm: architecture of init_from: {', '.join(changes)}")
    config_lib.validate(found.config, num_devices)
  return found


def _latest_meta(checkpointer, config):
  """(config, step, meta) of the newest readable checkpoint, checked to belong to this
  config (with init_from, the config with the checkpoint's architecture)."""
  for step in checkpointer.all_steps():
    try:
      meta = checkpointer.read_meta(step)
    except Exception as e:  # pylint: disable=broad-except
      metrics.log(f"lm: warning: {checkpointer.quarantine(step, e)}")
      continue
    if meta.get("params_only"):
      raise UserError(f"workdir {checkpointer.workdir} holds imported parameters only (no "
                      "optimizer state, no data position): train from them with "
                      f"config.init_from={checkpointer.workdir} and another --workdir")
    if config.init_from:  # the architecture came from the pretrained run: keep it
      config, _ = pretrained.with_architecture(config, meta["config"])
    changed = config_differences(meta["config"], config.to_dict())
    if changed:
      raise UserError(f"workdir {checkpointer.workdir} holds a checkpoint of a different "
                      f"config ({'; '.join(changed)}); use another --workdir, or --overwrite "
                      "to discard it")
    return config, step, meta
  return config, None, None


def _restore(checkpointer, trainer, newest):
  """The newest checkpoint at or before `newest` that restores completely."""
  abstract = sharding.abstract_like(trainer.abstract_state, trainer.state_shardings)
  for step in checkpointer.all_steps():
    if step > newest:
      continue
    try:
      checkpointer.check_shapes(step, trainer.abstract_state)
      return step, checkpointer.restore_state(step, abstract)
    except UserError:
      raise  # readable, but for another model: the user must choose
    except Exception as e:  # pylint: disable=broad-except
      metrics.log(f"lm: warning: {checkpointer.quarantine(step, e)}")
  return None, None
