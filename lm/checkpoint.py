"""Orbax checkpoints in `workdir/checkpoints/<step>/`: the train state plus a JSON `meta`
item (the config, the tokenizer and the data fingerprint), so a checkpoint alone is enough to
resume training or to sample with the exact vocabulary it was trained with.

Crash safety: Orbax writes each step into a temporary folder and renames it when complete,
so a save killed half-way never looks finished. A finished checkpoint that cannot be read
back (truncated or corrupted files) is moved to `workdir/corrupt_checkpoints/` with a
message, and the next older one is used; none is ever loaded half-way. A save that fails
(a full disk) raises CheckpointError and leaves the earlier checkpoints as they were.
"""

import dataclasses
import errno
import os
import shutil
import time

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from lm import schema, trees
from lm.config import defaults
from lm.errors import UserError

# Fields that may differ between a checkpoint's config and the config resuming from it
# (lm/schema.py marks them): they change how long and how visibly a run goes, not what it
# computes. A field of a section that is resumable throughout (log, mesh, sample) may also
# be one a later lm no longer has.
RESUMABLE_CHANGES = schema.RESUMABLE
_RESUMABLE_SECTIONS = {f.name.split(".")[0] for f in schema.FIELDS if "." in f.name} - {
    f.name.split(".")[0] for f in schema.FIELDS if not f.resumable}


def _resumable(name):
  return name in RESUMABLE_CHANGES or name.split(".")[0] in _RESUMABLE_SECTIONS


class CheckpointError(UserError):
  """A checkpoint could not be written; the earlier ones are intact."""


def _is_disk_full(error):
  while error is not None:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if "No space left on device" in str(error) or "ENOSPC" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


class Checkpointer:

  def __init__(self, workdir, keep, folder="checkpoints"):
    """Checkpoints in workdir/folder: "checkpoints" for resuming, "best" for the best one."""
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, folder)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             cleanup_tmp_directories=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})
    self._saving = None  # step of the save in flight

  def all_steps(self):
    return sorted(self.manager.all_steps(), reverse=True)

  def save(self, step, state, meta):
    """Starts an asynchronous save; `wait()` finishes it (and reports its failure)."""
    self.wait()
    try:
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)),
                        force=True)
    except Exception as e:  # pylint: disable=broad-except
      self._failed(step, e)
    self._saving = step

  def wait(self):
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._failed(self._saving, e)
    self._saving = None

  def _failed(self, step, error):
    for name in os.listdir(self.directory) if os.path.isdir(self.directory) else []:
      if name.startswith(f"{step}.") and "tmp" in name:  # the half-written step
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
    self.manager.reload()
    kept = [s for s in self.all_steps() if s != step]
    previous = f"step {kept[0]} is the latest intact checkpoint" if kept else \
        "there is no earlier checkpoint"
    reason = "the disk is full" if _is_disk_full(error) else \
        " ".join(str(error).split())[:300]
    raise CheckpointError(f"saving checkpoint {step} in {self.directory} failed: {reason}; "
                          f"{previous}. Fix that and rerun the same command to resume.") \
        from None

  def read_meta(self, step):
    restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return restored["meta"]

  def saved_params(self, step):
    """{"path/to/param": its metadata (.shape, .dtype)} of checkpoint `step`, unread."""
    return trees.flatten(self.manager.item_metadata(step)["state"].tree["params"])

  def check_shapes(self, step, abstract_state):
    """Raises UserError naming every parameter whose saved shape differs from the model's."""
    self.check_param_shapes(step, abstract_state.params)

  def check_param_shapes(self, step, abstract_params):
    """check_shapes for a tree of the state's parameters."""
    have, want = self.saved_params(step), trees.flatten(abstract_params)
    problems = [f"{name}: missing from the checkpoint" for name in want if name not in have]
    problems += [f"{name}: in the checkpoint, not in the model" for name in have
                 if name not in want]
    problems += [f"{name}: checkpoint {tuple(have[name].shape)} vs model {tuple(w.shape)}"
                 for name, w in want.items()
                 if name in have and tuple(have[name].shape) != tuple(w.shape)]
    if problems:
      raise UserError(f"checkpoint {self.directory}/{step} does not fit this model: "
                      + "; ".join(problems[:10]) + (" ..." if len(problems) > 10 else ""))

  def restore_state(self, step, abstract_state):
    """Restores onto the shardings in `abstract_state` (ShapeDtypeStructs with .sharding)."""
    tree = self.manager.item_metadata(step)["state"].tree
    fields = {f.name: getattr(abstract_state, f.name) for f in dataclasses.fields(abstract_state)}
    saved = {f for f, value in tree.items() if value is not None}
    wanted = {f for f, value in fields.items() if value is not None}  # no loss scale: None
    # A field this run leaves empty may be absent: checkpoints written before it existed.
    if saved != wanted:
      raise UserError(f"checkpoint {self.directory}/{step} holds a train state of "
                      f"{', '.join(sorted(saved))}; this run's is {', '.join(sorted(wanted))}")
    target = {f: fields[f] for f in tree if f in fields}
    restored = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    return _finite(abstract_state.replace(**restored["state"]))

  def restore_params(self, step, abstract_params):
    """The parameters of checkpoint `step`'s state alone (no optimizer state is read),
    onto the shardings in `abstract_params`: for decoding and export."""
    path = os.path.join(self.directory, str(step), "state")
    target = {"params": abstract_params}
    restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
    return _finite(restored["params"])

  def quarantine(self, step, error):
    """Moves an unreadable checkpoint out of the way, keeping it for inspection."""
    target = os.path.join(self.workdir, "corrupt_checkpoints",
                          f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.move(os.path.join(self.directory, str(step)), target)
    self.manager.reload()
    reason = " ".join(str(error).split())[:200] or type(error).__name__
    return f"checkpoint {step} is incomplete or corrupt ({reason}); moved it to {target}"

  def close(self):
    self.wait()
    self.manager.close()


def _finite(tree):
  floats = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  if not all(bool(jnp.isfinite(x).all()) for x in floats):
    raise ValueError("it holds NaN or Inf values")
  return tree


def config_differences(saved, current):
  """Fields whose change makes resuming from `saved` compute something else."""
  a, b = trees.flatten(saved, "."), trees.flatten(current, ".")
  # A field the saved config lacks came into lm later: the run used what is its default.
  a = {**{k: v for k, v in trees.flatten(defaults().to_dict(), ".").items() if k not in a}, **a}
  changed = []
  for name in sorted(set(a) | set(b)):
    if _resumable(name) or a.get(name) == b.get(name):
      continue
    if isinstance(a.get(name), (list, tuple)) and list(a[name]) == list(b.get(name) or []):
      continue
    changed.append(f"{name}: {a.get(name)!r} -> {b.get(name)!r}")
  return changed
