"""Preference tuning: DPO (Rafailov et al. 2023) and IPO (Azar et al. 2023) on pairs of a
chosen and a rejected reply to one prompt.

With h = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)), the sums of
the reply tokens' log-probabilities under the policy pi and the frozen reference:

    dpo:  -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)   (e: task.dpo_label_smoothing,
          conservative DPO; e = 0 is the paper's loss)
    ipo:  (h - 1 / (2 beta))^2

The reference is init_from's model, and a forward pass through it (no gradient) is part
of each step:
- peft.method lora: the policy trains LoRA adapters on the base, so the reference is the
  same weights with the adapters switched off: one copy of the base on the device.
- peft.method "" (full fine-tuning) or bitfit: the policy's weights move, so the frozen
  tree holds a copy of init_from's model under REFERENCE (twice the parameters on the
  device; no optimizer state for the copy).

Evaluations report the loss, the mean implicit rewards beta (log pi - log ref) of chosen
and rejected replies, their margin, the reward accuracy (the share of pairs whose chosen
reward is the higher) and `kl_per_token`: KL(pi || ref) of the next-token distributions,
summed over the vocabulary exactly and averaged over the held-out replies' tokens (both
sides, teacher-forced). lm.evaluate --reference estimates the KL of sampled continuations.
"""

import flax
import jax
import jax.numpy as jnp

from lm import peft
from lm.data import Batching
from lm.errors import ConfigError
from lm.models import Decoder, lora
from lm.tasks.base import Batch, Task

REFERENCE = "reference"  # the frozen tree's copy of the initial model (full fine-tuning)


@flax.struct.dataclass
class PreferenceBatch(Batch):
  """One pair a row: each side its own sequence from position 0, weight 1 on its reply."""
  chosen_inputs_BxL: object
  chosen_targets_BxL: object
  chosen_weights_BxL: object
  rejected_inputs_BxL: object
  rejected_targets_BxL: object
  rejected_weights_BxL: object

  @property
  def rows_and_length(self):
    return tuple(self.chosen_inputs_BxL.shape[-2:])

  @property
  def num_tokens(self):
    return self.chosen_inputs_BxL.size + self.rejected_inputs_BxL.size

  def loss_weights(self):
    """1 per real pair (the loss is a mean over pairs; padding rows have no reply)."""
    return (self.chosen_weights_BxL.sum(-1) > 0).astype(self.chosen_weights_BxL.dtype)


def sequence_log_probs(logits_BxLxV, targets_BxL, weights_BxL):
  """Per row: the sum of the weighted targets' log-probabilities, float32 [B]."""
  logp_BxLxV = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
  picked_BxL = jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
  return jnp.sum(picked_BxL * weights_BxL.astype(jnp.float32), axis=-1)


def token_kl(policy_logits_BxLxV, reference_logits_BxLxV):
  """KL(pi || ref) of each position's next-token distributions, float32 [B, L]."""
  logp = jax.nn.log_softmax(policy_logits_BxLxV.astype(jnp.float32), axis=-1)
  logq = jax.nn.log_softmax(reference_logits_BxLxV.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)


def preference_losses(policy_chosen_B, policy_rejected_B, ref_chosen_B, ref_rejected_B,
                      beta, loss="dpo", label_smoothing=0.0):
  """(per-pair losses [B], chosen rewards [B], rejected rewards [B])."""
  chosen_B = policy_chosen_B - ref_chosen_B
  rejected_B = policy_rejected_B - ref_rejected_B
  h_B = chosen_B - rejected_B
  if loss == "ipo":
    losses_B = jnp.square(h_B - 1.0 / (2.0 * beta))
  else:
    losses_B = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h_B)
                - label_smoothing * jax.nn.log_sigmoid(-beta * h_B))
  return losses_B, beta * chosen_B, beta * rejected_B


