"""Pure Flax Transformer models."""

from lm.models.layers import ModelConfig
from lm.models.transformer import Decoder

__all__ = ["Decoder", "ModelConfig"]
