"""Qwen3 for batches with a per-row KV cache, as a drop-in for ``llms_from_scratch.kv_cache_batched.qwen3``.

``Qwen3Model.forward(in_idx, cache=None, start_pos=None)``: with a cache, row ``b``'s
new tokens sit at positions ``start_pos[b] ...`` (its RoPE offset) and attend to that
row's cached keys plus the new ones; ``reset_kv_cache(batch_size)`` sets
``current_pos`` to a ``(batch_size,)`` tensor of zeros, which the caller advances, as
with the reference.  Padding is the caller's (the reference left-pads prompts of
different lengths and the pad tokens are attended like any other).  Rows may also sit at
different positions (the reference needs them equal); a row's keys past its own end are
masked.

With gptfast's :class:`RowKVCache` the new keys/values of every row are written into
per-layer buffers (no per-step copy of the past); any other object with the
reference's ``get``/``update`` is driven row by row as the reference does.  Parameters,
their creation order and state_dict keys are :mod:`gptfast.models.qwen3`'s (the dense
feed-forward only, as in the reference).  With the ``"torch"`` backend attention is
the reference's formula, op for op; otherwise rows at one position run the fused
causal op.
"""

from __future__ import annotations

import numbers

import torch

from .. import ops
from ..generation.layer_cache import RowKVCache as KVCache
from . import layers, qwen3
from .blocks import apply_linear, runs_own_forward
from .layers import FeedForward
from .qwen3 import (QWEN3_CONFIG_1_7B, QWEN3_CONFIG_4B, QWEN3_CONFIG_8B, QWEN3_CONFIG_14B, QWEN3_CONFIG_32B,
                    QWEN_CONFIG_06_B, Qwen3Tokenizer, RMSNorm, compute_rope_params, download_from_huggingface,
                    download_from_huggingface_from_snapshots, load_weights_into_qwen)

__all__ = [
    "QWEN_CONFIG_06_B", "QWEN3_CONFIG_1_7B", "QWEN3_CONFIG_4B", "QWEN3_CONFIG_8B", "QWEN3_CONFIG_14B",
    "QWEN3_CONFIG_32B", "Qwen3Model", "TransformerBlock", "FeedForward", "GroupedQueryAttention",
    "compute_rope_params", "apply_rope", "RMSNorm", "load_weights_into_qwen", "Qwen3Tokenizer",
    "download_from_huggingface", "download_from_huggingface_from_snapshots", "KVCache",
]


# ----------------------------------------------------------------------------- per-row positions


def check_start_pos(start_pos, batch: int, num_tokens: int, limit: int) -> list[int]:
    """``start_pos`` (one position per row: a ``(batch,)`` integer tensor, a sequence or an int) as a list of ints.

    ``ValueError`` when a row's positions ``start .. start + num_tokens - 1`` leave the
    RoPE tables' ``limit`` positions (the reference clamps them silently).
    """
    if start_pos is None:
        raise ValueError("start_pos (one position per row, e.g. model.current_pos) is required with a cache")
    if isinstance(start_pos, numbers.Integral) and not isinstance(start_pos, bool):
        starts = [int(start_pos)] * batch
    else:
        tensor = torch.as_tensor(start_pos)
        if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
            raise TypeError(f"start_pos must hold integer positions, got {tensor.dtype}")
        if tensor.dim() == 0:
            tensor = tensor.expand(batch)
        if tensor.shape != (batch,):
            raise ValueError(f"start_pos must have one position per row ({batch}), got shape {tuple(tensor.shape)}")
        starts = tensor.tolist()
    for b, s in enumerate(starts):
        if s < 0 or s + num_tokens > limit:
            raise ValueError(f"row {b}: positions {s}..{s + num_tokens - 1} lie outside the model's {limit} "
                             "positions (context_length); call reset_kv_cache and start a new cache")
    return starts


