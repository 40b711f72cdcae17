"""The cached forward passes of the book's GPT and of Llama 3 / Qwen3: prefill, one-token decode, static shapes.

The model is not changed: :class:`CachedRunner` walks an existing ``GPTModel``
(gptfast's or ``llms_from_scratch.ch04``'s, same submodule names) and runs each
block through :func:`gptfast.models.gpt.residual_block`, the formula
``TransformerBlock.forward`` runs too, with only the attention core swapped for
one that reads and writes the cache.  Llama 3 and Qwen3 decoders (gptfast's or the
reference's, plain, KV-cache or batched variants: same submodule names) are walked
the same way through :func:`rotary_block`: their queries and keys are normalised
(Qwen3's ``qk_norm``) and rotated for each token's position, and the cache holds one
key/value head per group (``num_kv_groups``), expanded to the query heads when
attended.  So the cached path computes what the model computes, only less of it:

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

On a CPU, a decode step of a model built from gptfast's own modules runs as a planned step
(:mod:`gptfast.generation.planned`): the same kernels, resolved once, without the module walk.
"""

from __future__ import annotations

import contextlib
import functools

import torch


from .. import ops
from ..models import layers
from ..models.blocks import apply_linear
from ..models.gpt import merge_heads, residual_block, split_heads
from ..ops.linear import linear_in_float32, widens_16_bit
from .cache import KVCache, check_decodable, context_length, is_rotary
from .planned import PlannedGPTStep, PlannedRotaryStep


def rotary_block(block, x, attention):
    """One Llama 3 / Qwen3 block: ``x + attention(norm1(x))``, then ``x + ff(norm2(x))``.

    As in :func:`gptfast.models.gpt.residual_block`, ``attention`` may return only the
    last ``t'`` positions, and the residual stream then keeps those.
    """
    out = attention(block.norm1(x))
    if out.shape[1] != x.shape[1]:
        x = x[:, -out.shape[1]:]
    x = out + x
    return block.ff(block.norm2(x)) + x


def expand_groups(t, group_size: int):
    """Grouped k/v ``(B, H_kv, T, D)`` repeated to the query heads (``t`` itself for ``group_size == 1``)."""
    return t if group_size == 1 else layers.expand_kv_heads(t, group_size)


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


# Rows of x for which a decode step's linear layers go to ops.decode_linear (a batch of decode tokens).
# From 2 rows the fused kernel measured 1.0-3x faster than F.linear in every run (8 rows: 2.5-4x, fp32 and
# bf16).  One float32 row measured 1.15-2x faster on a quiet machine (GPT-2 124M's matrices, the
# 50257-row head 1.6x); one bf16 row, since the kernel prefetches 16-bit rows, 1.1-1.3x (Qwen3-0.6B's
# matrices and head, 2 cores).  On a CPU with 16-bit matrix instructions (AMX here) torch's bf16 product
# is faster than the kernel's widening path from 2 rows (Qwen3-0.6B's matrices: 1.0-1.05x at 2-4 rows,
# 1.7-4x at 8-16, the head 1.3-2.7x), while one row stays 1.65-1.75x faster on the kernel: there 16-bit
# calls route one row, and the bf16 rows the kernel multiplies natively (kernel_bf16_native_rows: 2-4 rows
# with AVX512-BF16 dot products, 1.33-1.45x torch's AMX product over Qwen3-0.6B's matrices; 1-16 rows with
# AMX tile products where the CPU has them, 1.2-1.45x).
DECODE_LINEAR_MIN_ROWS = 1
DECODE_LINEAR_MAX_ROWS = 16


def has_16_bit_matmul(dtype) -> bool:
    """True for bf16/fp16 on a CPU with instructions for their matmul: the 16-bit dtypes :func:`widens_16_bit` keeps."""
    return dtype in (torch.bfloat16, torch.float16) and not widens_16_bit(dtype)


def kernel_bf16_native_rows() -> int:
    """Most bf16 rows (from 2) the CPU kernels multiply without widening the weight, 0 where they cannot."""
    # Imported here, not with this module: importing the backend loads its kernels, which ``import gptfast``
    # must not do (a process may still choose which build to load, or never use the CPU kernels).
    from ..ops import cpu_ops

    return cpu_ops.bf16_native_rows()


