"""What a run trains, chosen by config.task.objective: one module per objective family.

    objective       task (module)                    model                         data (*)
    causal          CausalLM (causal.py)             Decoder                       text
    sft             ChatSFT (sft.py)                 Decoder                       chat
    dpo             DPO (preference.py)              Decoder (+ frozen reference)  preference
    mlm             MaskedLM (masked.py)             EncoderWithHead(mlm)          text
    classification  Classification (classify.py)     EncoderWithHead(pooled, n)    labelled
    regression      Regression (classify.py)         EncoderWithHead(pooled, 1)    labelled
    tagging         Tagging (classify.py)            EncoderWithHead(tagging, n)   tagged
    seq2seq         Seq2Seq (seq2seq.py)             EncoderDecoder                parallel
    span_corruption SpanCorruption (seq2seq.py)      EncoderDecoder                text

(*) the token-stream tasks also train on the text column of a labelled dataset.

Each task (lm/tasks/base.py) says which model it builds, the typed batch it expects, its
loss, its evaluation outputs and summary, the validation score that picks the best
checkpoint, its FLOPs per example and how its rows come out of the data (lm.data.Batching).
Language-model (and seq2seq) evaluations are token sums (loss, accuracy; always without
task.label_smoothing, which only the training loss uses); the other tasks bring every
example's prediction to the host, where lm/scores.py scores the whole split.

Adding an objective is one module with a Task subclass, plus its line in REGISTRY.
"""

from lm.tasks.base import Batch, Task, TokenBatch
from lm.tasks.causal import CausalLM
from lm.tasks.classify import Classification, LabelBatch, Regression, TagBatch, Tagging
from lm.tasks.masked import MaskedLM
from lm.tasks.seq2seq import Seq2Seq, Seq2SeqBatch, SpanCorruption
from lm.tasks.preference import DPO, PreferenceBatch
from lm.tasks.sft import ChatSFT

__all__ = ["Batch", "LabelBatch", "REGISTRY", "Seq2SeqBatch", "TagBatch", "Task", "TokenBatch",
           "get", "make", "make_from_config"]

REGISTRY = {cls.name: cls for cls in (CausalLM, ChatSFT, DPO, MaskedLM, Classification, Regression, Tagging,
                                      Seq2Seq, SpanCorruption)}
OBJECTIVES = tuple(REGISTRY)


def get(objective):
  """The Task class of an objective name (config.task.objective)."""
  try:
    return REGISTRY[objective]
  except KeyError:
    raise KeyError(f"unknown objective {objective!r}; lm knows {', '.join(REGISTRY)}") from None


def make(objective, model_cfg, num_labels=0, pooling="cls", adapters=None,
         label_smoothing=0.0, options=None):
  """A task instance: its model built for `model_cfg` (lm.models.ModelConfig). `options`:
  config.task's fields, for the tasks that read more of them (dpo's beta)."""
  return get(objective)(model_cfg, num_labels=num_labels, pooling=pooling, adapters=adapters,
                        label_smoothing=label_smoothing, options=options)


def make_from_config(config, model_cfg, num_labels, adapters=None):
  """The task config.task describes."""
  return make(config.task.objective, model_cfg, num_labels, config.task.pooling, adapters,
              config.task.label_smoothing, config.task.to_dict())
