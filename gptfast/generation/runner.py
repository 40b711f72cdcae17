"""The cached forward passes of the book's GPT: prefill, one-token decode, and its static-shape form.

The model is not changed: :class:`CachedRunner` walks an existing ``GPTModel``
(gptfast's or ``llms_from_scratch.ch04``'s, same submodule names) and runs each
block through :func:`gptfast.models.gpt.residual_block`, the formula
``TransformerBlock.forward`` runs too, with only the attention core swapped for
one that reads and writes the cache.  So the cached path computes what the model
computes, only less of it:

* ``prefill``: one pass over a prompt that stores every layer's keys and values in
  a :class:`~gptfast.generation.cache.KVCache` and runs the last layer's attention
  output, the feed-forward and the output head for the last position only;
* ``decode``: one new token per row against the cache (``Tq = 1``);
* ``decode_static``: ``decode`` with static shapes and no host reads (CUDA-graph capture);
* ``last_logits``: a cache-free pass returning the last position's logits, used to
  recompute a sliding window once a sequence is longer than the context.

Attention goes through :func:`gptfast.ops.causal_attention` whenever every row
sees the same number of keys.  Rows at different positions (prompts of different
lengths) and the static-shape step use :func:`masked_decode_attention`, which
performs the oracle's operations in the same order with a per-row key mask.
"""

from __future__ import annotations

import torch

from .. import ops
from ..models.gpt import merge_heads, residual_block, split_heads
from .cache import KVCache, check_decodable, context_length


def masked_decode_attention(q, k, v, last_visible):
    """Attention of ``q`` ``(B, H, Tq, D)`` over ``k, v`` ``(B, H, Tk, D)``; row ``b`` sees keys ``<= last_visible[b]``.

    ``last_visible`` is a ``(B,)`` or ``(B, Tq)`` integer tensor of key positions.  The
    operations and their order are the oracle's (scores, -inf mask, divide by
    sqrt(D), softmax, @ v), so with nothing masked the result is the same.
    """
    scores = q @ k.transpose(2, 3)
    key_pos = torch.arange(k.shape[2], device=k.device)
    if last_visible.dim() == 1:
        last_visible = last_visible.unsqueeze(1)
    hidden = key_pos.view(1, 1, -1) > last_visible.unsqueeze(-1)  # (B, Tq, Tk)
    scores.masked_fill_(hidden.unsqueeze(1), -torch.inf)
    scores = scores / k.shape[-1] ** 0.5
    return torch.softmax(scores, dim=-1) @ v


