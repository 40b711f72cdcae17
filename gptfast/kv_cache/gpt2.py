"""Drop-in for ``llms_from_scratch.kv_cache.gpt2``: the GPT-2 with ``use_cache`` and ``reset_kv_cache``.

The classes live in :mod:`gptfast.models.gpt_kv_cache`; the cache they fill is the
static one of :mod:`gptfast.generation`.
"""

from ..models.gpt_kv_cache import (GELU, FeedForward, GPTModel, KVCache, LayerNorm, MultiHeadAttention,
                                   TransformerBlock)

__all__ = ["MultiHeadAttention", "LayerNorm", "GELU", "FeedForward", "TransformerBlock", "GPTModel", "KVCache"]
