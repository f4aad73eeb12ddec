"""The optimizer, its learning-rate schedule and float16 loss scaling (config.train).

    optimizer = make_optimizer(config.train, task.head_keys)   # an optax GradientTransformation
    schedule = learning_rate_schedule(config.train)           # step -> learning rate

Nothing here knows the model or the mesh: lm/train.py places the optimizer's state by the
parameters' shardings and lm/steps.py applies its updates.
"""

import flax
import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(t):
  """Linear warm-up to learning_rate over warmup_steps, then cosine decay to
  min_learning_rate at num_steps (nanoGPT's schedule: step 0 already trains, at
  learning_rate / (warmup_steps + 1)).

  That is optax's warm-up-cosine schedule started at learning_rate / (warmup_steps + 1):
  its line from there reaches learning_rate * (s + 1) / (warmup_steps + 1) at step s. Its
  values are nanoGPT's closed form to float32 rounding (tests/test_train.py)."""
  w = t.warmup_steps
  return optax.warmup_cosine_decay_schedule(
      init_value=t.learning_rate / (w + 1), peak_value=t.learning_rate, warmup_steps=w,
      decay_steps=max(t.num_steps, w + 1), end_value=t.min_learning_rate)


def make_optimizer(t, head_keys=()):
  """AdamW with global-norm clipping; weight decay on matrices and embeddings only.

  With train.head_learning_rate > 0, the updates of the parameters under `head_keys` are
  scaled by head_learning_rate / learning_rate: AdamW's update (weight decay included) is
  linear in the learning rate, so that is AdamW at the head's rate on the same schedule."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  parts = [optax.adamw(learning_rate_schedule(t), b1=t.b1, b2=t.b2, eps=1e-8,
                       weight_decay=t.weight_decay, mask=decay_mask)]
  if t.grad_clip > 0:
    parts.insert(0, optax.clip_by_global_norm(t.grad_clip))
  if t.head_learning_rate > 0 and head_keys:
    head_mask = lambda params: {k: jax.tree.map(lambda _, head=k in head_keys: head, v)
                                for k, v in params.items()}
    parts.append(optax.masked(optax.scale(t.head_learning_rate / t.learning_rate), head_mask))
  return parts[0] if len(parts) == 1 else optax.chain(*parts)


def uses_loss_scale(config):
  """train.loss_scale: dynamic, or auto with float16 compute."""
  mode = config.train.get("loss_scale", "auto")
  return mode == "dynamic" or (mode == "auto" and config.model.dtype == "float16")


@flax.struct.dataclass
class LossScale:
  """Dynamic loss scaling, for float16 compute (as PyTorch's GradScaler): the loss is
  multiplied by `scale` before differentiation, so that small gradients survive float16,
  and the gradients divided by it after. A step whose gradients overflow is skipped and
  halves the scale (not below 1); GROWTH_INTERVAL finite steps in a row double it."""
  scale: jax.Array  # float32
  good_steps: jax.Array  # int32: finite steps since the scale last changed

  INITIAL = 2.0 ** 15
  GROWTH_INTERVAL = 2000

  @classmethod
  def initial(cls):
    return cls(scale=jnp.asarray(cls.INITIAL, jnp.float32),
               good_steps=jnp.zeros((), jnp.int32))

  def update(self, grads_finite):
    grow = grads_finite & (self.good_steps + 1 >= self.GROWTH_INTERVAL)
    scale = jnp.where(grads_finite, jnp.where(grow, self.scale * 2.0, self.scale),
                      jnp.maximum(self.scale / 2.0, 1.0))
    good_steps = jnp.where(grads_finite & ~grow, self.good_steps + 1, 0)
    return LossScale(scale=scale.astype(jnp.float32), good_steps=good_steps.astype(jnp.int32))