def torch_16_bit_is_faster(dtype, rows: int) -> bool:
    """True when ``rows`` rows of ``dtype`` run faster through torch's own 16-bit product than the decode kernel.

    That is from 2 rows on a CPU with 16-bit matrix instructions (:func:`has_16_bit_matmul`), except
    the bf16 rows the kernel multiplies natively (:func:`kernel_bf16_native_rows`).
    """
    if rows <= 1 or not has_16_bit_matmul(dtype):
        return False
    return not (dtype == torch.bfloat16 and rows <= kernel_bf16_native_rows())


def routes_rows(rows: int) -> bool:
    """True when a decode step's linear of ``rows`` rows goes to ``ops.decode_linear``."""
    return DECODE_LINEAR_MIN_ROWS <= rows <= DECODE_LINEAR_MAX_ROWS


def decode_linear_kernel(x, weight, bias=None):
    """What a routed layer runs for ``F.linear(x, weight, bias)`` on a CPU, or ``None`` for ``F.linear`` itself.

    ``ops.decode_linear``'s entry point where :func:`routes_rows` accepts the rows (for a 16-bit
    dtype on a CPU with 16-bit matrix instructions only where :func:`torch_16_bit_is_faster` says no), and
    :func:`~gptfast.ops.linear.linear_in_float32` for more rows of 16-bit tensors on a CPU without
    16-bit matrix instructions (a prompt's prefill: torch's own 16-bit matmul is several times
    slower there; :func:`~gptfast.ops.linear.widens_16_bit`).  ``None`` (the model's own ``F.linear`` runs, so the
    reference's numbers stay) for other calls, with backend ``"torch"``, or where no fused
    backend serves the call (float64, mixed dtypes); ``"auto"`` and named backends that
    serve it count as fused.
    """
    if x.device.type != "cpu" or x.dim() < 1 or x.dtype != weight.dtype or (
            bias is not None and bias.dtype != x.dtype):
        return None
    rows = x.shape[:-1].numel()
    if not routes_rows(rows) and not widens_16_bit(x.dtype):
        return None
    if torch_16_bit_is_faster(x.dtype, rows):
        return None  # see DECODE_LINEAR_MAX_ROWS
    fn = ops.fused_entry_point("decode_linear", x.device, (x, weight), dict(bias=bias))
    if fn is None:
        return None
    return fn if routes_rows(rows) else linear_in_float32


class RoutedLinears:
    """Context: the given ``nn.Linear`` layers compute on :func:`decode_linear_kernel`'s entry point inside it.

    Each layer gets an instance ``forward`` for the duration (removed on exit, also after an
    error), so hooks and the model's code run as written and nothing else is intercepted: a
    ``TorchFunctionMode`` would put a Python call in front of every torch call of the step
    (about 800 per GPT-2 token, ~20 ms on a 2-core CPU, a third of the step).  The context
    spans one step, so each kind of call (dtypes and shapes) resolves its backend once in it:
    a resolution costs about as much as a small layer's kernel.
    """

    def __init__(self, linears):
        self.linears = linears
        self._kernels = {}

    def __enter__(self):
        for module in self.linears:
            module.forward = functools.partial(self.linear, module)
        return self

    def __exit__(self, *exc):
        for module in self.linears:
            module.__dict__.pop("forward", None)
        return False

    def linear(self, module, x):
        """``module(x)`` for an ``nn.Linear`` ``module``, on its decode kernel (resolved once per kind) or ``F.linear``."""
        weight, bias = module.weight, module.bias
        key = (x.device, x.dtype, x.shape, weight.dtype, weight.shape, None if bias is None else bias.dtype)
        try:
            fn = self._kernels[key]
        except KeyError:
            fn = self._kernels[key] = decode_linear_kernel(x, weight, bias)
        return torch.nn.functional.linear(x, weight, bias) if fn is None else fn(x, weight, bias=bias)


def plain_linears(model) -> list:
    """The model's linear layers whose forward is ``nn.Linear``'s own: subclasses that compute otherwise, and
    layers whose ``forward`` was replaced on the instance (a wrapper's patch), stay as they are."""
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear) and type(m).forward is torch.nn.Linear.forward
            and "forward" not in m.__dict__]