class CachedRunner:
    """Cached forward passes over an unchanged ``GPTModel``.

    Every pass runs under ``torch.no_grad`` and returns last-position logits
    ``(B, vocab)``.  Dropout modules run in whatever mode the model is in, as in
    the reference's ``generate``.
    """

    def __init__(self, model):
        check_decodable(model)
        self.model = model
        self.blocks = list(model.trf_blocks)
        self.context_length = context_length(model)

    # -- the one block loop ----------------------------------------------------------------

    def _run(self, idx, positions, attend, last_only=False, every_position=False):
        """Embed ``idx`` at ``positions`` and run every block; ``attend(i, q, k, v)`` is layer ``i``'s core.

        ``positions`` is ``(T,)`` or ``(B, T)``.  With ``last_only`` the last layer keeps
        only the last position (nothing after it needs the others).  Returns logits ``(B, vocab)``,
        or ``(B, T, vocab)`` with ``every_position``.
        """
        model = self.model
        x = model.drop_emb(model.tok_emb(idx) + model.pos_emb(positions))
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = residual_block(block, x, self._attention(i, block.att, attend, last_only and i == last))
        if every_position:
            return model.out_head(model.final_norm(x))
        return model.out_head(model.final_norm(x))[:, -1, :]

    def all_logits(self, idx, positions, attend):
        """Logits ``(B, T, vocab)`` of every position of ``idx`` at ``positions``, ``attend`` as each layer's core.

        For models that keep their own cache (``gptfast.kv_cache.gpt2``): ``attend(i, q, k, v)``
        stores the keys/values where that cache wants them and attends.  Runs with autograd
        as the caller has it (the other passes run under ``no_grad``).
        """
        return self._run(idx, positions, attend, every_position=True)

    @staticmethod
    def _attention(i, att, attend, last_only):
        """Layer ``i``'s attention module with its core replaced by ``attend``."""
        def attention(h):
            q, k, v = (split_heads(att, proj(h)) for proj in (att.W_query, att.W_key, att.W_value))
            if last_only:
                q = q[:, :, -1:]
            return att.out_proj(merge_heads(att, attend(i, q, k, v)))
        return attention

    def _check_positions(self, last_position: int, max_len: int | None = None):
        if last_position >= self.context_length:
            raise ValueError(
                f"position {last_position} is past the model's context length {self.context_length}")
        if max_len is not None and last_position >= max_len:
            raise ValueError(f"position {last_position} does not fit the cache's max_len {max_len}")

    # -- passes ---------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, idx, cache: KVCache | None = None, rows=None):
        """Run prompts ``idx`` ``(B, T)`` from position 0; store their keys/values in ``cache``.

        ``rows`` (a 1-D index tensor, default all) names the cache rows that receive
        the ``B`` prompts.  Returns the last position's logits ``(B, vocab)``.
        """
        t = idx.shape[1]
        if t == 0:
            raise ValueError("idx must hold at least one token")
        self._check_positions(t - 1, None if cache is None else cache.max_len)

        def attend(i, q, k, v):
            if cache is not None and rows is None:
                cache.keys[i][:, :, :t].copy_(k)
                cache.values[i][:, :, :t].copy_(v)
            elif cache is not None:
                cache.keys[i][rows, :, :t] = k
                cache.values[i][rows, :, :t] = v
            return ops.causal_attention(q, k, v)

        return self._run(idx, torch.arange(t, device=idx.device), attend, last_only=True)

    def last_logits(self, idx):
        """Logits of the last position of ``idx`` ``(B, T)`` without a cache (a window recompute)."""
        return self.prefill(idx, None)

    @torch.no_grad()
    def decode(self, tokens, cache: KVCache, positions):
        """One step: ``tokens`` ``(B, 1)`` at ``positions`` (an int for all rows, or a list of B ints).

        Writes the step's keys/values at those positions and attends over each
        row's keys ``0 .. position``.  Returns logits ``(B, vocab)``.
        """
        if isinstance(positions, int):
            self._check_positions(positions, cache.max_len)
            n_keys = positions + 1

            def attend(i, q, k, v):
                keys, values = cache.keys[i], cache.values[i]
                keys[:, :, positions] = k[:, :, 0]
                values[:, :, positions] = v[:, :, 0]
                return ops.causal_attention(q, keys[:, :, :n_keys], values[:, :, :n_keys])

            return self._run(tokens, torch.tensor([positions], device=tokens.device), attend)
        self._check_positions(max(positions), cache.max_len)
        per_row = torch.tensor(positions, device=tokens.device)
        return self._run(tokens, per_row.unsqueeze(1),
                         self._per_row_attend(cache, per_row, n_keys=max(positions) + 1))

    @torch.no_grad()
    def decode_static(self, tokens, cache: KVCache, positions):
        """:meth:`decode` with only static shapes and no host reads, for CUDA-graph capture.

        ``positions`` is a ``(B,)`` device tensor; attention spans the whole cache
        with keys past each row's position masked out.
        """
        return self._run(tokens, positions.unsqueeze(1), self._per_row_attend(cache, positions, n_keys=None))

    @staticmethod
    def _per_row_attend(cache, positions, n_keys):
        """Attention core for rows at their own ``positions`` ``(B,)``: write, then attend with a key mask."""
        rows = torch.arange(positions.shape[0], device=positions.device)

        def attend(i, q, k, v):
            keys, values = cache.keys[i], cache.values[i]
            keys[rows, :, positions] = k[:, :, 0]
            values[rows, :, positions] = v[:, :, 0]
            if n_keys is not None:
                keys, values = keys[:, :, :n_keys], values[:, :, :n_keys]
            return masked_decode_attention(q, keys, values, positions)

        return attend
