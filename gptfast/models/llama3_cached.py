"""Llama 3 with a KV cache, as a drop-in for ``llms_from_scratch.kv_cache.llama3``.

``Llama3Model.forward(in_idx, cache=None)``: with a :class:`KVCache` the new tokens
continue at ``current_pos`` and their keys/values are added to the cache;
``reset_kv_cache()`` starts over.  Parameters and state_dict keys are those of
:mod:`gptfast.models.llama3`, so one checkpoint serves both.
"""

from __future__ import annotations

from . import layers, llama3
from .cached import CachedAttention, CachedBlock, CachedDecoder, KVCache
from .llama3 import (LLAMA32_CONFIG_1B, LLAMA32_CONFIG_3B, ChatFormat, FeedForward, GroupedQueryAttentionFast,
                     Llama3ModelFast, Llama3Tokenizer, TransformerBlockFast, _Llama3Base, _LlamaAttentionBase,
                     clean_text, compute_rope_params)

__all__ = [
    "LLAMA32_CONFIG_1B", "LLAMA32_CONFIG_3B", "Llama3Model", "TransformerBlock", "FeedForward",
    "GroupedQueryAttention", "compute_rope_params", "apply_rope", "Llama3Tokenizer", "ChatFormat", "clean_text",
    "GroupedQueryAttentionFast", "TransformerBlockFast", "Llama3ModelFast", "KVCache",
]


def apply_rope(x, cos, sin, offset=0):
    """Rotate ``x`` ``(batch, heads, tokens, head_dim)`` whose tokens sit at positions ``offset ...``."""
    return layers.apply_rope_at(x, cos, sin, offset)


class GroupedQueryAttention(CachedAttention, _LlamaAttentionBase):
    """Grouped-query attention over the cached keys/values plus the new ones.

    ``forward(x, mask, cos, sin, start_pos=0, cache=None)`` returns ``(context, (keys, values))``.
    """


class TransformerBlock(CachedBlock, llama3.TransformerBlock):
    """Pre-norm block returning ``(x, (keys, values))`` for the cache."""

    attention_class = GroupedQueryAttention


class Llama3Model(CachedDecoder, _Llama3Base):
    """Llama 3 decoder with an optional KV cache: ``forward(in_idx, cache=None)``."""

    block_class = TransformerBlock
