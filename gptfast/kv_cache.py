"""Static key/value cache and the cached forward passes of the book's GPT.

The model is not changed: :class:`CachedRunner` walks an existing ``GPTModel``
(gptfast's or ``llms_from_scratch.ch04``'s, same submodule names) and calls its
own modules (``norm1``, ``att.W_query`` ..., ``ff``, ``final_norm``, ``out_head``),
so the cached path computes what the model computes, only less of it:

* ``prefill``: one forward pass over a prompt that stores every layer's keys and
  values in a :class:`KVCache` and runs the last layer's attention output, the
  feed-forward and the output head for the last position only;
* ``decode``: one new token per row against the cache (``Tq = 1``);
* ``last_logits``: a cache-free forward pass returning the last position's logits,
  used to recompute a sliding window once a sequence is longer than the context.

Attention goes through :func:`gptfast.ops.causal_attention` whenever every row
sees the same number of keys.  Rows at different positions (prompts of different
lengths) and the static-shape CUDA-graph step use :func:`masked_decode_attention`,
which performs the oracle's operations in the same order with a per-row key mask.
"""

from __future__ import annotations

import copy

import torch

from . import ops

_BLOCK_PARTS = ("norm1", "att", "drop_resid", "ff", "norm2")
_ATTENTION_PARTS = ("W_query", "W_key", "W_value", "out_proj", "num_heads", "head_dim", "d_out")
_MODEL_PARTS = ("tok_emb", "pos_emb", "drop_emb", "trf_blocks", "final_norm", "out_head")


def check_decodable(model) -> None:
    """Raise ``TypeError`` unless ``model`` has the book's ``GPTModel`` layout the cache code walks."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    missing = [name for name in _MODEL_PARTS if not hasattr(model, name)]
    if not missing and len(model.trf_blocks) > 0:
        block = model.trf_blocks[0]
        missing = [f"trf_blocks[0].{n}" for n in _BLOCK_PARTS if not hasattr(block, n)]
        if not missing:
            missing = [f"trf_blocks[0].att.{n}" for n in _ATTENTION_PARTS if not hasattr(block.att, n)]
    if missing:
        raise TypeError(
            f"model must have the book's GPTModel layout (gptfast.GPTModel or llms_from_scratch.ch04.GPTModel); "
            f"{type(model).__name__} lacks {', '.join(missing)}")


def model_dtype(model) -> torch.dtype:
    """The dtype of the model's projections, which the cache uses too."""
    return model.trf_blocks[0].att.W_key.weight.dtype


def context_length(model) -> int:
    """The number of positions the model has embeddings for."""
    return model.pos_emb.weight.shape[0]


def prepare_model(model, dtype=None, device=None):
    """``model`` itself, or a converted copy when ``dtype``/``device`` differ from the model's.

    The copy drops the attention ``mask`` buffers: the cached path never reads
    them, and at context 1024 they are 4 MiB per layer.
    """
    check_decodable(model)
    weight = model.trf_blocks[0].att.W_key.weight
    dtype = weight.dtype if dtype is None else dtype
    device = weight.device if device is None else torch.device(device)
    if dtype == weight.dtype and device == weight.device:
        return model
    if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    converted = copy.deepcopy(model)
    for block in converted.trf_blocks:
        block.att._buffers.pop("mask", None)
    return converted.to(device=device, dtype=dtype)


