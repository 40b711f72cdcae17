"""The book's GPT-2 with a KV cache (``llms_from_scratch.kv_cache.gpt2``), attention through ``gptfast.ops``.

Same classes, parameters, creation order and state_dict keys as the reference (its
attention has no ``mask`` buffer, so neither has this one), same call signatures:
``GPTModel.forward(in_idx, use_cache=False, cache=None)`` returns the logits of
every position, and with ``use_cache`` the new tokens continue after
``model.current_pos`` and read/extend ``cache`` (a
:class:`gptfast.kv_cache.utils.KVCache`).

Differences, all where the reference falls short:

* the cached pass writes only the new keys/values into a preallocated static cache
  (:meth:`gptfast.generation.layer_cache.KVCache.append`) instead of concatenating
  the whole past every token, and runs the blocks through
  :class:`gptfast.generation.runner.CachedRunner`, the loop the decoder uses;
* a sequence that would outgrow the cache (or the position embeddings) gets a
  ``ValueError`` before any work, and the cache and ``current_pos`` stay as they were
  (the reference fails inside ``nn.Embedding``);
* ``reset_kv_cache()`` exists (the reference's generator calls it; its GPT-2 lacks it),
  and ``use_cache=True`` without a ``cache`` uses one the model keeps itself (the
  reference then caches nothing and attends to the new tokens only);
* a ``cache`` passed without ``use_cache`` is used, not emptied: the book's
  generators call ``model(ids, cache=cache)``, which the reference's GPT-2 answers
  with uncached logits at a position that never advances, emptying the cache.
  The first such call gives the reference's numbers all the same.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .. import ops
from ..generation.cache import is_decodable, walk_reproduces_forward
from ..generation.layer_cache import KVCache
from ..generation.runner import CachedRunner
from . import gpt
from .blocks import apply_linear
from .gpt import GELU, FeedForward, LayerNorm, _HeadProjections, residual_block

__all__ = ["MultiHeadAttention", "LayerNorm", "GELU", "FeedForward", "TransformerBlock", "GPTModel", "KVCache"]


class MultiHeadAttention(_HeadProjections):
    """Causal multi-head attention taking and returning a ``(keys, values)`` cache pair."""

    projection_order = ("W_key", "W_value", "W_query")  # the reference's cached attention's order

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__(d_in, d_out, dropout, num_heads, qkv_bias)

    def forward(self, x, use_cache=False, start_pos=0, cache=None):
        """``(context, next_cache)``: with ``use_cache`` the new keys/values follow ``cache``'s
        (a pair or ``None``) and ``next_cache`` is the whole pair, else ``next_cache`` is ``None``."""
        queries, keys, values = self.project_heads(x)
        next_cache = None
        if use_cache:
            if cache is not None:
                keys, values = torch.cat([cache[0], keys], dim=2), torch.cat([cache[1], values], dim=2)
            next_cache = (keys, values)
        # The queries are the last positions of the keys: the op aligns its causal mask that way.
        return self.attend(queries, keys, values), next_cache


class TransformerBlock(gpt.TransformerBlock):
    """Pre-norm block returning ``(x, next_cache)``; the formula is :func:`residual_block`'s."""

    attention_class = MultiHeadAttention

    def __init__(self, cfg):
        super().__init__(cfg)
        # The reference names the residual dropout ``drop_shortcut``.
        self.drop_shortcut = self._modules.pop("drop_resid")

    @property
    def drop_resid(self):
        """The residual dropout under the name :func:`residual_block` and the decoder use."""
        return self.drop_shortcut

    def forward(self, x, use_cache=False, start_pos=0, cache=None):
        next_cache = None

        def attention(h):
            nonlocal next_cache
            out, next_cache = self.att(h, use_cache=use_cache, start_pos=start_pos, cache=cache)
            return out

        return residual_block(self, x, attention), next_cache