def _rope_rows(table: torch.Tensor, offset: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Rows of ``table`` for each batch row's positions ``offset[b] ...``: ``(B, 1, seq_len, D)``."""
    position_ids = torch.arange(seq_len, device=offset.device).unsqueeze(0) + offset.unsqueeze(1)
    return table[position_ids, :].unsqueeze(1)


def _rotate(x, cos_rows, sin_rows):
    """Rotate-half RoPE with per-row tables, in the dtype the operands promote to (the reference's)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos_rows) + (rotated * sin_rows)


def apply_rope(x, cos, sin, offset):
    """Rotate ``x`` ``(B, heads, tokens, head_dim)``; row ``b``'s tokens sit at positions ``offset[b] ...``.

    ``offset`` is a ``(B,)`` integer tensor.  Positions past the tables are a
    ``ValueError`` (the reference clamps them to the last row).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError("x must be a 4-D tensor (batch, heads, tokens, head_dim)")
    if x.shape[-1] % 2 != 0:
        raise ValueError(f"head_dim of x must be even, got {x.shape[-1]}")
    if not isinstance(offset, torch.Tensor):
        offset = torch.as_tensor(offset, device=x.device)
    check_start_pos(offset, x.shape[0], x.shape[2], cos.shape[0])
    return _rotate(x, _rope_rows(cos, offset, x.shape[2]), _rope_rows(sin, offset, x.shape[2]))


def row_mask(starts: list[int], num_tokens: int, num_keys: int, device) -> torch.Tensor:
    """``(B, 1, num_tokens, num_keys)`` boolean mask, True = hidden: row ``b``'s query ``t`` sees keys ``<= starts[b] + t``."""
    last = torch.tensor(starts, device=device).view(-1, 1) + torch.arange(num_tokens, device=device)
    return (torch.arange(num_keys, device=device).view(1, 1, -1) > last.unsqueeze(-1)).unsqueeze(1)


def reference_attention(queries, keys, values, mask):
    """The reference's masked attention over grouped k/v, op for op (also for mixed dtypes)."""
    group_size = queries.shape[1] // keys.shape[1]
    keys = layers.expand_kv_heads(keys, group_size)
    values = layers.expand_kv_heads(values, group_size)
    scores = (queries @ keys.transpose(2, 3)).masked_fill(mask, -torch.inf)
    scale = torch.tensor(queries.shape[-1] ** 0.5, dtype=queries.dtype, device=queries.device)
    return torch.softmax(scores / scale, dim=-1).to(values.dtype) @ values


def batched_attention(queries, keys, values, starts: list[int]):
    """Row ``b``'s queries (at ``starts[b] ...``) over its keys ``0 .. starts[b] + Tq - 1``: ``(B, H, Tq, D)``.

    Rows at one position with matching dtypes run the fused causal op (the queries are
    the last positions of the keys); the ``"torch"`` backend and rows at different
    positions run :func:`reference_attention` with the per-row mask.
    """
    aligned = len(set(starts)) == 1 and starts[0] + queries.shape[2] == keys.shape[2]
    if aligned and queries.dtype == keys.dtype == values.dtype and ops.get_backend() != "torch":
        return layers.grouped_query_attention(queries, keys, values, None)
    mask = row_mask(starts, queries.shape[2], keys.shape[2], queries.device)
    return reference_attention(queries, keys, values, mask)


# ----------------------------------------------------------------------------- modules


class GroupedQueryAttention(qwen3.GroupedQueryAttention):
    """Qwen3 grouped-query attention at per-row positions.

    ``forward(x, mask, cos, sin, start_pos=0, cache=None)`` is the reference's: ``cache``
    is ``None`` or a list of each row's previous ``(keys, values)``; it returns
    ``(context, next_cache)`` with each row's keys/values so far.
    """

    def __init__(self, d_in, num_heads, num_kv_groups, head_dim=None, qk_norm=False, dtype=None):
        super().__init__(d_in, num_heads, num_kv_groups, head_dim=head_dim, qk_norm=qk_norm, dtype=dtype)

    def project_rows(self, x, cos_rows, sin_rows):
        """Queries, keys (normalised, rotated with the per-row tables) and values in heads layout."""
        queries = layers.split_heads(self.W_query(x), self.num_heads, self.head_dim)
        keys = layers.split_heads(self.W_key(x), self.num_kv_groups, self.head_dim)
        values = layers.split_heads(self.W_value(x), self.num_kv_groups, self.head_dim)
        queries, keys = self.normalize_qk(queries, keys)
        return _rotate(queries, cos_rows, sin_rows), _rotate(keys, cos_rows, sin_rows), values

    def attend_rows(self, queries, keys, values, starts):
        """:func:`batched_attention`, heads merged and projected out."""
        return self.out_proj(layers.merge_heads(batched_attention(queries, keys, values, starts)))

    def forward(self, x, mask, cos, sin, start_pos=0, cache=None):
        b, num_tokens, _ = x.shape
        offset = start_pos if isinstance(start_pos, torch.Tensor) else torch.full((b,), int(start_pos))
        offset = offset.to(x.device)
        check_start_pos(offset, b, num_tokens, cos.shape[0])
        queries, keys, values = self.project_rows(
            x, _rope_rows(cos, offset, num_tokens), _rope_rows(sin, offset, num_tokens))
        next_cache = []
        for i in range(b):
            prev = cache[i] if cache else None
            k_row, v_row = keys[i:i + 1], values[i:i + 1]
            if prev is not None:
                k_row, v_row = torch.cat([prev[0], k_row], dim=2), torch.cat([prev[1], v_row], dim=2)
            next_cache.append((k_row, v_row))
        lengths = {k.shape[2] for k, _ in next_cache}
        if len(lengths) != 1:
            raise ValueError(f"rows hold different numbers of keys {sorted(lengths)}; a list cache needs "
                             "equal lengths (gptfast's KVCache takes rows at different positions)")
        keys = torch.cat([k for k, _ in next_cache], dim=0)
        values = torch.cat([v for _, v in next_cache], dim=0)
        if mask is None:
            mask = row_mask(offset.tolist(), num_tokens, keys.shape[2], x.device)
        context = reference_attention(queries, keys, values, mask)
        return self.out_proj(layers.merge_heads(context)), next_cache


class TransformerBlock(qwen3.TransformerBlock):
    """Pre-norm block at per-row positions; ``forward`` also returns each row's ``(keys, values)``."""

    attention_class = GroupedQueryAttention

    def __init__(self, cfg):
        super().__init__({**cfg, "num_experts": 0})  # the reference's batched block is always dense

    def forward(self, x, mask, cos, sin, start_pos=0, cache=None):
        attended, next_cache = self.att(self.norm1(x), mask, cos, sin, start_pos=start_pos, cache=cache)
        x = attended + x
        return self.ff(self.norm2(x)) + x, next_cache

    def forward_rows(self, x, cos_rows, sin_rows, starts, cache: KVCache | None, layer_idx: int):
        """One block for rows at ``starts`` with the cache's buffers (or none): the fast path of the model."""
        att = self.att
        queries, keys, values = att.project_rows(self.norm1(x), cos_rows, sin_rows)
        if cache is not None:
            keys, values = cache.extend(layer_idx, keys, values, starts)
        x = att.attend_rows(queries, keys, values, starts) + x
        return self.ff(self.norm2(x)) + x


class Qwen3Model(qwen3.Qwen3Model):
    """Qwen3 decoder for batches: ``forward(in_idx, cache=None, start_pos=None)``, ``current_pos`` per row."""

    block_class = TransformerBlock

    def __init__(self, cfg):
        super().__init__(cfg)
        self.current_pos = None  # a (batch,) tensor once reset_kv_cache is called

    def forward(self, in_idx, cache=None, start_pos=None):
        """Logits ``(batch, tokens, vocab_size)``; with a cache, row ``b`` continues at ``start_pos[b]``."""
        return apply_linear(self.out_head, self.hidden_states(in_idx, cache, start_pos))

    def hidden_states(self, in_idx, cache=None, start_pos=None):
        """Final-norm hidden states ``(batch, tokens, emb_dim)`` in the config's dtype: :meth:`forward` without
        the output head."""
        rows = layers.embedding_rows(self.tok_emb, self.cfg["vocab_size"])
        layers.check_token_ids(in_idx, rows, self.cos.shape[0])
        batch, num_tokens = in_idx.shape
        if batch == 0:
            raise ValueError(f"in_idx must hold at least one row, got shape {tuple(in_idx.shape)}")
        if cache is None:
            starts = [0] * batch
        else:
            starts = check_start_pos(start_pos, batch, num_tokens, self.cos.shape[0])
            self._check_cache(cache, batch, starts)
        if num_tokens == 0:  # no token: empty states, the cache untouched (the reference's result too)
            return self.final_norm(self.tok_emb(in_idx)).to(self.cfg["dtype"])
        x = self.tok_emb(in_idx)
        if cache is not None and not isinstance(cache, KVCache) or not self._blocks_run_rows():
            x = self._forward_row_lists(x, cache, starts)
        else:
            offset = torch.tensor(starts, device=x.device)
            cos_rows = _rope_rows(self.cos, offset, num_tokens)
            sin_rows = _rope_rows(self.sin, offset, num_tokens)
            for i, block in enumerate(self.trf_blocks):
                x = block.forward_rows(x, cos_rows, sin_rows, starts, cache, i)
        return self.final_norm(x).to(self.cfg["dtype"])

    def _blocks_run_rows(self) -> bool:
        """True when every block is gptfast's and runs its own forward (and its attention's): the fast path
        calls their parts, which would skip a hook, a forward of the user's or a block of another class."""
        return all(isinstance(block, TransformerBlock) and runs_own_forward(block) and runs_own_forward(block.att)
                   for block in self.trf_blocks)

    def _forward_row_lists(self, x, cache, starts):
        """The reference's path: every block called with the reference's mask and, with a cache, each row's
        entry through ``get``/``update`` (for a cache of another kind, or blocks the fast path cannot run)."""
        offset = torch.tensor(starts, device=x.device)
        batch, num_tokens = x.shape[0], x.shape[1]
        mask = row_mask(starts, num_tokens, max(starts) + num_tokens, x.device)
        for i, block in enumerate(self.trf_blocks):
            rows = None if cache is None else [cache.get(i, b) for b in range(batch)]
            x, new_cache = block(x, mask, self.cos, self.sin, start_pos=offset, cache=rows)
            if cache is not None:
                for b in range(batch):
                    cache.update(i, b, new_cache[b])
        return x

    def _check_cache(self, cache, batch, starts):
        """Before any work: the cache must have this many rows, each holding ``starts[b]`` tokens."""
        if not isinstance(cache, KVCache):
            # Another implementation of the API (the reference's row lists): its entries tell the lengths.
            entries = [cache.get(0, b) for b in range(batch)]
            held = [0 if entry is None else int(entry[0].shape[2]) for entry in entries]
            if held != starts:
                raise ValueError(f"start_pos {starts} does not continue the cached rows, which hold {held} tokens "
                                 "in layer 0 (pass model.current_pos and advance it after each call)")
            return
        if cache.batch_size != batch:
            raise ValueError(f"the cache has {cache.batch_size} rows but in_idx has {batch}; "
                             "make a KVCache(n_layers, batch_size) for this batch")
        if cache.n_layers != len(self.trf_blocks):
            raise ValueError(f"the cache has {cache.n_layers} layers but the model has {len(self.trf_blocks)}")
        for layer in range(cache.n_layers):
            held = cache.row_lengths(layer)
            if held != starts:
                raise ValueError(f"start_pos {starts} does not continue the cached rows, which hold {held} tokens "
                                 f"in layer {layer} (pass model.current_pos and advance it after each call)")

    def reset_kv_cache(self, batch_size, device=None):
        """Start a new batch of ``batch_size`` rows at position 0 (the caller starts a new cache)."""
        batch_size = layers.require_positive_int("batch_size", batch_size)
        device = device or next(self.parameters()).device
        self.current_pos = torch.zeros(batch_size, dtype=torch.long, device=device)


# The batched attention classes whose RoPE keeps the tables' float32 (this module's and the reference's).
_FLOAT32_ROPE_ATTENTION = ("gptfast.models.qwen3_batched", "llms_from_scratch.kv_cache_batched.qwen3")


def rotates_in_float32(model) -> bool:
    """True for a batched Qwen3 model (this module's or the reference's) whose weights are not float32: its RoPE
    returns float32 queries and keys (the tables' dtype), so its cache and attention scores are float32 where a
    decoder keeping the weights' dtype would round them."""
    blocks = getattr(model, "trf_blocks", None)
    weight = getattr(getattr(model, "tok_emb", None), "weight", None)
    if blocks is None or not isinstance(weight, torch.Tensor) or weight.dtype == torch.float32:
        return False
    return any(type(block.att).__module__ in _FLOAT32_ROPE_ATTENTION and type(block.att).__name__ ==
               "GroupedQueryAttention" for block in blocks)
