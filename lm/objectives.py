"""Losses. Each returns sums (loss, weight) so callers can average exactly across batches."""

import jax.numpy as jnp
import optax


def causal_lm_loss(logits_BxLxV, targets_BxL, weights_BxL):
  """Next-token cross-entropy: (sum of weighted token losses, sum of weights), float32."""
  losses_BxL = optax.softmax_cross_entropy_with_integer_labels(
      logits_BxLxV.astype(jnp.float32), targets_BxL)
  weights_BxL = weights_BxL.astype(jnp.float32)
  return jnp.sum(losses_BxL * weights_BxL), jnp.sum(weights_BxL)
