"""Qwen3 with a KV cache, as a drop-in for ``llms_from_scratch.kv_cache.qwen3``.

``Qwen3Model.forward(in_idx, cache=None)``: with a :class:`KVCache` the new tokens
continue at ``current_pos`` and their keys/values are added to the cache;
``reset_kv_cache()`` starts over.  Parameters and state_dict keys are those of
:mod:`gptfast.models.qwen3`, so one checkpoint serves both.
"""

from __future__ import annotations

from . import layers, qwen3
from .cached import CachedAttention, CachedBlock, CachedDecoder, KVCache
from .qwen3 import (QWEN3_CONFIG_1_7B, QWEN3_CONFIG_4B, QWEN3_CONFIG_8B, QWEN3_CONFIG_14B, QWEN3_CONFIG_32B,
                    QWEN_CONFIG_06_B, FeedForward, MoEFeedForward, Qwen3Tokenizer, RMSNorm,
                    compute_rope_params, download_from_huggingface, download_from_huggingface_from_snapshots,
                    load_weights_into_qwen)

__all__ = [
    "QWEN_CONFIG_06_B", "QWEN3_CONFIG_1_7B", "QWEN3_CONFIG_4B", "QWEN3_CONFIG_8B", "QWEN3_CONFIG_14B",
    "QWEN3_CONFIG_32B", "Qwen3Model", "TransformerBlock", "FeedForward", "MoEFeedForward", "GroupedQueryAttention",
    "compute_rope_params", "apply_rope", "RMSNorm", "load_weights_into_qwen", "Qwen3Tokenizer",
    "download_from_huggingface", "download_from_huggingface_from_snapshots", "KVCache",
]


def apply_rope(x, cos, sin, offset=0):
    """Rotate ``x`` ``(batch, heads, tokens, head_dim)`` whose tokens sit at positions ``offset ...``."""
    return layers.apply_rope_at(x, cos, sin, offset)


class GroupedQueryAttention(CachedAttention, qwen3.GroupedQueryAttention):
    """Qwen3 grouped-query attention over the cached keys/values plus the new ones.

    ``forward(x, mask, cos, sin, start_pos=0, cache=None)`` returns ``(context, (keys, values))``.
    """


class TransformerBlock(CachedBlock, qwen3.TransformerBlock):
    """Pre-norm block returning ``(x, (keys, values))`` for the cache."""

    attention_class = GroupedQueryAttention


class Qwen3Model(CachedDecoder, qwen3.Qwen3Model):
    """Qwen3 decoder with an optional KV cache: ``forward(in_idx, cache=None)``."""

    block_class = TransformerBlock