class KVCache:
    """Preallocated keys and values of every layer, each ``(batch, heads, max_len, head_dim)``.

    ``keys[i][b, :, p]`` holds layer ``i``'s key of row ``b`` at position ``p``.
    Nothing grows during generation; :meth:`keep_rows` shrinks the batch when
    rows finish, so finished rows stop costing attention work.
    """

    def __init__(self, n_layers, batch, heads, max_len, head_dim, *, dtype=torch.float32, device="cpu"):
        for name, value in (("n_layers", n_layers), ("batch", batch), ("heads", heads), ("max_len", max_len),
                            ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        shape = (batch, heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]

    @classmethod
    def for_model(cls, model, batch, max_len):
        """A cache shaped for ``model``; ``max_len`` may not exceed its context length."""
        check_decodable(model)
        limit = context_length(model)
        if isinstance(max_len, int) and not isinstance(max_len, bool) and max_len > limit:
            raise ValueError(f"max_len {max_len} exceeds the model's context length {limit}")
        att = model.trf_blocks[0].att
        weight = att.W_key.weight
        return cls(len(model.trf_blocks), batch, att.num_heads, max_len, att.head_dim,
                   dtype=weight.dtype, device=weight.device)

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def nbytes(self) -> int:
        """Bytes held by all keys and values."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only cache rows ``rows`` (a 1-D index tensor), in that order."""
        rows = rows.to(self.keys[0].device)
        self.keys = [t.index_select(0, rows) for t in self.keys]
        self.values = [t.index_select(0, rows) for t in self.values]


def _split_heads(att, x):
    """``(b, t, d_out)`` -> ``(b, heads, t, head_dim)``, as the attention module does it."""
    b, t, _ = x.shape
    return x.view(b, t, att.num_heads, att.head_dim).transpose(1, 2)


def _merge_heads(att, x):
    """``(b, heads, t, head_dim)`` -> ``(b, t, d_out)``."""
    b, _, t, _ = x.shape
    return x.transpose(1, 2).reshape(b, t, att.d_out)


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

    Every method runs under ``torch.no_grad`` and returns last-position logits
    ``(B, vocab)``.  Dropout modules run in whatever mode the model is in, as in
    the reference's ``generate``.
    """

    def __init__(self, model):
        check_decodable(model)
        self.model = model
        self.blocks = list(model.trf_blocks)
        self.context_length = context_length(model)
        # gptfast's attention has split_heads/merge_heads; the reference's inlines them.
        self._split = [getattr(b.att, "split_heads", None) or (lambda x, a=b.att: _split_heads(a, x))
                       for b in self.blocks]
        self._merge = [getattr(b.att, "merge_heads", None) or (lambda x, a=b.att: _merge_heads(a, x))
                       for b in self.blocks]

    # -- pieces -------------------------------------------------------------------------

    def _embed(self, idx, positions):
        """Token plus position embeddings; ``positions`` is ``(T,)`` or ``(B, T)``."""
        model = self.model
        return model.drop_emb(model.tok_emb(idx) + model.pos_emb(positions))

    def _qkv(self, i, h):
        att, split = self.blocks[i].att, self._split[i]
        return split(att.W_query(h)), split(att.W_key(h)), split(att.W_value(h))

    def _finish_block(self, i, x, context):
        """Residual adds around the attention output ``context`` and the feed-forward."""
        block = self.blocks[i]
        x = x + block.drop_resid(block.att.out_proj(self._merge[i](context)))
        return x + block.drop_resid(block.ff(block.norm2(x)))

    def _head(self, x_last):
        """Logits ``(B, vocab)`` of ``x_last`` ``(B, 1, emb)``."""
        return self.model.out_head(self.model.final_norm(x_last))[:, -1, :]

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
        x = self._embed(idx, torch.arange(t, device=idx.device))
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            q, k, v = self._qkv(i, block.norm1(x))
            if cache is not None:
                if rows is None:
                    cache.keys[i][:, :, :t].copy_(k)
                    cache.values[i][:, :, :t].copy_(v)
                else:
                    cache.keys[i][rows, :, :t] = k
                    cache.values[i][rows, :, :t] = v
            if i == last:  # nothing after the last layer needs the other positions
                q, x = q[:, :, -1:], x[:, -1:]
            x = self._finish_block(i, x, ops.causal_attention(q, k, v))
        return self._head(x)

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
            x = self._embed(tokens, torch.tensor([positions], device=tokens.device))
            n_keys, per_row = positions + 1, None
        else:
            self._check_positions(max(positions), cache.max_len)
            per_row = torch.tensor(positions, device=tokens.device)
            x = self._embed(tokens, per_row.unsqueeze(1))
            n_keys, rows = max(positions) + 1, torch.arange(tokens.shape[0], device=tokens.device)
        for i, block in enumerate(self.blocks):
            q, k, v = self._qkv(i, block.norm1(x))
            keys, values = cache.keys[i], cache.values[i]
            if per_row is None:
                keys[:, :, positions] = k[:, :, 0]
                values[:, :, positions] = v[:, :, 0]
                context = ops.causal_attention(q, keys[:, :, :n_keys], values[:, :, :n_keys])
            else:
                keys[rows, :, per_row] = k[:, :, 0]
                values[rows, :, per_row] = v[:, :, 0]
                context = masked_decode_attention(q, keys[:, :, :n_keys], values[:, :, :n_keys], per_row)
            x = self._finish_block(i, x, context)
        return self._head(x)

    @torch.no_grad()
    def decode_static(self, tokens, cache: KVCache, positions):
        """:meth:`decode` with only static shapes and no host reads, for CUDA-graph capture.

        ``positions`` is a ``(B,)`` device tensor; attention spans the whole cache
        with keys past each row's position masked out.
        """
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        x = self._embed(tokens, positions.unsqueeze(1))
        for i, block in enumerate(self.blocks):
            q, k, v = self._qkv(i, block.norm1(x))
            cache.keys[i][rows, :, positions] = k[:, :, 0]
            cache.values[i][rows, :, positions] = v[:, :, 0]
            context = masked_decode_attention(q, cache.keys[i], cache.values[i], positions)
            x = self._finish_block(i, x, context)
        return self._head(x)


class CUDAGraphDecoder:
    """The decode step of a fixed batch captured once as a CUDA graph and replayed per token.

    Static buffers: ``tokens`` ``(B, 1)``, ``positions`` ``(B,)`` and the cache;
    :meth:`step` copies the new tokens/positions in, replays and returns the
    logits buffer (overwritten by the next step).  CUDA only.
    """

    busy = False  # set while one generation run uses the cache

    def __init__(self, runner: CachedRunner, cache: KVCache, warmup: int = 2):
        device = cache.keys[0].device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA cache, got {device}")
        self.runner, self.cache = runner, cache
        self.tokens = torch.zeros(cache.batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(cache.batch, dtype=torch.long, device=device)
        # Warm up on a side stream (lazy inits, autotuning) before capturing, as CUDA graphs require.
        # Warm-up and capture write keys/values at the last position, which a later step writes before
        # reading it; build the decoder before prefilling all the same.
        self.positions.fill_(cache.max_len - 1)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                runner.decode_static(self.tokens, cache, self.positions)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = runner.decode_static(self.tokens, cache, self.positions)

    def step(self, tokens, positions):
        """Replay the step for ``tokens`` ``(B, 1)`` at ``positions`` ``(B,)`` (device tensors)."""
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.graph.replay()
        return self.logits
