"""Starting a run from pretrained weights: `config.init_from`.

    config.init_from = "/path/to/pretraining/workdir"

    config.init_from = "hf:/path/to/huggingface/folder"

The pretrained run's best checkpoint (workdir/best) is used, else its latest; a Hugging Face
folder is converted on the fly (lm/interop/hf.py). Its model architecture replaces
config.model's architecture fields (dropout, dtypes, remat and scan stay the new run's), and
its tokenizer is used as is. Every parameter of the new model's body is loaded from it by
name; a body parameter missing from the checkpoint, or there with another shape, is an error
that names it. The task head (lm/tasks/) is loaded when the checkpoint has one that fits,
and initialised afresh otherwise (a pretraining run has none); the checkpoint's other heads
(e.g. mlm_head under a classifier) are left. Per-layer and scanned (model.scan_layers)
layouts convert either way.

A run's metadata keeps `base`: the pretrained checkpoint pinned (workdir, folder and step, or
the Hugging Face folder) and a fingerprint of its tensors. A PEFT run (lm/peft.py) saves only
what it trains, so whatever reads its checkpoints reads that base again (`read_base`),
refusing one whose tensors changed; `from_workdir` on a PEFT run's workdir gives the whole
model, adapters merged.
"""

import copy
import dataclasses
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from lm import metrics, peft, schema, trees
from lm.config import defaults
from lm.checkpoint import Checkpointer
from lm.errors import UserError
from lm.interop.hf_folder import Converted
from lm.models import lora
from lm.trees import stack_layers, unstack_layers

ARCHITECTURE = schema.ARCHITECTURE  # config.model fields init_from takes over


@dataclasses.dataclass
class Pretrained:
  where: str  # for messages
  meta: dict  # {"config": {"model": ...}, "tokenizer": ...}
  read: object  # read(sharding) -> {"/"-joined parameter name: host array}
  pin: dict = dataclasses.field(default_factory=dict)  # open_pinned(pin) reopens exactly this


def from_workdir(path, folders=("best", "checkpoints"), step=None):
  """The first of `folders` in the lm workdir `path` holding a checkpoint: its newest step,
  or `step`."""
  for folder in folders:
    if not os.path.isdir(os.path.join(path, folder)):
      continue
    checkpointer = Checkpointer(path, keep=None, folder=folder)
    steps = checkpointer.all_steps()
    if step is not None and step not in steps:
      raise UserError(f"no checkpoint {step} in {checkpointer.directory} (there are "
                      f"{', '.join(map(str, sorted(steps))) or 'none'})")
    if steps:
      step = steps[0] if step is None else step
      try:
        meta = checkpointer.read_meta(step)
      except Exception as e:  # pylint: disable=broad-except
        raise UserError(f"config.init_from: cannot read checkpoint {step} in "
                        f"{checkpointer.directory} ({type(e).__name__}: {e})") from None

      def read(sharding, manager=checkpointer.manager, step=step):
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
            manager.item_metadata(step)["state"].tree)
        saved = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))
        return trees.flatten(jax.device_get(saved["state"]["params"]))

      peft_config = meta["config"].get("peft", {})
      if peft_config.get("method"):  # the checkpoint holds the trained part only
        read = _with_base(read, meta, peft_config)
      return Pretrained(f"{checkpointer.directory}/{step}", meta, read,
                        {"workdir": path, "folder": folder, "step": step})
  raise UserError(f"config.init_from: {path} holds no checkpoint (no {' or '.join(folders)} "
                  "folder with a complete step)")


def open_pretrained(path):
  """An lm workdir, or "hf:FOLDER" for a Hugging Face checkpoint (lm/interop/hf.py)."""
  if path.startswith("hf:"):
    converted = Converted(path[3:])
    model = {**defaults().model.to_dict(), **converted.fields}
    return Pretrained(f"{converted.arch} checkpoint {converted.folder}",
                      {"config": {"model": model}, "tokenizer": converted.tokenizer.to_dict()},
                      lambda _: dict(converted.tensors), {"hf": converted.folder})
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise UserError(f"config.init_from: {path} is not a folder; name an lm workdir, or "
                    "hf:FOLDER for a Hugging Face checkpoint")
  return from_workdir(path)


def open_pinned(pin):
  """The checkpoint a `pin` names (Pretrained.pin)."""
  if "hf" in pin:
    return open_pretrained("hf:" + pin["hf"])
  return from_workdir(pin["workdir"], (pin["folder"],), pin["step"])