def decode_linears(tokens: torch.Tensor, linears):
    """The context a pass over ``tokens`` ``(B, T)`` runs in (a decode step, ``T == 1``, or a prompt):
    ``linears`` routed (:class:`RoutedLinears`) on CPU when :func:`routes_rows` accepts ``B * T`` rows or
    a layer holds 16-bit weights this CPU multiplies faster in float32, nothing elsewhere."""
    if tokens.device.type == "cpu" and (routes_rows(tokens.numel()) or any(
            widens_16_bit(m.weight.dtype) for m in linears)):
        return RoutedLinears(linears)
    return contextlib.nullcontext()


class CachedRunner:
    """Cached forward passes over an unchanged ``GPTModel``.

    Every pass runs under ``torch.no_grad`` and returns last-position logits
    ``(B, vocab)``.  The passes call the model's parts, not the forward of the model, its
    blocks or their attention, and the attention core runs without dropout: generation takes
    them only where that computes what the model would
    (:func:`~gptfast.generation.cache.walk_reproduces_forward`).
    """

    def __init__(self, model):
        check_decodable(model)
        self.model = model
        self.blocks = list(model.trf_blocks)
        self.context_length = context_length(model)
        self.rotary = is_rotary(model)
        att = self.blocks[0].att
        self.group_size = att.num_heads // att.num_kv_groups if self.rotary else 1
        self.linears = plain_linears(model)
        self._plans = {}

    def causal_attention(self, q, k, v):
        """Causal attention of ``q`` over the (grouped) ``k``/``v``: the queries are the last key positions.

        The op takes grouped k/v as they are: the fused kernels read the cache's shared heads in
        place, and the torch oracle makes the same ``repeat_interleave`` copies this used to make.
        """
        return ops.causal_attention(q, k, v)

    def masked_attention(self, q, k, v, last_visible):
        """:func:`masked_decode_attention` over the (grouped) ``k``/``v``, expanded to the query heads.

        It runs the oracle's operations, so it takes one key/value head per query head.
        """
        return masked_decode_attention(q, expand_groups(k, self.group_size), expand_groups(v, self.group_size),
                                       last_visible)

    # -- the one block loop ----------------------------------------------------------------

    def _run(self, idx, positions, attend, last_only=False, every_position=False, last_positions=None):
        """Embed ``idx`` at ``positions`` and run every block; ``attend(i, q, k, v)`` is layer ``i``'s core.

        ``positions`` is ``(T,)`` or ``(B, T)``.  With ``last_only`` the last layer keeps
        only the last position (nothing after it needs the others).  Returns logits ``(B, vocab)``,
        or ``(B, T, vocab)`` with ``every_position``; with ``last_positions`` ``(B,)``, row ``b``'s logits at
        position ``last_positions[b]`` (the norm and head run on those rows only).
        """
        model = self.model
        last = len(self.blocks) - 1
        if self.rotary:
            rotate = self._rotation(positions)
            x = model.tok_emb(idx)
            for i, block in enumerate(self.blocks):
                x = rotary_block(block, x, self._rotary_attention(i, block.att, attend, last_only and i == last,
                                                                  rotate))
        else:
            x = model.drop_emb(model.tok_emb(idx) + model.pos_emb(positions))
            for i, block in enumerate(self.blocks):
                x = residual_block(block, x, self._attention(i, block.att, attend, last_only and i == last))
        if last_positions is not None:
            x = x[torch.arange(x.shape[0], device=x.device), last_positions].unsqueeze(1)
        if self.rotary:
            # The models cast the normed stream to the head's dtype (Qwen3's norms compute in float32).
            logits = apply_linear(model.out_head, model.final_norm(x).to(model.out_head.weight.dtype))
        else:
            logits = apply_linear(model.out_head, model.final_norm(x))
        return logits if every_position else logits[:, -1, :]

    def _rotation(self, positions):
        """``rotate(x)``: RoPE of heads ``x`` ``(B, H, T, D)`` at ``positions`` ``(T,)`` or per-row ``(B, T)``.

        Rows at their own positions on a CPU with a fused backend go to the op with the positions (its kernel
        reads each row's table rows); backend ``"torch"`` and other devices rotate with per-row tables
        ``(B, 1, T, D)`` and the formula.
        """
        model = self.model
        if positions.dim() == 2 and positions.device.type == "cpu" and ops.get_backend() != "torch":
            return lambda x: ops.rope(x, model.cos, model.sin, positions=positions)
        cos, sin = model.cos[positions], model.sin[positions]
        if positions.dim() == 2:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return lambda x: layers.rotate_half_rope(x, cos, sin)

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
        # The module's own projection order (the reference's): autograd then sums their input gradients in the
        # same order, so a cached pass with gradients stays bitwise the module's.
        order = getattr(att, "projection_order", ("W_key", "W_query", "W_value"))

        def attention(h):
            heads = {name: split_heads(att, apply_linear(getattr(att, name), h)) for name in order}
            q, k, v = heads["W_query"], heads["W_key"], heads["W_value"]
            if last_only:
                q = q[:, :, -1:]
            return apply_linear(att.out_proj, merge_heads(att, attend(i, q, k, v)))
        return attention

    @staticmethod
    def _rotary_attention(i, att, attend, last_only, rotate):
        """Layer ``i``'s grouped-query attention with its core replaced by ``attend`` (k/v stay grouped), queries
        and keys rotated by ``rotate``."""

        def attention(h):
            q = layers.split_heads(apply_linear(att.W_query, h), att.num_heads, att.head_dim)
            k = layers.split_heads(apply_linear(att.W_key, h), att.num_kv_groups, att.head_dim)
            v = layers.split_heads(apply_linear(att.W_value, h), att.num_kv_groups, att.head_dim)
            q_norm, k_norm = getattr(att, "q_norm", None), getattr(att, "k_norm", None)
            if q_norm is not None:
                q = q_norm(q)
            if k_norm is not None:
                k = k_norm(k)
            q, k = rotate(q), rotate(k)
            if last_only:
                q = q[:, :, -1:]
            return apply_linear(att.out_proj, layers.merge_heads(attend(i, q, k, v)))
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
            return self.causal_attention(q, k, v)

        # A short prompt's linear layers read the weights once for a few rows, as a decode step does
        # (16 rows of Qwen3-0.6B: 2-5x faster on the decode kernel than on F.linear, 2 cores).
        with decode_linears(idx, self.linears):
            return self._run(idx, torch.arange(t, device=idx.device), attend, last_only=True)

    @torch.no_grad()
    def prefill_padded(self, idx, lengths, cache: KVCache):
        """Run prompts of different ``lengths`` at once, each from position 0, right-padded to ``idx`` ``(B, T)``.

        Every row's tokens see only the ones before them (causal attention), so the padding after a row changes
        none of its values; its keys/values land in the cache past the row's end, where the row's own next
        tokens overwrite them before anything attends there.  Returns each row's logits at its last prompt
        token ``(B, vocab)``.
        """
        t = idx.shape[1]
        self._check_positions(t - 1, cache.max_len)
        short = [(row, n) for row, n in enumerate(lengths) if n < t]

        def attend(i, q, k, v):
            cache.keys[i][:, :, :t].copy_(k)
            cache.values[i][:, :, :t].copy_(v)
            for row, n in short:  # the padding's keys/values zeroed: a dense masked pass weighs them 0, and 0 * inf
                cache.keys[i][row, :, n:t].zero_()  # would be NaN
                cache.values[i][row, :, n:t].zero_()
            return self.causal_attention(q, k, v)

        last = torch.tensor([n - 1 for n in lengths], device=idx.device)
        with decode_linears(idx, self.linears):
            return self._run(idx, torch.arange(t, device=idx.device), attend, last_positions=last)

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

            attention = _StepAttention()

            def attend(i, q, k, v):
                keys, values = cache.keys[i], cache.values[i]
                keys.select(2, positions).copy_(k.select(2, 0))
                values.select(2, positions).copy_(v.select(2, 0))
                return attention(q, keys[:, :, :n_keys], values[:, :, :n_keys])

            position_tensor = torch.tensor([positions], device=tokens.device)
            plan = self._plan(tokens)
            if plan is not None:
                return plan.run(tokens, position_tensor, attend)
            with decode_linears(tokens, self.linears):
                return self._run(tokens, position_tensor, attend)
        self._check_positions(max(positions), cache.max_len)
        per_row = torch.tensor(positions, device=tokens.device)
        attend = self._per_row_attend(cache, per_row, n_keys=max(positions) + 1, host_positions=positions)
        plan = self._plan(tokens)
        if plan is not None:
            return plan.run(tokens, per_row.unsqueeze(1), attend)
        with decode_linears(tokens, self.linears):
            return self._run(tokens, per_row.unsqueeze(1), attend)

    def _plan(self, tokens):
        """The planned step (:mod:`gptfast.generation.planned`) for a CPU decode step of ``tokens`` ``(B, 1)``, or
        ``None`` (the generic walk runs).  Built once per batch size and backend selection."""
        if tokens.device.type != "cpu" or not routes_rows(tokens.numel()):
            return None
        key = (tuple(tokens.shape), ops.get_backend())
        if key not in self._plans:
            model = self.model
            dtype = model.tok_emb.weight.dtype
            if not self.rotary:
                dtype = torch.promote_types(dtype, model.pos_emb.weight.dtype)
            x = torch.empty((*tokens.shape, model.tok_emb.weight.shape[1]), dtype=dtype, device=tokens.device)
            plan = PlannedRotaryStep if self.rotary else PlannedGPTStep
            self._plans[key] = plan.build(model, x, decode_linear_kernel)
        return self._plans[key]

    @torch.no_grad()
    def decode_static(self, tokens, cache: KVCache, positions):
        """:meth:`decode` with only static shapes and no host reads, for CUDA-graph capture.

        ``positions`` is a ``(B,)`` device tensor; attention spans the whole cache
        with keys past each row's position masked out.
        """
        with decode_linears(tokens, self.linears):
            return self._run(tokens, positions.unsqueeze(1), self._per_row_attend(cache, positions, n_keys=None))

    def _per_row_attend(self, cache, positions, n_keys, host_positions=None):
        """Attention core for rows at their own ``positions`` ``(B,)``: write, then attend to each row's keys.

        With ``host_positions`` (the same positions as ints), grouped k/v and a fused backend, each run of
        consecutive rows at one position attends through the fused op over its own keys (views of the cache):
        per row, the decode step's call.  Otherwise (backend ``"torch"``, the static-shape step, one kv head per
        query head) every row attends over the first ``n_keys`` keys (all with ``None``) with the later ones
        masked, in one dense pass.
        """
        rows = torch.arange(positions.shape[0], device=positions.device)
        # The dense pass copies grouped k/v to every query head, layer after layer: Qwen3-0.6B bf16, 8 rows at 7
        # positions, 108-113 ms a step against 118-188 with it (2 cores).  Without groups it copies nothing, and
        # one call per run costs more than it saves: GPT-2 124M, 24 rows at 24 positions, chapter 7's responses
        # 11.4-11.6 s against 10.0-10.7 s.
        fused_runs = host_positions is not None and self.group_size > 1 and ops.get_backend() != "torch"
        runs = _position_runs(host_positions) if fused_runs else None
        attention = _StepAttention()

        def attend(i, q, k, v):
            keys, values = cache.keys[i], cache.values[i]
            keys[rows, :, positions] = k[:, :, 0]
            values[rows, :, positions] = v[:, :, 0]
            if runs is not None:
                out = [attention(q[a:b], keys[a:b, :, :p + 1], values[a:b, :, :p + 1]) for a, b, p in runs]
                return out[0] if len(out) == 1 else torch.cat(out)
            if n_keys is not None:
                keys, values = keys[:, :, :n_keys], values[:, :, :n_keys]
            return self.masked_attention(q, keys, values, positions)

        return attend


