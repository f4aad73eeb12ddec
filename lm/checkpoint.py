"""Orbax checkpoints in `workdir/checkpoints/<step>/`: the train state plus a JSON `meta`
item (the config, the tokenizer and the data fingerprint), so a checkpoint alone is enough to
resume training or to sample with the exact vocabulary it was trained with.

Orbax writes each step into a temporary folder and renames it when complete, so a killed
save never leaves a checkpoint that looks finished.
"""

import os

import jax
import orbax.checkpoint as ocp

from lm.errors import UserError

# Fields that may differ between a checkpoint's config and the config resuming from it:
# they change how long and how visibly a run goes, not what it computes.
RESUMABLE_CHANGES = ("train.num_steps", "train.eval_every", "train.eval_steps",
                     "train.checkpoint_every", "train.keep_checkpoints", "train.log_every",
                     "log.", "sample.", "mesh.")


class Checkpointer:

  def __init__(self, workdir, keep):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_names=("state", "meta"))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step, state, meta, force=False):
    """Starts an asynchronous save; call `wait()` before reading it back or exiting."""
    return self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(meta)), force=force)

  def read_meta(self, step):
    restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return restored["meta"]

  def restore_state(self, step, abstract_state):
    """Restores onto the shardings in `abstract_state` (ShapeDtypeStructs with .sharding)."""
    try:
      restored = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    except (ValueError, KeyError) as e:
      raise UserError(f"checkpoint {self.directory}/{step} does not fit this model: "
                      f"{str(e).splitlines()[0]}") from None
    return restored["state"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_differences(saved, current):
  """Fields whose change makes resuming from `saved` compute something else."""
  a, b = _flat(saved), _flat(current)
  changed = []
  for name in sorted(set(a) | set(b)):
    if name.startswith(RESUMABLE_CHANGES) or a.get(name) == b.get(name):
      continue
    if isinstance(a.get(name), (list, tuple)) and list(a[name]) == list(b.get(name) or []):
      continue
    changed.append(f"{name}: {a.get(name)!r} -> {b.get(name)!r}")
  return changed


def abstract_like(tree, shardings):
  """ShapeDtypeStructs carrying target shardings, for restoring."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
