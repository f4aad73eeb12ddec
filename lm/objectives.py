"""Losses. Each returns sums (loss, weight) so callers can average exactly across batches.

    causal LM / masked LM / tagging:  token_loss(logits [B, L, V], targets [B, L], weights)
    classification:                   classification_loss(logits [B, C], labels [B], weights)
    regression:                       regression_loss(predictions [B], targets [B], weights)

The masked-LM loss is token_loss with weights on the masked positions only (lm/data/examples).
"""

import jax
import jax.numpy as jnp
import optax


def token_loss(logits_BxLxV, targets_BxL, weights_BxL, label_smoothing=0.0):
  """Cross-entropy: (sum of weighted token losses, sum of weights), float32. With
  label_smoothing e the target distribution is (1 - e) one-hot + e uniform over V."""
  logits_BxLxV = logits_BxLxV.astype(jnp.float32)
  if label_smoothing:
    v = logits_BxLxV.shape[-1]
    soft_BxLxV = optax.smooth_labels(jax.nn.one_hot(targets_BxL, v), label_smoothing)
    losses_BxL = optax.softmax_cross_entropy(logits_BxLxV, soft_BxLxV)
  else:
    losses_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL)
  weights_BxL = weights_BxL.astype(jnp.float32)
  return jnp.sum(losses_BxL * weights_BxL), jnp.sum(weights_BxL)


causal_lm_loss = token_loss  # next-token prediction: the batch's targets are the inputs shifted


def correct_tokens(logits_BxLxV, targets_BxL, weights_BxL):
  """Weighted count of positions whose highest logit is the target."""
  hit_BxL = jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL
  return jnp.sum(hit_BxL * weights_BxL.astype(jnp.float32))


def classification_loss(logits_BxC, labels_B, weights_B):
  losses_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC.astype(jnp.float32),
                                                             labels_B)
  weights_B = weights_B.astype(jnp.float32)
  return jnp.sum(losses_B * weights_B), jnp.sum(weights_B)


def regression_loss(predictions_B, targets_B, weights_B):
  """Squared error: (sum of weighted squared errors, sum of weights)."""
  errors_B = jnp.square(predictions_B.astype(jnp.float32) - targets_B.astype(jnp.float32))
  weights_B = weights_B.astype(jnp.float32)
  return jnp.sum(errors_B * weights_B), jnp.sum(weights_B)
