"""Causal language modelling: a Decoder predicts each next token of packed text windows.

Trained on a text dataset (or a labelled one's text column); evaluated by token loss, plus
nats per character over a whole split; a run ends with a sample. Windows of a one-document
corpus leave out segment ids and positions (TokenBatch's None), so the model applies its
plain causal mask.
"""

from lm.data import Batching
from lm.models import Decoder
from lm.tasks.base import TokenBatch, TokenTask


class CausalLM(TokenTask):
  name = "causal"
  Batch = TokenBatch
  data_formats = ("text", "labelled")
  selection = ("loss", "min")
  architecture = "decoder"
  batching = Batching("windows", one_document_plain=True)
  ends_with_sample = True
  per_character = True
  causal_attention = True

  def build_model(self):
    return Decoder(self.model_cfg)

  def _apply(self, params, batch, dropout_key):
    return self.model.apply({"params": params}, batch.inputs_BxL, batch.positions_BxL,
                            batch.segment_ids_BxL, **self._flags(dropout_key))
