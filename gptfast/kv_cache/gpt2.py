"""Drop-in for ``llms_from_scratch.kv_cache.gpt2``: the GPT-2 with ``use_cache`` and ``reset_kv_cache``.

The classes live in :mod:`gptfast.models.gpt_kv_cache`; the cache they fill is the
static one of :mod:`gptfast.generation`.
"""

from ..models.gpt_kv_cache import (GELU, FeedForward, GPTModel, KVCache, LayerNorm, MultiHeadAttention,
                                   TransformerBlock)
from .._star import with_reference_imports

__all__ = ["MultiHeadAttention", "LayerNorm", "GELU", "FeedForward", "TransformerBlock", "GPTModel", "KVCache"]


# The names a star import of the reference's module also gives (see gptfast/_star.py).
__all__, __getattr__, __dir__ = with_reference_imports(__name__, __all__, {
    "nn": "torch.nn",
    "torch": "torch",
})
