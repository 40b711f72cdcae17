"""Drop-in for ``llms_from_scratch.ch04``."""

from .generation import generate_text_simple
from .models.gpt import (GELU, FeedForward, FeedForwardFast, GPTModel, GPTModelFast, LayerNorm, MultiHeadAttention,
                         PyTorchMultiHeadAttention, TransformerBlock, TransformerBlockFast)

__all__ = ["GPTModel", "TransformerBlock", "MultiHeadAttention", "PyTorchMultiHeadAttention", "FeedForward",
           "LayerNorm", "GELU", "generate_text_simple", "FeedForwardFast", "TransformerBlockFast", "GPTModelFast"]