class GPTModel(gpt.GPTModel):
    """GPT-2 with ``use_cache`` / ``reset_kv_cache``; ``cfg`` is kept for the book's generators."""

    block_class = TransformerBlock

    def __init__(self, cfg):
        super().__init__(cfg)
        self.current_pos = 0
        self.cfg = dict(cfg)
        self._own_cache: KVCache | None = None

    def reset_kv_cache(self):
        """Start a new sequence: position 0 and an empty model-kept cache."""
        self.current_pos = 0
        if self._own_cache is not None:
            self._own_cache.reset()

    def forward(self, in_idx, use_cache=False, cache=None):
        """Logits ``(b, t, vocab)`` of ``in_idx`` ``(b, t)`` at positions ``current_pos ...``.

        With ``use_cache`` or a ``cache``, the tokens extend the cached sequence and ``current_pos``.
        """
        if in_idx.dim() != 2 or in_idx.shape[1] == 0:
            raise ValueError(f"in_idx must be a non-empty (batch, tokens) tensor, got shape {tuple(in_idx.shape)}")
        if not use_cache and cache is None:
            return self._uncached(in_idx)
        if cache is None:
            if self._own_cache is None:
                self._own_cache = KVCache(len(self.trf_blocks))
            cache = self._own_cache
        return self._cached(in_idx, cache)

    def _positions(self, seq_len, device):
        limit = self.pos_emb.weight.shape[0]
        if self.current_pos + seq_len > limit:
            raise ValueError(
                f"positions {self.current_pos}..{self.current_pos + seq_len - 1} are past the context length "
                f"{limit}; call reset_kv_cache() to start a new sequence")
        return torch.arange(self.current_pos, self.current_pos + seq_len, device=device)

    def hidden_states(self, in_idx):
        """Final-norm hidden states ``(b, t, emb_dim)`` of ``in_idx`` at positions ``current_pos ...`` (no cache)."""
        self._positions(in_idx.shape[1], in_idx.device)  # checks the room before any work
        x = self.embed(in_idx, self.current_pos)
        for block in self.trf_blocks:
            x, _ = block(x)
        return self.final_norm(x)

    def _uncached(self, in_idx):
        return apply_linear(self.out_head, self.hidden_states(in_idx))

    def _cached(self, in_idx, cache):
        if not (is_decodable(self) and walk_reproduces_forward(self)):
            return self._cached_by_blocks(in_idx, cache)
        batch, seq_len = in_idx.shape
        positions = self._positions(seq_len, in_idx.device)
        # Everything is checked before the first write, so a refused call changes nothing.
        if isinstance(cache, KVCache):
            cache.check_room(self, batch, seq_len)
            attend = self._static_attend(cache)
        else:  # any object with the book's get/update API
            attend = self._concat_attend(cache)
        logits = CachedRunner(self).all_logits(in_idx, positions, attend)
        self.current_pos += seq_len
        return logits

    def _cached_by_blocks(self, in_idx, cache):
        """The reference's cached pass, each block called with its ``(keys, values)`` pair: for a model whose
        blocks the runner's loop would not reproduce (a hook, a forward of the user's, LoRA-wrapped projections)."""
        seq_len = in_idx.shape[1]
        self._positions(seq_len, in_idx.device)  # checks the room before any work
        x = self.embed(in_idx, self.current_pos)
        for i, block in enumerate(self.trf_blocks):
            x, pair = block(x, use_cache=True, start_pos=self.current_pos, cache=cache.get(i))
            cache.update(i, pair)
        self.current_pos += seq_len
        return apply_linear(self.out_head, self.final_norm(x))

    def _static_attend(self, cache):
        def attend(i, q, k, v):
            empty = cache.get(i) is None
            keys, values = cache.append(i, k, v, self)
            # A first call attends over its own keys, as the uncached pass does (same numbers, bit for bit).
            return self._attention(i, q, k, v) if empty else self._attention(i, q, keys, values)
        return attend

    def _concat_attend(self, cache):
        def attend(i, q, k, v):
            past = cache.get(i)
            if past is not None:
                k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
            cache.update(i, (k, v))
            return self._attention(i, q, k, v)
        return attend

    def _attention(self, i, q, keys, values):
        att = self.trf_blocks[i].att
        return ops.causal_attention(q, keys, values, dropout_p=att.dropout.p, training=att.dropout.training)
