"""Starting a run from pretrained weights: `config.init_from`.

    config.init_from = "/path/to/pretraining/workdir"

The pretrained run's best checkpoint (workdir/best) is used, else its latest. Its model
architecture replaces config.model's architecture fields (dropout, dtypes, remat and scan
stay the new run's), and its tokenizer is used as is. Every parameter of the new model is
loaded from it by name, except the task head (lm/tasks.py), which a pretraining run lacks and
which starts from its initialisation. A parameter missing from the checkpoint, or there with
another shape, is an error that names it; the checkpoint's own head (e.g. mlm_head) is left.
"""

import dataclasses
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from lm import metrics
from lm.checkpoint import Checkpointer
from lm.errors import UserError

ARCHITECTURE = ("num_layers", "num_heads", "num_kv_heads", "d_model", "d_ff", "vocab_size",
                "max_len", "norm", "norm_eps", "norm_position", "positions", "rope_theta", "mlp",
                "use_bias", "tie_embeddings", "type_vocab_size", "pooler")


@dataclasses.dataclass
class Pretrained:
  checkpointer: Checkpointer
  step: int
  meta: dict  # the checkpoint's meta: config, tokenizer, ...

  @property
  def where(self):
    return f"{self.checkpointer.directory}/{self.step}"


def open_pretrained(path):
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise UserError(f"config.init_from: {path} is not a folder; name an lm workdir")
  for folder in ("best", "checkpoints"):
    if not os.path.isdir(os.path.join(path, folder)):
      continue
    checkpointer = Checkpointer(path, keep=None, folder=folder)
    steps = checkpointer.all_steps()
    if steps:
      try:
        return Pretrained(checkpointer, steps[0], checkpointer.read_meta(steps[0]))
      except Exception as e:  # pylint: disable=broad-except
        raise UserError(f"config.init_from: cannot read checkpoint {steps[0]} in "
                        f"{checkpointer.directory} ({type(e).__name__}: {e})") from None
  raise UserError(f"config.init_from: {path} holds no checkpoint (no best/ or checkpoints/ "
                  "with a complete step)")


def adopt_architecture(config, saved_config):
  """Sets config.model's architecture fields to `saved_config`'s; returns what changed."""
  changed = []
  for name in ARCHITECTURE:
    value = saved_config["model"][name]
    if config.model[name] != value:
      changed.append(f"model.{name}={value!r} (config had {config.model[name]!r})")
      config.model[name] = value
  return changed


def _flat(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def load_params(pretrained, params, head_keys, sharding):
  """`params` (the new model's, initialised) with every non-head tensor from the checkpoint,
  as host numpy arrays in the same tree structure. `sharding`: where to read the saved state
  to (replicated on the new run's mesh: the old run may have had another)."""
  manager = pretrained.checkpointer.manager
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                        manager.item_metadata(pretrained.step)["state"].tree)
  saved = manager.restore(pretrained.step,
                          args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  saved = _flat(jax.device_get(saved["state"]["params"]))
  ours = _flat(params)
  is_head = lambda name: name.split("/")[0] in head_keys
  problems = [f"{n}: not in the checkpoint" for n in ours if not is_head(n) and n not in saved]
  problems += [f"{n}: checkpoint {tuple(saved[n].shape)} vs model {tuple(v.shape)}"
               for n, v in ours.items() if n in saved and saved[n].shape != v.shape]
  if problems:
    raise UserError(f"config.init_from: {pretrained.where} does not fit this model: "
                    + "; ".join(problems[:8]) + (" ..." if len(problems) > 8 else ""))
  loaded = [n for n in ours if n in saved and not is_head(n)]
  fresh = sorted({n.split("/")[0] for n in ours if n not in loaded})
  unused = sorted({n.split("/")[0] for n in saved if n not in ours})
  metrics.log(f"lm: init_from {pretrained.where}: loaded {len(loaded)} tensors"
              + (f"; new: {', '.join(fresh)}" if fresh else "")
              + (f"; not used: {', '.join(unused)}" if unused else ""))
  leaves, treedef = jax.tree_util.tree_flatten(params)
  names = list(ours)
  return jax.tree_util.tree_unflatten(
      treedef, [np.asarray(saved[n], dtype=leaf.dtype) if n in loaded else leaf
                for n, leaf in zip(names, leaves)])
