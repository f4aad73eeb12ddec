"""lm: Transformer language models in JAX/Flax, from corpus to served model."""

__version__ = "0.1.0"
