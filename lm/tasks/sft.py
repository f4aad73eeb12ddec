"""Supervised fine-tuning on conversations (chat SFT): a Decoder learns the assistant's
tokens of conversations rendered with its chat template.

The data (config.data.format chat) is encoded by lm/data/conversations.py: weight 1 on the
tokens data.train_on names (every assistant turn by default: its content and end-of-turn
marker), 0 on the rest. Several conversations share a row (lm/data/packing.py), each its own
segment with positions from 0, so the loss is the completion-only token cross-entropy of
each conversation as if it were alone. Evaluated by that loss on the held-out conversations.
"""

from lm.data import Batching
from lm.tasks.base import TokenBatch
from lm.tasks.causal import CausalLM


class ChatSFT(CausalLM):
  name = "sft"
  Batch = TokenBatch
  data_formats = ("chat",)
  batching = Batching("packed")
  per_character = False
