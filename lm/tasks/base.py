"""What every task (lm/tasks/*.py) provides, and the typed batches they train on.

A task is one objective: the model it builds, the batch it expects, its loss, its
evaluation outputs and their summary, the score that picks the best checkpoint, its FLOPs per
example and how its rows come out of a dataset (lm/data: `Batching`). Everything outside
lm/tasks/ asks the task; nothing compares objective names.

Batches are flax struct dataclasses whose field names carry their shapes (`inputs_BxL`,
`label_B`, `source_BxS`): B rows, L target (or input) positions, S source positions. The
data pipeline yields host dicts keyed by the names without the suffix (`inputs`, `label`);
`Batch.from_host` takes the fields the task declares and leaves host-only ones (the
lengths length buckets cut by) behind. An optional field left None is part of the type: a
TokenBatch without segment ids is one document per row, under the plain causal mask.
"""

import abc
import dataclasses
import re
from typing import ClassVar

import flax
import numpy as np

from lm import metrics, objectives, scores
from lm.errors import UserError
from lm.models import lora

_SHAPE_SUFFIX = re.compile(r"_[A-Z](x[A-Z])*$")


def host_key(field_name):
  """The data pipeline's name of a batch field: `source_segment_ids_BxS` -> `source_segment_ids`."""
  return _SHAPE_SUFFIX.sub("", field_name)


class Batch:
  """Base of the typed batches: conversion from the pipeline's host dicts."""

  @classmethod
  def from_host(cls, batch):
    """`batch` (a host dict, of arrays or ShapeDtypeStructs) as this type; a batch of this
    type as it is. A required field missing from the dict is an error naming it."""
    if isinstance(batch, cls):
      return batch
    values = {}
    for field in dataclasses.fields(cls):
      key = host_key(field.name)
      if key in batch:
        values[field.name] = batch[key]
      elif field.default is dataclasses.MISSING:
        raise UserError(f"a {cls.__name__} needs {key!r}; the batch has "
                        f"{', '.join(sorted(batch))}")
    return cls(**values)

  def shapes(self):
    """(field, shape) of every present field: which compiled program serves this batch."""
    return tuple((f.name, tuple(getattr(self, f.name).shape)) for f in dataclasses.fields(self)
                 if getattr(self, f.name) is not None)

  @property
  def rows_and_length(self):
    """(B, L) of the batch's inputs (a leading steps axis, if stacked, is not counted)."""
    return tuple(self.inputs_BxL.shape[-2:])

  @property
  def num_tokens(self):
    """Input positions in the batch, padding included (tokens/s counts them)."""
    return self.inputs_BxL.size


@flax.struct.dataclass
class TokenBatch(Batch):
  """Token predictions over packed windows (causal LM, masked LM)."""
  inputs_BxL: object
  targets_BxL: object
  weights_BxL: object  # 0 on padding (and, for masked LM, on tokens not chosen)
  segment_ids_BxL: object = None  # None: one document per row (plain causal mask)
  positions_BxL: object = None  # None: 0..L-1

  def loss_weights(self):
    return self.weights_BxL


