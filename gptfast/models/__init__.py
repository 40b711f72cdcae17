"""Model architectures.

``gpt``: the GPT-2 of the book (chapters 3 and 4) and its attention variants;
``gpt_config``: its configurations (the book's 124M training config, the GPT-2 sizes, a tiny test model).
"""

from .gpt import (GELU, CausalAttention, FeedForward, FeedForwardFast, GPTModel, GPTModelFast, LayerNorm,
                  MultiHeadAttention, MultiHeadAttentionWrapper, PyTorchMultiHeadAttention, SelfAttention_v1,
                  SelfAttention_v2, TransformerBlock, TransformerBlockFast, merge_heads, residual_block, split_heads)
from .gpt_config import GPT2_SIZES, GPT2_VOCAB_SIZE, GPT_CONFIG_124M, MODEL_NAMES, TINY_CONFIG, gpt2_config

__all__ = ["GPTModel", "TransformerBlock", "MultiHeadAttention", "PyTorchMultiHeadAttention", "FeedForward",
           "LayerNorm", "GELU", "FeedForwardFast", "TransformerBlockFast", "GPTModelFast", "SelfAttention_v1",
           "SelfAttention_v2", "CausalAttention", "MultiHeadAttentionWrapper", "residual_block", "split_heads",
           "merge_heads", "GPT_CONFIG_124M", "GPT2_SIZES", "GPT2_VOCAB_SIZE", "MODEL_NAMES", "TINY_CONFIG",
           "gpt2_config"]
