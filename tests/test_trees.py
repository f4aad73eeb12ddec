"""lm/trees.py: flat names of nested trees, and the stacked and per-layer layouts."""

import chex
import jax
import ml_collections
import numpy as np

from lm import trees


def _reference_flat(tree):
  """jax's own paths, a second code path."""
  return {"/".join(str(k.key) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_flatten_agrees_with_jax_paths_and_nest_inverts_it():
  rng = np.random.default_rng(0)
  tree = {"embed": {"embedding": rng.normal(size=(5, 3))},
          "layer_0": {"attn": {"query": {"kernel": rng.normal(size=(3, 2))}}},
          "ln_f": {"scale": rng.normal(size=3)}}
  flat = trees.flatten(tree)
  assert flat.keys() == _reference_flat(tree).keys()
  chex.assert_trees_all_equal(flat, _reference_flat(tree))
  chex.assert_trees_all_equal(trees.nest(flat), tree)


def test_flatten_of_a_config_keeps_none_and_uses_the_separator():
  c = ml_collections.ConfigDict({"model": {"vocab_size": None, "d_model": 8}, "seed": 1})
  assert trees.flatten(c, ".") == {"model.vocab_size": None, "model.d_model": 8, "seed": 1}


def test_stack_and_unstack_layers_are_inverse_and_match_numpy():
  rng = np.random.default_rng(1)
  per_layer = {f"decoder/layer_{i}/mlp/wi/kernel": rng.normal(size=(4, 6)) for i in range(3)}
  per_layer["decoder/ln_f/scale"] = rng.normal(size=4)
  stacked = trees.stack_layers(per_layer)
  assert set(stacked) == {"decoder/layers/block/mlp/wi/kernel", "decoder/ln_f/scale"}
  np.testing.assert_array_equal(
      stacked["decoder/layers/block/mlp/wi/kernel"],
      np.stack([per_layer[f"decoder/layer_{i}/mlp/wi/kernel"] for i in range(3)]))
  chex.assert_trees_all_equal(trees.unstack_layers(stacked), per_layer)
  # and on nested trees, as the scanned-twin initialiser uses it
  nested = trees.unstack_layers_tree(trees.nest(stacked))
  chex.assert_trees_all_equal(trees.flatten(nested), per_layer)
