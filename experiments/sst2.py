"""SST-2 sentiment classification, fine-tuned from the MLM-pretrained encoder.

Starts from experiments/bert_mlm.py's best checkpoint (its architecture and tokenizer come
with it), puts a fresh classification head on the first token ([CLS], the tokenizer's bos),
and trains on SST-2's 67,349 training phrases; accuracy and macro-F1 over all 872 dev
sentences pick the best checkpoint (workdir/best), and three evaluations without a better
accuracy end the run.

    python -m lm.main --config=experiments/bert_mlm.py --workdir=runs/bert_mlm
    python -m lm.main --config=experiments/sst2.py --workdir=runs/sst2
    python -m lm.sweep --config=experiments/sst2.py \\
        --sweep=train.learning_rate=1e-4,3e-4 --sweep=train.batch_size=16,32

`--config.init_from=` (empty) trains the same encoder from scratch, for comparison.
"""

import os

from lm.config import defaults, load_experiment

SST2 = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                     "sst2"))


def get_config():
  config = defaults()
  config.init_from = "runs/bert_mlm"
  config.task.objective = "classification"
  config.data.name = "glue/sst2"
  config.data.path = SST2 if os.path.isdir(SST2) else ""
  config.data.format = "labelled"
  config.data.tokenizer = "unigram"  # used only without init_from
  config.data.seq_len = 64

  # experiments/bert_mlm.py's architecture, for --config.init_from= (from scratch); with
  # init_from, the checkpoint's own is used.
  config.model = load_experiment(os.path.join(os.path.dirname(__file__), "bert_mlm.py")).model

  config.train.batch_size = 32
  config.train.learning_rate = 1e-4
  config.train.head_learning_rate = 1e-3
  config.train.min_learning_rate = 1e-5
  config.train.weight_decay = 0.01
  config.train.eval_every = 100
  config.train.early_stopping = 3
  config.sample.num_tokens = 0
  return config