def _position_runs(positions):
    """``[(first, end, position)]``: the runs of consecutive rows at one position."""
    runs, first = [], 0
    for row in range(1, len(positions) + 1):
        if row == len(positions) or positions[row] != positions[first]:
            runs.append((first, row, positions[first]))
            first = row
    return runs


class _StepAttention:
    """``ops.causal_attention`` for the layers of one decode step: checked and resolved once per kind of call.

    Every layer of a step attends with the same shapes and dtypes, so the first call of each
    kind goes through the op's checks and backend choice and the others reuse the kernel it
    picked (a resolution costs about as much as the kernel itself at decode size).
    """

    def __init__(self):
        self._kernels = {}

    def __call__(self, q, k, v):
        key = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device)
        fn = self._kernels.get(key)
        if fn is None:
            out = ops.causal_attention(q, k, v)  # validates; raises for a call no backend takes
            self._kernels[key] = ops.resolve("causal_attention", q.device, (q, k, v), _DECODE_ATTENTION_KWARGS)[1]
            return out
        return fn(q, k, v, **_DECODE_ATTENTION_KWARGS)


# What ops.causal_attention passes its kernel for a decode step: no dropout, the default scale.
_DECODE_ATTENTION_KWARGS = dict(dropout_p=0.0, training=False, scale=None)
