"""Drop-in for ``llms_from_scratch.ch03``."""

from .models.gpt import (CausalAttention, MultiHeadAttention, MultiHeadAttentionWrapper, PyTorchMultiHeadAttention,
                         SelfAttention_v1, SelfAttention_v2)
from ._star import with_reference_imports

__all__ = ["SelfAttention_v1", "SelfAttention_v2", "CausalAttention", "MultiHeadAttentionWrapper",
           "MultiHeadAttention", "PyTorchMultiHeadAttention"]


# The names a star import of the reference's module also gives (see gptfast/_star.py).
__all__, __getattr__, __dir__ = with_reference_imports(__name__, __all__, {
    "nn": "torch.nn",
    "torch": "torch",
})
