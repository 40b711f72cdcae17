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
from .blocks import apply_linear

__all__ = ["KVCache", "extend_cache", "claim_positions", "CachedAttention", "CachedBlock", "CachedDecoder"]


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
    length) raise ``ValueError`` and leave ``current_pos`` as it was.  (A call refused
    later, e.g. a batch the cache does not hold, hands its positions back:
    :meth:`CachedDecoder.forward`.)
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


class CachedAttention:
    """Mixin for a :class:`gptfast.models.layers.RotaryGroupedAttention`: attend over the cache plus the new tokens.

    ``forward(x, mask, cos, sin, start_pos=0, cache=None)`` returns ``(context, (keys, values))``;
    ``mask=None`` is causal with the new tokens as the last positions (through the fused op),
    an explicit boolean mask (True = hidden) is applied as given.
    """

    def forward(self, x, mask, cos, sin, start_pos=0, cache=None):
        queries, keys_new, values_new = self.project_rotary(x, cos, sin, start_pos)
        keys, values = extend_cache(keys_new, values_new, cache)
        return self.attend_heads(queries, keys, values, mask), (keys, values)


class CachedBlock:
    """Mixin for a pre-norm block (``att``, ``ff``, ``norm1``, ``norm2``) whose attention is a
    :class:`CachedAttention`: ``forward`` also returns the layer's ``(keys, values)`` for the cache."""

    def forward(self, x, mask, cos, sin, start_pos=0, cache=None):
        attended, next_cache = self.att(self.norm1(x), mask, cos, sin, start_pos=start_pos, cache=cache)
        x = attended + x
        return self.ff(self.norm2(x)) + x, next_cache


class CachedDecoder:
    """Mixin for a decoder (``tok_emb``, ``trf_blocks`` of :class:`CachedBlock`, ``final_norm``, ``out_head``,
    RoPE tables ``cos``/``sin``, ``cfg``): ``forward(in_idx, cache=None)`` with the model's ``current_pos``."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.current_pos = 0

    def forward(self, in_idx, cache=None):
        """Logits ``(batch, tokens, vocab_size)``; with a :class:`KVCache` the tokens continue at ``current_pos``."""
        return apply_linear(self.out_head, self.hidden_states(in_idx, cache))

    def hidden_states(self, in_idx, cache=None):
        """Final-norm hidden states ``(batch, tokens, emb_dim)`` in the config's dtype: :meth:`forward` without
        the output head (the cache and ``current_pos`` move on alike)."""
        rows = layers.embedding_rows(self.tok_emb, self.cfg["vocab_size"])
        layers.check_token_ids(in_idx, rows, self.cos.shape[0])
        start = claim_positions(self, in_idx.shape[1], cache)
        try:
            x = self.tok_emb(in_idx)
            # The reference's mask for the new tokens over every cached one (recognised: the fused op runs).
            mask = layers.causal_mask(in_idx.shape[1], start + in_idx.shape[1], x.device)
            for i, block in enumerate(self.trf_blocks):
                x, layer_cache = block(x, mask, self.cos, self.sin, start_pos=start,
                                       cache=cache.get(i) if cache is not None else None)
                if cache is not None:
                    cache.update(i, layer_cache)
        except Exception:
            if cache is not None:
                # A call refused at its first layer (say, a batch the cache does not hold) moves nothing on; one
                # failing at a later layer has already stored the layers before it, as the reference's would.
                self.current_pos = start
            raise
        return self.final_norm(x).to(self.cfg["dtype"])

    def reset_kv_cache(self):
        """Start a new sequence at position 0 (the caller starts a new :class:`KVCache`)."""
        self.current_pos = 0
