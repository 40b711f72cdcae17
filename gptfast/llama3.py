"""Drop-in for ``llms_from_scratch.llama3`` (Llama 3.2 1B/3B); the code lives in ``gptfast.models.llama3``."""

from .models.llama3 import (LLAMA32_CONFIG_1B, LLAMA32_CONFIG_3B, ChatFormat, FeedForward, GroupedQueryAttention,
                            GroupedQueryAttentionFast, Llama3Model, Llama3ModelFast, Llama3Tokenizer,
                            TransformerBlock, TransformerBlockFast, apply_rope, assign, clean_text,
                            compute_rope_params, load_weights_into_llama)
from ._star import LLAMA3_IMPORTS, with_reference_imports

__all__ = ["LLAMA32_CONFIG_1B", "LLAMA32_CONFIG_3B", "Llama3Model", "TransformerBlock", "FeedForward",
           "GroupedQueryAttention", "compute_rope_params", "apply_rope", "Llama3Tokenizer", "ChatFormat", "clean_text",
           "GroupedQueryAttentionFast", "TransformerBlockFast", "Llama3ModelFast", "assign", "load_weights_into_llama"]


# The names a star import of the reference's module also gives (see gptfast/_star.py).
__all__, __getattr__, __dir__ = with_reference_imports(__name__, __all__, LLAMA3_IMPORTS)
