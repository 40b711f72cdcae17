"""What the KV-cache variants of Llama 3 and Qwen3 share: the per-layer cache and the cached attention step.

These follow ``llms_from_scratch.kv_cache``: a :class:`KVCache` holds one
``(keys, values)`` pair per layer, each ``(B, H_kv, T, D)`` after RoPE, grown by
concatenation; the model keeps ``current_pos``, the position of the next token.
Attention runs through :func:`gptfast.models.layers.grouped_query_attention`
(causal with the queries as the last positions of the keys), which is what the
reference's sliced triangular mask expresses, so results are bitwise the
reference's with the ``"torch"`` backend.
"""

from __future__ import annotations

import torch

from ..generation.layer_cache import KVCache  # the one per-layer cache with the reference's API
from . import layers

__all__ = ["KVCache", "extend_cache", "claim_positions"]


def extend_cache(keys_new: torch.Tensor, values_new: torch.Tensor, cache):
    """Keys and values to attend over: the cached ones followed by the new ones; returns ``(keys, values)``.

    ``cache`` is ``None`` or the layer's previous ``(keys, values)``.
    """
    if cache is None:
        return keys_new, values_new
    prev_k, prev_v = cache
    if prev_k.shape[:2] != keys_new.shape[:2] or prev_k.shape[3] != keys_new.shape[3]:
        raise ValueError(f"cached keys {tuple(prev_k.shape)} do not fit the new keys {tuple(keys_new.shape)}: "
                         "same batch, kv heads and head_dim needed (call reset_kv_cache for a new batch)")
    return torch.cat([prev_k, keys_new], dim=2), torch.cat([prev_v, values_new], dim=2)


def claim_positions(model, num_tokens: int, cache) -> int:
    """The position of the first of ``num_tokens`` new tokens; with a cache, advance ``model.current_pos``.

    Checked before anything changes: positions past the RoPE tables (the context
    length) raise ``ValueError`` and leave ``current_pos`` as it was.
    """
    if cache is None:
        return 0
    start = model.current_pos
    end = start + num_tokens
    limit = model.cos.shape[0]
    if end > limit:
        raise ValueError(f"the cache holds {start} positions; {num_tokens} more would pass the context_length "
                         f"{limit} (call reset_kv_cache and start a new cache)")
    model.current_pos = end
    return start
