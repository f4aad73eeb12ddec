"""Parameter-efficient fine-tuning: which parameters train, and the frozen rest.

    config.init_from = "hf:/path/to/minilm"   # the base model (required)
    config.peft.method = "lora"               # "" (full fine-tuning) | lora | bitfit

lora: low-rank adapters (lm/models/lora.py) on the dense projections that config.peft.targets
names; only the adapters train. bitfit (Ben Zaken et al. 2022): only the bias vectors train
(every Dense's and LayerNorm's). Either way the task head (lm/tasks/) trains fully.

The model's parameter tree is split in two by path: the trainable part is the train state's
`params` (so Adam's moments, the gradients and the checkpoints hold only it), and the frozen
part is an argument of the jitted steps that nothing updates. A checkpoint of such a run
holds the trainable part and, in its metadata, a pointer to the base checkpoint (`base`:
where it is and a fingerprint of its tensors); loading it anywhere (resume, lm.sample,
lm.serve, export, a later init_from) reads the base again, checks the fingerprint, and, for
serving, folds the adapters into the base kernels (lora.merge).
"""

import hashlib

import jax
import numpy as np

from lm.errors import UserError
from lm.trees import unstack_layers
from lm.models import lora

METHODS = ("", "lora", "bitfit")


def adapters(peft_config):
  """The lora.Adapters of a config.peft section (None unless method is lora)."""
  if peft_config.method != "lora":
    return None
  return lora.Adapters(rank=peft_config.rank, alpha=float(peft_config.alpha),
                       dropout=float(peft_config.dropout), targets=peft_config.targets)


def trainable(method, head_keys):
  """path (a tuple of names) -> whether that parameter trains under `method`."""
  is_head = lambda path: path[0] in head_keys
  if method == "lora":
    return lambda path: is_head(path) or lora.is_adapter(path)
  if method == "bitfit":
    return lambda path: is_head(path) or path[-1] == "bias"
  return lambda path: True


def split(tree, predicate, path=()):
  """(trainable, frozen): two nested dicts with the leaves of `tree` for which
  `predicate(path)` is true and false. Empty sub-dicts are left out."""
  if not isinstance(tree, dict):
    return (tree, None) if predicate(path) else (None, tree)
  yes, no = {}, {}
  kept = lambda part: part is not None and not (isinstance(part, dict) and not part)
  for key, value in tree.items():
    a, b = split(value, predicate, path + (key,))
    if kept(a):
      yes[key] = a
    if kept(b):
      no[key] = b
  return yes, no


def join(a, b):
  """The union of two nested dicts (what `split` took apart); `b` wins where both have a leaf."""
  if not isinstance(a, dict) or not isinstance(b, dict):
    return b
  out = dict(a)
  for key, value in b.items():
    out[key] = join(a[key], value) if key in a else value
  return out


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def check_trainable(method, trainable_tree, head_keys, config):
  """A PEFT method that finds nothing to train in the model's body is a config error."""
  body = {k: v for k, v in trainable_tree.items() if k not in head_keys}
  if method and not jax.tree.leaves(body):
    if method == "lora":
      raise UserError(f"config.peft.targets: {config.peft.targets!r} matches none of the "
                      "model's dense projections (module paths such as encoder/layer_0/attn/"
                      "query, layer_0/mlp/wi; re.search)")
    raise UserError("config.peft.method: bitfit trains the bias vectors, and this model has "
                    "none (model.use_bias=False)")


def fingerprint(flat):
  """A digest of a checkpoint's tensors ({name: host array}), layout-independent: the same
  for per-layer and stacked (scanned) copies of the same weights."""
  digest = hashlib.sha256()
  for name, value in sorted(unstack_layers(flat).items()):
    value = np.ascontiguousarray(value)
    digest.update(f"{name}:{value.dtype}:{value.shape};".encode())
    digest.update(value.tobytes())
  return digest.hexdigest()[:32]
