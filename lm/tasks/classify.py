"""Encoder task heads on labelled and tagged datasets: sequence classification and
regression (a pooled head, lm/models/heads.py) and token tagging (a per-token head).

Every evaluation brings each example's prediction to the host, where lm/scores.py scores the
whole split: accuracy and macro-F1 (classification, tagging), Pearson and Spearman
(regression). Rows are one example each, cut to data.length_bucket.
"""

from typing import ClassVar

import flax

from lm import objectives, scores
from lm.data import Batching, examples
from lm.errors import UserError
from lm.models.heads import EncoderWithHead, HeadSpec
from lm.tasks.base import Batch, PredictionTask


@flax.struct.dataclass
class LabelBatch(Batch):
  """One label (a class id, or a number for regression) per row."""
  inputs_BxL: object
  label_B: object
  example_weight_B: object  # 0 on the padding rows of a split's last batch
  segment_ids_BxL: object = None  # 1 on the text, 0 on padding (None: no padding)
  positions_BxL: object = None  # None: 0..L-1
  type_ids_BxL: object = None  # BERT's sentence A/B types (None: all A)

  def loss_weights(self):
    return self.example_weight_B


@flax.struct.dataclass
class TagBatch(Batch):
  """One tag per token (the first piece of each word; weight 0 elsewhere)."""
  inputs_BxL: object
  tags_BxL: object
  weights_BxL: object
  segment_ids_BxL: object = None
  positions_BxL: object = None

  def loss_weights(self):
    return self.weights_BxL


def _class_count(config, data, objective):
  have = len(data.prepared.label_names)
  wanted = config.task.num_labels or have
  if wanted < have:
    raise UserError(f"config.task.num_labels: {wanted} is fewer than the {have} labels of "
                    f"{data.source}")
  if wanted < 2:
    raise UserError(f"config.task.num_labels: {data.source} has {have} label(s); "
                    f"{objective} needs at least 2")
  return wanted


class _EncoderTask(PredictionTask):
  data_formats = ("labelled",)
  architecture = "encoder"

  @property
  def tied_output(self):
    return False

  def _apply(self, params, batch, dropout_key):
    return self.model.apply({"params": params}, batch.inputs_BxL, batch.positions_BxL,
                            batch.segment_ids_BxL, getattr(batch, "type_ids_BxL", None),
                            **self._flags(dropout_key))


def _class_row(record, data, seq_len, target_len):
  del target_len
  return examples.classification_example(record, data.tokenizer, seq_len)


class Classification(_EncoderTask):
  name = "classification"
  Batch = LabelBatch
  selection = ("accuracy", "max")
  batching = Batching("examples", example=_class_row)
  head_keys = ("classification_head",)

  @classmethod
  def resolve_num_labels(cls, config, data):
    return _class_count(config, data, cls.name)

  def build_model(self):
    return EncoderWithHead(self.model_cfg, HeadSpec("classification", self.num_labels,
                                                    self.pooling))

  def loss_sums(self, outputs, batch, label_smoothing=0.0):
    return objectives.classification_loss(outputs, batch.label_B, batch.example_weight_B)

  def eval_extras(self, outputs, batch):
    return {"prediction": outputs.argmax(-1), "label": batch.label_B,
            "weight": batch.example_weight_B}


def _regression_row(record, data, seq_len, target_len):
  del target_len
  if "value" not in record:
    raise UserError(f"config.task.objective: regression needs numeric labels, and "
                    f"{data.source} provides class labels only")
  return examples.classification_example(record, data.tokenizer, seq_len, regression=True)


class Regression(_EncoderTask):
  name = "regression"
  Batch = LabelBatch
  selection = ("pearson", "max")
  batching = Batching("examples", example=_regression_row)
  head_keys = ("classification_head",)

  @classmethod
  def resolve_num_labels(cls, config, data):
    return 1

  def build_model(self):
    return EncoderWithHead(self.model_cfg, HeadSpec("classification", 1, self.pooling))

  def loss_sums(self, outputs, batch, label_smoothing=0.0):
    return objectives.regression_loss(outputs[:, 0], batch.label_B, batch.example_weight_B)

  def eval_extras(self, outputs, batch):
    return {"prediction": outputs[:, 0], "label": batch.label_B,
            "weight": batch.example_weight_B}

  def scores(self, predictions, labels):
    return {"pearson": scores.pearson(predictions, labels),
            "spearman": scores.spearman(predictions, labels)}


def _tag_row(record, data, seq_len, target_len):
  del target_len
  return examples.tagging_example(record, data.tokenizer, seq_len, data.tag_ids)


class Tagging(_EncoderTask):
  name = "tagging"
  Batch = TagBatch
  data_formats = ("tagged",)
  selection = ("macro_f1", "max")
  batching = Batching("examples", example=_tag_row)
  head_keys = ("tagging_head",)
  count_name: ClassVar[str] = "tokens"

  @classmethod
  def resolve_num_labels(cls, config, data):
    return _class_count(config, data, cls.name)

  def build_model(self):
    return EncoderWithHead(self.model_cfg, HeadSpec("tagging", self.num_labels))

  def loss_sums(self, outputs, batch, label_smoothing=0.0):
    return objectives.token_loss(outputs, batch.tags_BxL, batch.weights_BxL)

  def eval_extras(self, outputs, batch):
    return {"prediction": outputs.argmax(-1), "label": batch.tags_BxL,
            "weight": batch.weights_BxL}
