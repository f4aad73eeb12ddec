"""Masked language modelling (BERT): an Encoder with a tied masked-LM head recovers the
chosen 15% of each packed window's tokens (80% shown as `mask`, 10% as a random token, 10%
unchanged; lm/data/examples.py). Masks are seeded by (seed, window), so a resumed run sees
the same ones. Evaluated by the loss and accuracy on the chosen tokens."""

from lm.data import Batching, examples
from lm.models.heads import EncoderWithHead, HeadSpec
from lm.tasks.base import TokenAccuracyTask, TokenBatch

MLM_SEED_SALT = 0x4D4C4D  # keeps MLM masks independent of the window order


def _masked_row(row, tokenizer, rng, data):
  del data
  return examples.mlm_example(row, tokenizer, rng)


class MaskedLM(TokenAccuracyTask):
  name = "mlm"
  Batch = TokenBatch
  data_formats = ("text", "labelled")
  selection = ("loss", "min")
  architecture = "encoder"
  batching = Batching("windows", transform=_masked_row, salt=MLM_SEED_SALT)
  head_keys = ("mlm_head",)
  token_kind = "masked "

  def build_model(self):
    return EncoderWithHead(self.model_cfg, HeadSpec("mlm"))

  @property
  def tied_output(self):
    return True  # BERT's masked-LM head multiplies by the token embedding

  def _apply(self, params, batch, dropout_key):
    return self.model.apply({"params": params}, batch.inputs_BxL, batch.positions_BxL,
                            batch.segment_ids_BxL, None, **self._flags(dropout_key))

