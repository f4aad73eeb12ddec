"""The train and eval steps: pure functions of their inputs, jitted by lm/train.py.

    state, metrics = train_step(spec, state, frozen, batch)
    state, metrics = train_steps(spec, state, frozen, batches)   # a scan over stacked batches
    outputs = eval_step(task, params, frozen, batch)

`spec` (StepSpec) holds what the step is compiled for: the task, the optimizer and its
schedule, the run's dropout key and the gradient accumulation. `frozen` is the frozen base
of a PEFT run (empty otherwise); the state's params are the trainable rest. The dropout key
of step s is fold_in(dropout_key, s), so nothing random lives outside the state's step
count: a resumed run continues exactly where the uninterrupted one would be.
"""

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lm import peft


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # the trainable parameters: all, or with config.peft the adapters/biases and head
  opt_state: Any
  skipped: jax.Array  # updates skipped so far: loss or gradients not finite, or overflowed
  loss_scale: Any = None  # an optim.LossScale with float16 loss scaling, else None


@dataclasses.dataclass(frozen=True)
class StepSpec:
  task: Any  # lm.tasks.Task
  optimizer: Any  # optax.GradientTransformation
  schedule: Any  # step -> learning rate (logged)
  dropout_key: Any
  grad_accum_steps: int = 1


def fresh_state(optimizer, params, loss_scale=None):
  """Step 0 around `params`: a new optimizer state, nothing skipped."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params), skipped=jnp.zeros((), jnp.int32),
                    loss_scale=loss_scale)


def gradients(spec, state, frozen, batch):
  """(mean loss, its gradients by the trainable params) of a batch, over
  spec.grad_accum_steps micro-batches, loss-scaled when the state has a scale."""
  dropout_key = jax.random.fold_in(spec.dropout_key, state.step)
  n = spec.grad_accum_steps
  total_weight = jnp.maximum(jnp.sum(batch.loss_weights().astype(jnp.float32)), 1.0)
  scale = None if state.loss_scale is None else state.loss_scale.scale

  def mean_loss(params, micro_batch, key):  # differentiated by the trainable params only
    loss_sum, _ = spec.task.loss(peft.join(frozen, params), micro_batch, key)
    loss = loss_sum / total_weight  # each micro-batch's share of the batch's mean loss
    return loss if scale is None else loss * scale

  if n == 1:
    loss, grads = jax.value_and_grad(mean_loss)(state.params, batch, dropout_key)
  else:
    # Micro-batch i takes rows i, i+n, i+2n, ...: spread over every data shard alike.
    def split(x):
      x = x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1)
      return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))

    def accumulate(carry, inputs):
      micro_batch, i = inputs
      loss, grads = jax.value_and_grad(mean_loss)(state.params, micro_batch,
                                                   jax.random.fold_in(dropout_key, i))
      return jax.tree.map(jnp.add, carry, (loss, grads)), None

    zeros = (jnp.zeros((), jnp.float32),
             jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params))
    (loss, grads), _ = jax.lax.scan(accumulate, zeros,
                                    (jax.tree.map(split, batch), jnp.arange(n)))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
  if scale is not None:
    loss = loss / scale
    grads = jax.tree.map(lambda g: g / scale.astype(g.dtype), grads)
  return loss, grads


def train_step(spec, state, frozen, batch):
  """One optimizer step on a (typed, sharded) batch: (new state, metrics).

  A NaN/Inf loss or gradient never reaches the parameters or Adam's moments: the step keeps
  the previous ones and is counted (the loop then skips on or stops, by config). With loss
  scaling, gradients that overflow while the loss is finite are the scale's doing: the step
  is skipped and the scale halved, and only at scale 1 is it an error."""
  loss, grads = gradients(spec, state, frozen, batch)
  grad_norm = optax.global_norm(grads)
  updates, opt_state = spec.optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  nonfinite = ~finite
  metrics = {}
  loss_scale = state.loss_scale
  if loss_scale is not None:
    overflow = jnp.isfinite(loss) & ~jnp.isfinite(grad_norm) & (loss_scale.scale > 1.0)
    nonfinite = nonfinite & ~overflow
    loss_scale = loss_scale.update(jnp.isfinite(grad_norm))
    metrics["loss_scale"] = loss_scale.scale
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  skipped = state.skipped + (~finite).astype(jnp.int32)
  metrics.update(loss=loss, grad_norm=grad_norm, learning_rate=spec.schedule(state.step),
                 nonfinite=nonfinite.astype(jnp.int32), skipped=skipped)
  return TrainState(step=state.step + 1, params=keep(params, state.params),
                    opt_state=keep(opt_state, state.opt_state), skipped=skipped,
                    loss_scale=loss_scale), metrics


def train_steps(spec, state, frozen, batches):
  """len(batches) steps, one after another (a scan over the leading axis); their metrics
  stacked."""
  return jax.lax.scan(lambda s, batch: train_step(spec, s, frozen, batch), state, batches)


def eval_step(task, params, frozen, batch):
  """The task's evaluation outputs (sums, or every example's prediction) of one batch."""
  return task.eval_outputs(peft.join(frozen, params), batch)
