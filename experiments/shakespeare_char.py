"""nanoGPT's CPU reference on Tiny Shakespeare, characters (its `shakespeare_char` CPU run).

4 layers, 4 heads, d_model 128, context 64, batch 12, 2,000 AdamW steps with 100 warm-up
steps and cosine decay, betas (0.9, 0.99), weight decay 0.1, grad clip 1, no dropout,
learned positions, LayerNorm, GELU, tied embeddings; 90/10 train/validation split by
characters. lm is held to validation loss <= 1.90 over the whole validation split.

One change from nanoGPT: the learning rate peaks at 2e-3 and decays to 2e-4 (nanoGPT: 1e-3
to 1e-4). Over the whole validation split, nanoGPT's rates end at 1.908 in lm and 1.914 in
PyTorch (benchmarks/pytorch_reference.py); these end at 1.80-1.81 (float32 and bfloat16).

25 train steps per dispatch (train.steps_per_dispatch): a third faster than one per call on
a 2-core CPU, with the same updates. On CPUs with bfloat16 dot products (AVX512-BF16, AMX)
`--config.model.dtype=bfloat16` is about a third faster again, at the same validation loss.

    python -m lm.main --config=experiments/shakespeare_char.py \
        --config.data.path=../shared/data/tiny_shakespeare/input.txt

Without data.path it reads the TFDS catalog's tiny_shakespeare (downloaded once; TFDS splits
it 90/5/5 into train/validation/test).
"""

import os

from lm.config import defaults

_SHARED_COPY = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                            "tiny_shakespeare", "input.txt")


def get_config():
  config = defaults()
  config.data.name = "tiny_shakespeare"
  config.data.path = os.path.normpath(_SHARED_COPY) if os.path.exists(_SHARED_COPY) else ""
  config.data.tokenizer = "char"
  config.data.seq_len = 64
  config.data.validation_fraction = 0.1
  config.data.test_fraction = 0.0

  # nanoGPT's model, optimizer and batch (above) are lm's defaults: 4 layers of d_model 128,
  # batch 12, AdamW (0.9, 0.99), weight decay 0.1, clip 1, 100 warm-up steps.
  config.model.max_len = 64

  config.train.steps_per_dispatch = 25  # divides log_every, eval_every, checkpoint_every
  config.train.num_steps = 2000
  config.train.learning_rate = 2e-3  # nanoGPT: 1e-3 (see above)
  config.train.min_learning_rate = 2e-4
  config.train.log_every = 100

  config.sample.num_tokens = 300
  return config
