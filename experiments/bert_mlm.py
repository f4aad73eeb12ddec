"""Masked-LM pretraining of a small BERT-style encoder on SST-2's training sentences.

The unlabelled side of the seed's pipeline: pretrain on text, then fine-tune with a task head
(experiments/sst2.py, which starts from this run's best checkpoint). The corpus is the text
column of SST-2's train.tsv (67,349 movie-review phrases; labels unused), validated on
dev.tsv's sentences; a unigram SentencePiece vocabulary is trained on the train split.
15% of the tokens are chosen, 80/10/10 masked/random/kept, and scored (loss, accuracy).

    python -m lm.main --config=experiments/bert_mlm.py --workdir=runs/bert_mlm

Without the shared copy of SST-2 it reads the TFDS catalog's glue/sst2 (downloaded once).
"""

import os

from lm.config import defaults

SST2 = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                     "sst2"))


def get_config():
  config = defaults()
  config.task.objective = "mlm"
  config.data.name = "glue/sst2"
  config.data.path = SST2 if os.path.isdir(SST2) else ""
  config.data.format = "labelled"
  config.data.tokenizer = "unigram"
  config.data.seq_len = 64  # packed windows of whole phrases

  config.model.d_model = 256
  config.model.d_ff = 1024
  config.model.max_len = 128
  # model.norm_position stays "pre": it trains from scratch without care ("post" is BERT's)
  config.model.use_bias = True
  config.model.dropout = 0.1

  config.train.batch_size = 32
  config.train.num_steps = 1200
  config.train.weight_decay = 0.01
  config.train.eval_every = 300
  config.train.eval_steps = 0  # the whole dev split
  config.train.checkpoint_every = 300
  config.sample.num_tokens = 0  # an encoder does not sample text
  return config
