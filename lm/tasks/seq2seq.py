"""Encoder-decoder tasks: translation on a parallel dataset (seq2seq) and T5's span
corruption of text windows. Both score the decoder's target tokens (loss, accuracy); a
seq2seq run's final evaluations add BLEU and chrF of beam-search translations."""

import flax
import jax.numpy as jnp

from lm import metrics
from lm.data import Batching, examples
from lm.errors import ConfigError
from lm.models.encoder_decoder import EncoderDecoder
from lm.tasks.base import Batch, TokenAccuracyTask

SPAN_SEED_SALT = 0x5350414E  # keeps span-corruption noise independent of the window order


@flax.struct.dataclass
class Seq2SeqBatch(Batch):
  """A source read by the encoder and a target the decoder predicts, teacher-forced."""
  source_BxS: object
  source_segment_ids_BxS: object  # 0 on padding
  inputs_BxL: object  # bos + target[:-1]
  targets_BxL: object
  segment_ids_BxL: object
  weights_BxL: object

  def loss_weights(self):
    return self.weights_BxL


class _EncoderDecoderTask(TokenAccuracyTask):
  Batch = Seq2SeqBatch
  architecture = "encoder_decoder"
  selection = ("loss", "min")
  token_kind = "target "

  def build_model(self):
    return EncoderDecoder(self.model_cfg)

  def _init(self, key, tokens_BxL):
    return self.model.init({"params": key}, tokens_BxL, jnp.ones_like(tokens_BxL),
                           tokens_BxL)["params"]

  def _apply(self, params, batch, dropout_key):
    return self.model.apply({"params": params}, batch.source_BxS, batch.source_segment_ids_BxS,
                            batch.inputs_BxL, batch.segment_ids_BxL, **self._flags(dropout_key))


  def example_flops(self, abstract_params, abstract_frozen, lengths, causal_share=1.0):
    source_len, target_len = lengths  # the encoder reads the source, the decoder the target
    return metrics.encoder_decoder_train_flops(abstract_params, self.model_cfg, source_len,
                                               target_len, self.tied_output, abstract_frozen,
                                               causal_share)

  def batch_lengths(self, batch):
    return (batch.source_BxS.shape[-1], batch.inputs_BxL.shape[-1])

  def nominal_lengths(self, seq_len):
    return (seq_len, seq_len)


def _pair_row(record, data, seq_len, target_len):
  return examples.seq2seq_example(record, data.tokenizer, seq_len, target_len or seq_len)


class Seq2Seq(_EncoderDecoderTask):
  name = "seq2seq"
  data_formats = ("parallel",)
  batching = Batching("examples", example=_pair_row)
  translates = True


def _corrupted_row(row, tokenizer, rng, data):
  return examples.span_corruption_example(row, tokenizer, data.sentinels, rng,
                                          len(row["inputs"]))


class SpanCorruption(_EncoderDecoderTask):
  name = "span_corruption"
  data_formats = ("text", "labelled")
  batching = Batching("windows", transform=_corrupted_row, salt=SPAN_SEED_SALT, bucketed=True)

  @classmethod
  def check_config(cls, config):
    if not config.model.extra_tokens:
      raise ConfigError("model.extra_tokens", "span_corruption replaces each noise span by a "
                        "sentinel id after the vocabulary: set it > 0 (T5 uses 100)")
