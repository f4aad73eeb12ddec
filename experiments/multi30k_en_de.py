"""English -> German translation on Multi30k (29k caption pairs): the encoder-decoder
Transformer, trained from scratch, scored by BLEU and chrF on test_2016_flickr.

    python -m lm.main --config=experiments/multi30k_en_de.py --workdir=runs/multi30k
    python -m lm.translate --workdir=runs/multi30k --input=src.en --output=hyp.de

`--config.data.path` names the folder of {train,val,test_2016_flickr}.{en,de}[.gz] files
(default: ../shared/data/multi30k beside this repository; without it, the files are
downloaded once from the multi30k/dataset repository). One SentencePiece unigram
vocabulary of 8,000 pieces is trained on both languages; the source, target and output
embeddings are one matrix. A 3+3-layer pre-norm model of width 256 (9.6M parameters) with
label smoothing 0.1; the final figures are beam-search (4, length penalty 0.6)
translations of the whole validation and test sets, scored by sacrebleu.
"""

import os

from lm.config import defaults

MULTI30K = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                                         "data", "multi30k"))


def get_config():
  config = defaults()
  config.task.objective = "seq2seq"
  config.task.label_smoothing = 0.1

  config.data.name = "multi30k"
  config.data.path = MULTI30K if os.path.isdir(MULTI30K) else ""
  config.data.format = "parallel"
  config.data.tokenizer = "unigram"
  config.data.vocab_size = 8000
  config.data.seq_len = 64  # every sentence fits; batches are cut to their longest

  config.model.num_layers = 3  # each side
  config.model.d_model = 256
  config.model.d_ff = 1024
  config.model.max_len = 64
  config.model.dropout = 0.1

  config.train.batch_size = 64
  config.train.num_steps = 4000  # about 9 epochs
  config.train.min_learning_rate = 5e-5
  config.train.warmup_steps = 400
  config.train.b2 = 0.98
  config.train.weight_decay = 0.01
  config.train.eval_every = 500
  config.train.eval_steps = 0  # the whole validation set
  config.train.log_every = 100
  config.sample.num_tokens = 0
  return config