class Task(abc.ABC):
  """The protocol. Subclasses set the class attributes and implement build_model,
  _apply, loss_sums and the evaluation methods that differ from these defaults."""

  name: ClassVar[str]
  Batch: ClassVar[type]
  data_formats: ClassVar[tuple]  # the config.data.format values it trains on
  selection: ClassVar[tuple]  # (validation metric, "min" | "max") that picks the best
  batching: ClassVar[object]  # lm.data.Batching
  architecture: ClassVar[str]  # decoder | encoder | encoder_decoder: what interop and decoding see
  head_keys: ClassVar[tuple] = ()  # top-level parameter names of the task head
  # Scored by token sums (evaluated on a sample of batches between whole-split evaluations,
  # train.eval_steps); otherwise every example's prediction goes to the host.
  token_scored: ClassVar[bool] = True
  token_kind: ClassVar[str] = ""  # "masked " / "target ": what the final log line counts
  ends_with_sample: ClassVar[bool] = False  # a causal LM prints a sample after training
  translates: ClassVar[bool] = False  # final evaluations add BLEU and chrF
  per_character: ClassVar[bool] = False  # final evaluations add nats per character
  causal_attention: ClassVar[bool] = False  # the (decoder's) self-attention is causal
  # A top-level key under which the frozen tree holds a copy of the model's initial
  # parameters that the loss reads (dpo's reference under full fine-tuning); "" for none.
  reference_key: ClassVar[str] = ""

  def __init__(self, model_cfg, num_labels=0, pooling="cls", adapters=None,
               label_smoothing=0.0, options=None):
    """`adapters`: lora.Adapters that init and apply add to the model (never to the head).
    `label_smoothing`: of the training loss of token predictions. `options`: config.task."""
    self.model_cfg, self.num_labels, self.pooling = model_cfg, num_labels, pooling
    self.options = dict(options or {})
    self.label_smoothing = label_smoothing
    self.model = self.build_model()
    self.adapters = adapters and dataclasses.replace(adapters, skip=self.head_keys)

  @classmethod
  def resolve_num_labels(cls, config, data):
    """The head's outputs for this config and dataset (0: no classification head)."""
    del config, data
    return 0

  @classmethod
  def check_config(cls, config):
    """Raise lm.config.ConfigError if the config cannot train this task (after the fields
    themselves passed validation)."""
    del config

  @abc.abstractmethod
  def build_model(self):
    """The Flax module this task trains."""

  @abc.abstractmethod
  def _apply(self, params, batch, dropout_key):
    """The model's outputs for a typed batch."""

  @abc.abstractmethod
  def loss_sums(self, outputs, batch, label_smoothing=0.0):
    """(sum of losses, sum of weights) of the outputs."""

  # The model.

  def init(self, key, tokens_BxL):
    with lora.attach(self.adapters):
      return self._init(key, tokens_BxL)

  def _init(self, key, tokens_BxL):
    return self.model.init({"params": key}, tokens_BxL)["params"]

  def apply(self, params, batch, dropout_key=None):
    batch = self.Batch.from_host(batch)
    with lora.attach(self.adapters):
      return self._apply(params, batch, dropout_key)

  @staticmethod
  def _flags(dropout_key):
    deterministic = dropout_key is None
    return {"deterministic": deterministic,
            "rngs": None if deterministic else {"dropout": dropout_key}}

  # Loss and evaluation.

  def loss(self, params, batch, dropout_key=None):
    """(sum of example/token losses, sum of their weights)."""
    batch = self.Batch.from_host(batch)
    return self.loss_sums(self.apply(params, batch, dropout_key), batch, self.label_smoothing)

  def eval_outputs(self, params, batch):
    """Device arrays for one evaluation batch: sums, or every example's prediction."""
    batch = self.Batch.from_host(batch)
    outputs = self.apply(params, batch)
    loss_sum, weight_sum = self.loss_sums(outputs, batch)
    return {"loss_sum": loss_sum, "weight_sum": weight_sum,
            **self.eval_extras(outputs, batch)}

  def eval_extras(self, outputs, batch):
    del outputs, batch
    return {}

  def summarize(self, outputs):
    """Metrics of a whole evaluation from the host copies of `eval_outputs`: token tasks'
    loss, perplexity and token count (subclasses add accuracy)."""
    loss_sum = sum(float(o["loss_sum"]) for o in outputs)
    weight_sum = sum(float(o["weight_sum"]) for o in outputs)
    loss = loss_sum / max(weight_sum, 1.0)
    return {"loss": loss, "perplexity": float(np.exp(min(loss, 80.0))), "tokens": weight_sum}

  def better(self, a, b):
    """Whether validation result `a` beats `b` (None: nothing yet) by the selection score."""
    name, mode = self.selection
    return b is None or (a[name] < b[name] if mode == "min" else a[name] > b[name])

  # Cost.

  @property
  def tied_output(self):
    """Whether the output projection multiplies by the token embedding (for FLOP counts)."""
    return self.model_cfg.tie_embeddings

  def example_flops(self, abstract_params, abstract_frozen, lengths, causal_share=1.0):
    """Model FLOPs of training on one row whose batch has these `lengths` (batch_lengths).
    `causal_share`: of causal self-attention's FLOPs, what is counted
    (metrics.CAUSAL_ATTENTION_SHARE); bidirectional attention counts whole."""
    (length,) = lengths
    return length * metrics.train_flops_per_token(
        abstract_params, self.model_cfg, length, self.tied_output, abstract_frozen,
        attention_share=causal_share if self.causal_attention else 1.0)

  def batch_lengths(self, batch):
    """The lengths example_flops depends on, of a typed batch: (L,)."""
    return (batch.inputs_BxL.shape[-1],)

  def nominal_lengths(self, seq_len):
    """batch_lengths of a batch at data.seq_len (for the FLOPs per step printed at start)."""
    return (seq_len,)


class TokenTask(Task):
  """A task predicting target tokens: summed token losses (label-smoothed in training)."""

  def loss_sums(self, outputs, batch, label_smoothing=0.0):
    return objectives.token_loss(outputs, batch.targets_BxL, batch.weights_BxL,
                                 label_smoothing)


class TokenAccuracyTask(TokenTask):
  """A TokenTask whose evaluations also count the tokens predicted right (accuracy)."""

  def eval_extras(self, outputs, batch):
    return {"correct_sum": objectives.correct_tokens(outputs, batch.targets_BxL,
                                                     batch.weights_BxL)}

  def summarize(self, outputs):
    result = super().summarize(outputs)
    result["accuracy"] = (sum(float(o["correct_sum"]) for o in outputs)
                          / max(result["tokens"], 1))
    return result


class PredictionTask(Task):
  """A task scored from every example's prediction on the host (lm/scores.py)."""

  token_scored = False
  count_name: ClassVar[str] = "examples"

  def summarize(self, outputs):
    loss_sum = sum(float(o["loss_sum"]) for o in outputs)
    weight_sum = sum(float(o["weight_sum"]) for o in outputs)
    result = {"loss": loss_sum / max(weight_sum, 1.0)}
    real = np.concatenate([np.ravel(o["weight"]) for o in outputs]) > 0
    predictions = np.concatenate([np.ravel(o["prediction"]) for o in outputs])[real]
    labels = np.concatenate([np.ravel(o["label"]) for o in outputs])[real]
    result[self.count_name] = int(real.sum())
    result.update(self.scores(predictions, labels))
    return result

  def scores(self, predictions, labels):
    return {"accuracy": scores.accuracy(predictions, labels),
            "macro_f1": scores.macro_f1(predictions, labels, self.num_labels)}
