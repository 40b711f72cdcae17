"""Drop-in for ``llms_from_scratch.ch03``."""

from .models.gpt import (CausalAttention, MultiHeadAttention, MultiHeadAttentionWrapper, PyTorchMultiHeadAttention,
                         SelfAttention_v1, SelfAttention_v2)

__all__ = ["SelfAttention_v1", "SelfAttention_v2", "CausalAttention", "MultiHeadAttentionWrapper",
           "MultiHeadAttention", "PyTorchMultiHeadAttention"]
