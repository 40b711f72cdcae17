"""Drop-in for ``llms_from_scratch.ch04``."""

from .generation import generate_text_simple
from .models.gpt import (GELU, FeedForward, FeedForwardFast, GPTModel, GPTModelFast, LayerNorm, MultiHeadAttention,
                         PyTorchMultiHeadAttention, TransformerBlock, TransformerBlockFast)
from ._star import with_reference_imports

__all__ = ["GPTModel", "TransformerBlock", "MultiHeadAttention", "PyTorchMultiHeadAttention", "FeedForward",
           "LayerNorm", "GELU", "generate_text_simple", "FeedForwardFast", "TransformerBlockFast", "GPTModelFast"]


# The names a star import of the reference's module also gives (see gptfast/_star.py).
__all__, __getattr__, __dir__ = with_reference_imports(__name__, __all__, {
    "nn": "torch.nn",
    "torch": "torch",
})
