"""Qwen3 with a KV cache, as a drop-in for ``llms_from_scratch.kv_cache.qwen3``.

``Qwen3Model.forward(in_idx, cache=None)``: with a :class:`KVCache` the new tokens
continue at ``current_pos`` and their keys/values are added to the cache;
``reset_kv_cache()`` starts over.  Parameters and state_dict keys are those of
:mod:`gptfast.models.qwen3`, so one checkpoint serves both.
"""

from __future__ import annotations

import torch.nn as nn

from . import layers, qwen3
from .cached import KVCache, claim_positions, extend_cache
from .qwen3 import (QWEN3_CONFIG_1_7B, QWEN3_CONFIG_4B, QWEN3_CONFIG_8B, QWEN3_CONFIG_14B, QWEN3_CONFIG_32B,
                    QWEN_CONFIG_06_B, FeedForward, MoEFeedForward, Qwen3Tokenizer, RMSNorm, _NORM_EPS,
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


class GroupedQueryAttention(qwen3.GroupedQueryAttention):
    """Qwen3 grouped-query attention over the cached keys/values plus the new ones.

    ``forward(x, mask, cos, sin, start_pos=0, cache=None)`` returns
    ``(context, (keys, values))``; ``mask=None`` is causal with the new tokens as the
    last positions (through the fused op), an explicit boolean mask is applied as given.
    """

    def forward(self, x, mask, cos, sin, start_pos=0, cache=None):
        queries = layers.split_heads(self.W_query(x), self.num_heads, self.head_dim)
        keys_new = layers.split_heads(self.W_key(x), self.num_kv_groups, self.head_dim)
        values_new = layers.split_heads(self.W_value(x), self.num_kv_groups, self.head_dim)
        if self.q_norm is not None:
            queries = self.q_norm(queries)
        if self.k_norm is not None:
            keys_new = self.k_norm(keys_new)
        queries = apply_rope(queries, cos, sin, offset=start_pos)
        keys_new = apply_rope(keys_new, cos, sin, offset=start_pos)
        keys, values = extend_cache(keys_new, values_new, cache)
        context = layers.grouped_query_attention(queries, keys, values, mask)
        return self.out_proj(layers.merge_heads(context)), (keys, values)


class TransformerBlock(nn.Module):
    """Pre-norm block returning ``(x, (keys, values))`` for the cache."""

    def __init__(self, cfg):
        super().__init__()
        self.att = GroupedQueryAttention(
            d_in=cfg["emb_dim"], num_heads=cfg["n_heads"], head_dim=cfg.get("head_dim"),
            num_kv_groups=cfg["n_kv_groups"], qk_norm=cfg["qk_norm"], dtype=cfg["dtype"])
        if cfg.get("num_experts", 0) > 0:
            self.ff = MoEFeedForward(cfg)
        else:
            self.ff = FeedForward(cfg)
        self.norm1 = RMSNorm(cfg["emb_dim"], eps=_NORM_EPS)
        self.norm2 = RMSNorm(cfg["emb_dim"], eps=_NORM_EPS)

    def forward(self, x, mask, cos, sin, start_pos=0, cache=None):
        attended, next_cache = self.att(self.norm1(x), mask, cos, sin, start_pos=start_pos, cache=cache)
        x = attended + x
        return self.ff(self.norm2(x)) + x, next_cache


class Qwen3Model(qwen3.Qwen3Model):
    """Qwen3 decoder with an optional KV cache: ``forward(in_idx, cache=None)``."""

    block_class = TransformerBlock

    def __init__(self, cfg):
        super().__init__(cfg)
        self.current_pos = 0

    def forward(self, in_idx, cache=None):
        layers.check_token_ids(in_idx, self.cfg["vocab_size"], self.cos.shape[0])
        start = claim_positions(self, in_idx.shape[1], cache)
        x = self.tok_emb(in_idx)
        for i, block in enumerate(self.trf_blocks):
            x, layer_cache = block(x, None, self.cos, self.sin, start_pos=start,
                                   cache=cache.get(i) if cache is not None else None)
            if cache is not None:
                cache.update(i, layer_cache)
        return self.out_head(self.final_norm(x).to(self.cfg["dtype"]))

    def reset_kv_cache(self):
        self.current_pos = 0
