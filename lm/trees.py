"""Parameter trees and nested configs as flat names, and the two layer layouts.

    flatten({"a": {"b": x}})            -> {"a/b": x}        (sep="." for configs)
    nest({"a/b": x})                    -> {"a": {"b": x}}
    stack_layers({"layer_0/w": x0, "layer_1/w": x1}) -> {"layers/block/w": stack([x0, x1])}
    unstack_layers(...)                 the inverse, on flat names or on a nested tree

A model with model.scan_layers keeps its layers stacked on a leading axis under
layers/block/...; one without keeps layer_0/..., layer_1/.... Checkpoints, pretrained
weights, interop and the scanned-twin initialiser convert between the two here. This module
depends on nothing in lm, so every layer of lm may use it.
"""

import numpy as np


def _items(node):
  """A mapping's (key, value) pairs, or None for a leaf (ConfigDicts and FrozenDicts count
  as mappings; dataclasses, arrays and None are leaves)."""
  items = getattr(node, "items", None)
  return None if items is None or not callable(items) else items()


def flatten(tree, sep="/"):
  """{"parent/child/leaf": leaf} of a nested mapping. Keeps None leaves, drops nothing."""
  out = {}

  def walk(node, prefix):
    items = _items(node)
    if items is None:
      out[prefix] = node
      return
    for key, value in items:
      walk(value, f"{prefix}{sep}{key}" if prefix else str(key))

  for key, value in (_items(tree) or ()):
    walk(value, str(key))
  return out


def nest(flat, sep="/"):
  """The inverse of flatten: nested dicts."""
  tree = {}
  for name, value in flat.items():
    *parents, leaf = name.split(sep)
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def stack_layers(flat):
  """Per-layer names (layer_3/...) -> one stacked array per name under layers/block/..., as
  a model with model.scan_layers keeps them."""
  out, stacked = {}, {}
  for name, value in flat.items():
    parts = name.split("/")
    index = next((i for i, p in enumerate(parts) if p.startswith("layer_")), None)
    if index is None:
      out[name] = value
      continue
    key = "/".join(parts[:index] + ["layers", "block"] + parts[index + 1:])
    stacked.setdefault(key, {})[int(parts[index][len("layer_"):])] = value
  for key, layers in stacked.items():
    out[key] = np.stack([layers[i] for i in sorted(layers)])
  return out


def unstack_layers_tree(params):
  """A nested tree of a model.scan_layers model (layers/block/..., stacked on a leading
  axis) as the same model without scan_layers keeps it (layer_0/..., layer_1/...). Leaves
  may be host or device arrays: they are only indexed."""
  if not isinstance(params, dict):
    return params
  out = {}
  for name, value in params.items():
    if name == "layers" and isinstance(value, dict) and set(value) == {"block"}:
      block = flatten(value["block"])
      num_layers = next(iter(block.values())).shape[0]
      for i in range(num_layers):
        out[f"layer_{i}"] = nest({k: v[i] for k, v in block.items()})
    else:
      out[name] = unstack_layers_tree(value)
  return out


def unstack_layers(flat):
  """The inverse of stack_layers, on flat names."""
  return flatten(unstack_layers_tree(nest(flat)))
