"""What a run trains, chosen by config.task.objective: the model, its loss, its evaluation,
the batches it needs, and the validation score that picks the best checkpoint.

    objective       model                               data       best checkpoint by
    causal          Decoder                             text (*)   validation loss (lower)
    mlm             EncoderWithHead(mlm)                text (*)   validation loss (lower)
    classification  EncoderWithHead(classification, n)  labelled   validation accuracy
    regression      EncoderWithHead(classification, 1)  labelled   validation pearson
    tagging         EncoderWithHead(tagging, n)         tagged     validation macro_f1
    seq2seq         EncoderDecoder                      parallel   validation loss (lower)
    span_corruption EncoderDecoder                      text (*)   validation loss (lower)

(*) or the text column of a labelled dataset, e.g. to pretrain on a task's own sentences.
Language-model (and seq2seq) evaluations are token sums (loss, accuracy; always without
task.label_smoothing, which only the training loss uses); task evaluations bring every
example's prediction to the host, where lm/scores.py computes accuracy, macro-F1 and
correlations over the whole split.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np

from lm import objectives, scores
from lm.models import Decoder, lora
from lm.models.encoder_decoder import EncoderDecoder
from lm.models.heads import EncoderWithHead, HeadSpec

OBJECTIVES = ("causal", "mlm", "classification", "regression", "tagging", "seq2seq",
              "span_corruption")
ENCODER_DECODER = ("seq2seq", "span_corruption")
DATA_FORMATS = {"causal": ("text", "labelled"), "mlm": ("text", "labelled"),
                "classification": ("labelled",), "regression": ("labelled",),
                "tagging": ("tagged",), "seq2seq": ("parallel",),
                "span_corruption": ("text", "labelled")}
SELECTION = {"causal": ("loss", "min"), "mlm": ("loss", "min"),
             "classification": ("accuracy", "max"), "regression": ("pearson", "max"),
             "tagging": ("macro_f1", "max"), "seq2seq": ("loss", "min"),
             "span_corruption": ("loss", "min")}


class Task:

  def __init__(self, objective, model_cfg, num_labels=0, pooling="cls", adapters=None,
               label_smoothing=0.0):
    """`adapters`: lora.Adapters that init and apply add to the model (never to the head).
    `label_smoothing`: of the training loss of token predictions."""
    self.objective, self.model_cfg, self.num_labels = objective, model_cfg, num_labels
    self.label_smoothing = label_smoothing
    if objective == "causal":
      self.model = Decoder(model_cfg)
    elif objective in ENCODER_DECODER:
      self.model = EncoderDecoder(model_cfg)
    elif objective == "mlm":
      self.model = EncoderWithHead(model_cfg, HeadSpec("mlm"))
    elif objective == "tagging":
      self.model = EncoderWithHead(model_cfg, HeadSpec("tagging", num_labels))
    else:
      self.model = EncoderWithHead(model_cfg, HeadSpec(
          "classification", 1 if objective == "regression" else num_labels, pooling))
    self.selection = SELECTION[objective]
    self.data_formats = DATA_FORMATS[objective]
    self.adapters = adapters and dataclasses.replace(adapters, skip=self.head_keys)

  @property
  def is_language_model(self):
    """Scored by token losses (and evaluated on a sample of batches between whole-split
    evaluations, train.eval_steps)."""
    return self.objective in ("causal", "mlm") + ENCODER_DECODER

  @property
  def head_keys(self):
    """Top-level parameter names of the task head (absent from a pretrained body)."""
    if self.objective in ("causal",) + ENCODER_DECODER:
      return ()
    return ("mlm_head",) if self.objective == "mlm" else (
        "tagging_head" if self.objective == "tagging" else "classification_head",)

  @property
  def tied_output(self):
    """Whether the output projection multiplies by the token embedding (for FLOP counts)."""
    return self.objective == "mlm" or (self.objective in ("causal",) + ENCODER_DECODER and
                                       self.model_cfg.tie_embeddings)

  @property
  def attention_layers(self):
    """Attention blocks a token's FLOPs go through (an encoder-decoder's target token: the
    encoder's self-attention over its source token, its own, and cross-attention)."""
    return self.model_cfg.num_layers * (3 if self.objective in ENCODER_DECODER else 1)

  def init(self, key, tokens_BxL):
    with lora.attach(self.adapters):
      if self.objective in ENCODER_DECODER:
        return self.model.init({"params": key}, tokens_BxL, jnp.ones_like(tokens_BxL),
                               tokens_BxL)["params"]
      return self.model.init({"params": key}, tokens_BxL)["params"]

  def apply(self, params, batch, dropout_key=None):
    with lora.attach(self.adapters):
      return self._apply(params, batch, dropout_key)

  def _apply(self, params, batch, dropout_key):
    deterministic = dropout_key is None
    rngs = None if deterministic else {"dropout": dropout_key}
    if self.objective == "causal":
      return self.model.apply({"params": params}, batch["inputs"], batch.get("positions"),
                              batch.get("segment_ids"), deterministic=deterministic, rngs=rngs)
    if self.objective in ENCODER_DECODER:
      return self.model.apply({"params": params}, batch["source"], batch["source_segment_ids"],
                              batch["inputs"], batch["segment_ids"],
                              deterministic=deterministic, rngs=rngs)
    return self.model.apply({"params": params}, batch["inputs"], batch.get("positions"),
                            batch.get("segment_ids"), batch.get("type_ids"),
                            deterministic=deterministic, rngs=rngs)

  def _loss_sums(self, outputs, batch, label_smoothing=0.0):
    if self.is_language_model:
      return objectives.token_loss(outputs, batch["targets"], batch["weights"],
                                   label_smoothing)
    if self.objective == "tagging":
      return objectives.token_loss(outputs, batch["tags"], batch["weights"])
    if self.objective == "regression":
      return objectives.regression_loss(outputs[:, 0], batch["label"], batch["example_weight"])
    return objectives.classification_loss(outputs, batch["label"], batch["example_weight"])

  def loss(self, params, batch, dropout_key=None):
    """(sum of example/token losses, sum of their weights)."""
    return self._loss_sums(self.apply(params, batch, dropout_key), batch, self.label_smoothing)

  def eval_outputs(self, params, batch):
    """Device arrays for one evaluation batch: sums, or every example's prediction."""
    outputs = self.apply(params, batch)
    loss_sum, weight_sum = self._loss_sums(outputs, batch)
    result = {"loss_sum": loss_sum, "weight_sum": weight_sum}
    if self.objective in ("mlm",) + ENCODER_DECODER:
      result["correct_sum"] = objectives.correct_tokens(outputs, batch["targets"],
                                                        batch["weights"])
    elif self.objective == "tagging":
      result.update(prediction=outputs.argmax(-1), label=batch["tags"], weight=batch["weights"])
    elif self.objective == "regression":
      result.update(prediction=outputs[:, 0], label=batch["label"],
                    weight=batch["example_weight"])
    elif self.objective == "classification":
      result.update(prediction=outputs.argmax(-1), label=batch["label"],
                    weight=batch["example_weight"])
    return result

  def summarize(self, outputs):
    """Metrics of a whole evaluation from the host copies of `eval_outputs`."""
    loss_sum = sum(float(o["loss_sum"]) for o in outputs)
    weight_sum = sum(float(o["weight_sum"]) for o in outputs)
    result = {"loss": loss_sum / max(weight_sum, 1.0)}
    if self.is_language_model:
      result["perplexity"] = float(np.exp(min(result["loss"], 80.0)))
      result["tokens"] = weight_sum
      if self.objective in ("mlm",) + ENCODER_DECODER:
        result["accuracy"] = sum(float(o["correct_sum"]) for o in outputs) / max(weight_sum, 1)
      return result
    real = np.concatenate([np.ravel(o["weight"]) for o in outputs]) > 0
    predictions = np.concatenate([np.ravel(o["prediction"]) for o in outputs])[real]
    labels = np.concatenate([np.ravel(o["label"]) for o in outputs])[real]
    result["examples" if self.objective != "tagging" else "tokens"] = int(real.sum())
    if self.objective == "regression":
      result.update(pearson=scores.pearson(predictions, labels),
                    spearman=scores.spearman(predictions, labels))
    else:
      result.update(accuracy=scores.accuracy(predictions, labels),
                    macro_f1=scores.macro_f1(predictions, labels, self.num_labels))
    return result

  def better(self, a, b):
    """Whether validation result `a` beats `b` (None: nothing yet) by the selection score."""
    name, mode = self.selection
    return b is None or (a[name] < b[name] if mode == "min" else a[name] > b[name])
