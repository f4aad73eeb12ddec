"""Task heads on the Encoder, and the encoder-with-a-head model the tasks train.

    EncoderWithHead(cfg, HeadSpec("mlm"))                 -> logits [B, L, V]   (masked LM)
    EncoderWithHead(cfg, HeadSpec("classification", n))   -> logits [B, n]      (n=1: regression)
    EncoderWithHead(cfg, HeadSpec("tagging", n))          -> logits [B, L, n]   (per token)

Parameters: {"encoder": ..., "<kind>_head": ...}. Fine-tuning loads "encoder" from a
pretrained checkpoint and initialises the head afresh (lm/tasks/), and may give the head
its own learning rate.
"""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from lm.models.layers import Dense, ModelConfig, gelu, make_norm, tied_logits
from lm.models.transformer import Encoder

HEAD_KINDS = ("mlm", "classification", "tagging")


@dataclasses.dataclass(frozen=True)
class HeadSpec:
  kind: str  # mlm | classification | tagging
  num_labels: int = 0  # classification / tagging outputs (1: a regression value)
  pooling: str = "cls"  # classification: cls (the first token, or with model.pooler the
  # encoder's pooled vector) | mean (over non-padding tokens)


def _with_bias(cfg):
  return dataclasses.replace(cfg, use_bias=True)  # heads always have biases, as BERT's do


class MlmHead(nn.Module):
  """BERT's masked-LM head: dense + GELU + norm, then the (tied) token embedding + a bias."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, h_BxLxD, embedding_VxD):
    cfg = self.cfg
    x_BxLxD = Dense((cfg.d_model,), ("embed", None), _with_bias(cfg), name="dense")(h_BxLxD)
    x_BxLxD = make_norm(cfg, "norm")(gelu(x_BxLxD))
    logits_BxLxV = tied_logits(cfg, embedding_VxD, x_BxLxD)
    bias_V = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                        (cfg.vocab_size,), cfg.weight_dtype)
    return logits_BxLxV + bias_V.astype(jnp.float32)


class ClassificationHead(nn.Module):
  """Pools the sequence (first token, the encoder's pooler, or the mean), then a linear layer."""

  cfg: ModelConfig
  spec: HeadSpec

  @nn.compact
  def __call__(self, h_BxLxD, pooled_BxD, segment_ids_BxL, deterministic):
    cfg, spec = self.cfg, self.spec
    if spec.pooling == "mean":
      real_BxLx1 = (segment_ids_BxL > 0)[..., None].astype(jnp.float32)
      pooled_BxD = (jnp.sum(h_BxLxD.astype(jnp.float32) * real_BxLx1, axis=1) /
                    jnp.maximum(jnp.sum(real_BxLx1, axis=1), 1.0)).astype(cfg.compute_dtype)
    elif pooled_BxD is None:
      pooled_BxD = h_BxLxD[:, 0]
    pooled_BxD = nn.Dropout(cfg.dropout)(pooled_BxD, deterministic=deterministic)
    return Dense((spec.num_labels,), ("embed", None), _with_bias(cfg),
                 name="out")(pooled_BxD).astype(jnp.float32)


class TaggingHead(nn.Module):
  """A linear layer on every token's hidden state."""

  cfg: ModelConfig
  spec: HeadSpec

  @nn.compact
  def __call__(self, h_BxLxD, deterministic):
    h_BxLxD = nn.Dropout(self.cfg.dropout)(h_BxLxD, deterministic=deterministic)
    return Dense((self.spec.num_labels,), ("embed", None), _with_bias(self.cfg),
                 name="out")(h_BxLxD).astype(jnp.float32)


class EncoderWithHead(nn.Module):
  cfg: ModelConfig
  head: HeadSpec

  @nn.compact
  def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None, type_ids_BxL=None,
               deterministic=True):
    encoder = Encoder(self.cfg, name="encoder")
    h_BxLxD, pooled_BxD = encoder(tokens_BxL, positions_BxL, segment_ids_BxL, type_ids_BxL,
                                  deterministic)
    if self.head.kind == "mlm":
      embedding_VxD = nn.unbox(encoder.variables["params"]["embed"]["embedding"])
      return MlmHead(self.cfg, name="mlm_head")(h_BxLxD, embedding_VxD)
    if segment_ids_BxL is None:
      segment_ids_BxL = jnp.ones(tokens_BxL.shape, jnp.int32)
    if self.head.kind == "classification":
      return ClassificationHead(self.cfg, self.head, name="classification_head")(
          h_BxLxD, pooled_BxD, segment_ids_BxL, deterministic)
    return TaggingHead(self.cfg, self.head, name="tagging_head")(h_BxLxD, deterministic)