class DPO(Task):
  name = "dpo"
  Batch = PreferenceBatch
  data_formats = ("preference",)
  selection = ("loss", "min")
  architecture = "decoder"
  batching = Batching("pairs")
  causal_attention = True
  token_scored = False  # a held-out split's pairs are scored whole at every evaluation

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    # Without adapters the policy's own weights move: the reference is a frozen copy.
    self.reference_key = "" if self.adapters else REFERENCE

  @classmethod
  def check_config(cls, config):
    if not config.init_from:
      raise ConfigError("init_from", "dpo tunes a pretrained model against itself as the "
                        "reference; set config.init_from (an lm workdir, or hf:FOLDER)")

  def build_model(self):
    return Decoder(self.model_cfg)

  def _both(self, batch):
    inputs = jnp.concatenate([batch.chosen_inputs_BxL, batch.rejected_inputs_BxL])
    targets = jnp.concatenate([batch.chosen_targets_BxL, batch.rejected_targets_BxL])
    weights = jnp.concatenate([batch.chosen_weights_BxL, batch.rejected_weights_BxL])
    return inputs, targets, weights

  def _apply(self, params, batch, dropout_key):
    inputs, _, _ = self._both(batch)
    return self.model.apply({"params": params}, inputs, **self._flags(dropout_key))

  def apply(self, params, batch, dropout_key=None):
    """(policy logits, reference logits) of both sides, chosen rows first. The reference,
    without gradient: the frozen copy under REFERENCE, or else the same parameters without
    the adapters (outside their interceptor)."""
    batch = self.Batch.from_host(batch)
    if self.reference_key:
      reference = params[self.reference_key]
      params = {k: v for k, v in params.items() if k != self.reference_key}
    else:
      reference, _ = peft.split(params, lambda path: not lora.is_adapter(path))
    policy = super().apply(params, batch, dropout_key)
    inputs, _, _ = self._both(batch)
    return policy, jax.lax.stop_gradient(self.model.apply({"params": reference}, inputs))

  def _pairs(self, outputs, batch):
    """(losses, chosen rewards, rejected rewards, real pairs), each [B]."""
    _, targets, weights = self._both(batch)
    policy, ref = (sequence_log_probs(logits, targets, weights) for logits in outputs)
    b = batch.chosen_inputs_BxL.shape[0]
    real_B = (jnp.sum(batch.chosen_weights_BxL, -1) > 0).astype(jnp.float32)
    losses, chosen, rejected = preference_losses(
        policy[:b], policy[b:], ref[:b], ref[b:], self.options.get("beta", 0.1),
        self.options.get("preference_loss", "dpo"),
        self.options.get("dpo_label_smoothing", 0.0))
    return losses, chosen, rejected, real_B

  def loss_sums(self, outputs, batch, label_smoothing=0.0):
    """(sum of the pairs' losses, number of pairs); label smoothing is dpo's own."""
    del label_smoothing
    losses, _, _, real_B = self._pairs(outputs, batch)
    return jnp.sum(losses * real_B), jnp.sum(real_B)

  def eval_extras(self, outputs, batch):
    _, chosen, rejected, real_B = self._pairs(outputs, batch)
    _, _, weights = self._both(batch)
    kl_BxL = token_kl(*outputs)
    return {"chosen_sum": jnp.sum(chosen * real_B), "rejected_sum": jnp.sum(rejected * real_B),
            "correct_sum": jnp.sum((chosen > rejected) * real_B),
            "kl_sum": jnp.sum(kl_BxL * weights), "kl_tokens": jnp.sum(weights)}

  def summarize(self, outputs):
    total = lambda k: sum(float(o[k]) for o in outputs)
    n = max(total("weight_sum"), 1.0)
    chosen, rejected = total("chosen_sum") / n, total("rejected_sum") / n
    return {"loss": total("loss_sum") / n, "reward_chosen": chosen,
            "reward_rejected": rejected, "reward_margin": chosen - rejected,
            "reward_accuracy": total("correct_sum") / n,
            "kl_per_token": total("kl_sum") / max(total("kl_tokens"), 1.0),
            "examples": int(total("weight_sum"))}

  def example_flops(self, abstract_params, abstract_frozen, lengths, causal_share=1.0):
    """Two sequences a row, each forward and backward through the policy and forward
    through the reference (a third more: 2 of 6 FLOPs per parameter and token)."""
    abstract_frozen = {k: v for k, v in abstract_frozen.items() if k != REFERENCE}
    train = Task.example_flops(self, abstract_params, abstract_frozen, lengths, causal_share)
    return 2 * train * (1 + 1 / 3)

  def batch_lengths(self, batch):
    return (batch.chosen_inputs_BxL.shape[-1],)