def describe_base(source, flat):
  """What a run's metadata keeps of its init_from checkpoint: where, and a fingerprint."""
  return {"pin": source.pin, "where": source.where, "fingerprint": peft.fingerprint(flat)}


def read_base(base, sharding):
  """The tensors of the base checkpoint that metadata `base` (describe_base) names, checked
  to be the ones that run started from."""
  try:
    source = open_pinned(base["pin"])
  except UserError as e:
    raise UserError(f"the base checkpoint of this fine-tuning run, {base['where']}, cannot be "
                    f"read: {e}") from None
  flat = source.read(sharding)
  if peft.fingerprint(flat) != base["fingerprint"]:
    raise UserError(f"the base checkpoint of this fine-tuning run, {base['where']}, changed "
                    "since the run started (its tensors' fingerprint differs); its adapters "
                    "and biases were trained for the old one")
  return flat


def _with_base(read_trained, meta, peft_config):
  """read(sharding) of a PEFT run's checkpoint: the whole model, its base included and
  LoRA adapters folded into the kernels."""
  def read(sharding):
    full = {**unstack_layers(read_base(meta["base"], sharding)),
            **unstack_layers(read_trained(sharding))}
    if peft_config["method"] == "lora":
      full = trees.flatten(lora.merge(trees.nest(full), peft_config["alpha"]))
    return full
  return read


def with_architecture(config, saved_config):
  """(a copy of `config` with config.model's architecture fields set to `saved_config`'s,
  what changed). `config` itself is left as it is."""
  config = copy.deepcopy(config)
  changed = []
  for name in ARCHITECTURE:
    # A field the saved config lacks came into lm later: the model used its default.
    value = saved_config["model"].get(name, schema.BY_NAME[f"model.{name}"].default)
    if config.model[name] != value:
      changed.append(f"{name}={value!r} (config had {config.model[name]!r})")
      config.model[name] = value
  return config, changed


def load_params(pretrained, params, head_keys, sharding, tensors=None, announce=True):
  """`params` (the new model's, initialised) with the checkpoint's tensors, as host arrays
  in the same tree structure. Every body tensor must be there with its shape; head tensors
  (`head_keys`) and LoRA adapters are taken when the checkpoint has them with the same
  shape, and keep their initialisation otherwise. `sharding`: where to read the saved state
  to (replicated on the new run's mesh: the old run may have had another). `tensors`: what
  pretrained.read(sharding) gave, if already read. `announce`: log what was loaded."""
  ours = trees.flatten(params)
  saved = unstack_layers(pretrained.read(sharding) if tensors is None else tensors)
  if any("/layers/block/" in "/" + n for n in ours):
    saved = stack_layers(saved)
  is_head = lambda name: (name.split("/")[0] in head_keys
                         or lora.is_adapter(tuple(name.split("/"))))
  fits = lambda n: n in saved and tuple(saved[n].shape) == tuple(ours[n].shape)
  problems = [f"{n}: not in the checkpoint" for n in ours if not is_head(n) and n not in saved]
  problems += [f"{n}: checkpoint {tuple(saved[n].shape)} vs model {tuple(v.shape)}"
               for n, v in ours.items() if not is_head(n) and n in saved and not fits(n)]
  if problems:
    raise UserError(f"config.init_from: {pretrained.where} does not fit this model: "
                    + "; ".join(problems[:8]) + (" ..." if len(problems) > 8 else ""))
  loaded = [n for n in ours if fits(n)]
  adapters = [n for n in ours if n not in loaded and lora.is_adapter(tuple(n.split("/")))]
  fresh = sorted({n.split("/")[0] + ("" if n.count("/") < 2 else "/" + n.split("/")[1])
                  for n in ours if n not in loaded and n not in adapters})
  fresh += [f"{len(adapters)} LoRA factors"] if adapters else []
  unused = sorted({n.split("/")[0] for n in saved if n not in ours})
  if announce:
    metrics.log(f"lm: init_from {pretrained.where}: loaded {len(loaded)} tensors"
                + (f"; new: {', '.join(fresh)}" if fresh else "")
                + (f"; not used: {', '.join(unused)}" if unused else ""))
  leaves, treedef = jax.tree_util.tree_flatten(params)
  return jax.tree_util.tree_unflatten(
      treedef, [np.asarray(saved[n], dtype=leaf.dtype) if n in loaded else leaf
                for n, leaf in zip(ours, leaves)])
