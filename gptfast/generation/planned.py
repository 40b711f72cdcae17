"""CPU decode steps of the book's GPT and of Llama 3 / Qwen3 with every kernel chosen once: no module calls.

The cached step of :class:`~gptfast.generation.runner.CachedRunner` walks the model's modules,
so each of a GPT-2 token's ~600 Python-level calls pays for ``nn.Module.__call__``, argument
checks and a backend resolution: about 10 ms of a ~50 ms step on a 2-core CPU, spent while
the memory bus, which sets the floor of a decode step, sits idle.  When every part of the
model is one whose forward is known (gptfast's ``LayerNorm`` and ``GELU``, plain ``nn.Linear``,
dropout that does nothing; for Llama 3 / Qwen3 gptfast's RMSNorms and SwiGLU feed-forward) and
no hook or instance-level ``forward`` is set, :class:`PlannedGPTStep` / :class:`PlannedRotaryStep` run the kernels
those forwards would pick, resolved once, on the same tensors and in the same order as
:func:`~gptfast.models.gpt.residual_block` / :func:`~gptfast.generation.runner.rotary_block`.
So their logits are bitwise the generic step's, and a model they cannot vouch for keeps the
generic step.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .. import ops
from ..models import layers, qwen3
from ..models.blocks import runs_own_forward
from ..models.gpt import GELU, Dropout, FeedForward, LayerNorm
from ..ops._dispatch import without_graph
from ..ops.activation import gelu_rows, swiglu_rows
from ..ops.linear import decode_linear_rows
from ..ops.normalization import layer_norm_rows, rms_norm_rows
from ..ops.rotary import rope_rows


def _plain_tensors(model) -> bool:
    """True when every parameter and buffer of ``model`` is a plain tensor: the plan's kernels are called directly
    (:func:`~gptfast.ops._dispatch.bound_kernel`), past any tensor subclass's own dispatch."""
    plain = (torch.Tensor, nn.Parameter)
    return all(type(t) in plain for t in (*model.parameters(), *model.buffers()))


def _has_hooks(model) -> bool:
    """True when a module would run a hook or a forward of the user's (on the instance or the class) that the
    plan's kernels skip."""
    return not all(runs_own_forward(m) for m in model.modules())


def _quiet(dropout) -> bool:
    """True when ``dropout`` returns its input unchanged (eval mode or ``p == 0``)."""
    return type(dropout) in (nn.Dropout, Dropout) and (not dropout.training or dropout.p == 0)


def _plain_linear(module) -> bool:
    return type(module) is nn.Linear


def _book_block(block) -> bool:
    """True for a block whose every part has a forward this plan reproduces."""
    att, ff = block.att, block.ff
    return (type(block.norm1) is LayerNorm and type(block.norm2) is LayerNorm and _quiet(block.drop_resid)
            and all(_plain_linear(getattr(att, name)) for name in ("W_query", "W_key", "W_value", "out_proj"))
            and type(ff) is FeedForward and len(ff.layers) == 3 and _plain_linear(ff.layers[0])
            and type(ff.layers[1]) is GELU and _plain_linear(ff.layers[2]))


def plannable(model) -> bool:
    """True when :class:`PlannedGPTStep` may stand in for the generic cached step of ``model``.

    ``model`` must have the book's GPT layout built from gptfast's own modules (or plain
    ``nn.Linear``/``nn.Embedding``/``nn.Dropout``), its dropout must be inactive, and no
    forward hook or instance-level ``forward`` may be set on it or globally (the plan skips the
    module calls); its parameters and buffers must be plain tensors.
    """
    return (type(model.tok_emb) is nn.Embedding and type(model.pos_emb) is nn.Embedding
            and model.tok_emb.max_norm is None and model.pos_emb.max_norm is None
            and _quiet(model.drop_emb) and type(model.final_norm) is LayerNorm and _plain_linear(model.out_head)
            and all(_book_block(block) for block in model.trf_blocks) and not _has_hooks(model)
            and _plain_tensors(model))


class _Norm:
    """A ``LayerNorm`` on rows ``(M, D)`` as its forward runs it on a fused backend."""

    def __init__(self, norm, entry_point):
        self.weight, self.bias, self.eps = norm.scale, norm.shift, float(norm.eps)
        contiguous = self.weight.is_contiguous() and self.bias.is_contiguous()
        self.rows = layer_norm_rows(entry_point, guarded=True) if contiguous else None
        self.entry_point = entry_point

    def __call__(self, x):
        if self.rows is None:
            return self.entry_point(x, self.weight, self.bias, eps=self.eps)
        return self.rows(x, self.weight, self.bias, self.eps)


class _Linear:
    """An ``nn.Linear`` on rows ``(M, K)``, on the kernel a routed decode layer would give it (``F.linear`` when none)."""

    def __init__(self, module, entry_point):
        self.weight, self.bias, self.entry_point = module.weight, module.bias, entry_point
        contiguous = self.weight.is_contiguous() and (self.bias is None or self.bias.is_contiguous())
        self.rows = decode_linear_rows(entry_point, guarded=True) if entry_point is not None and contiguous else None

    def __call__(self, x):
        if self.rows is not None:
            return self.rows(x, self.weight, self.bias)
        if self.entry_point is None:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        return self.entry_point(x, self.weight, bias=self.bias)


class PlannedGPTStep:
    """One cached decode step of a plannable GPT (:func:`plannable`) for ``B`` rows of one dtype.

    Built from the first step's tensors by :meth:`build`, which returns ``None`` when a
    forward would not take a fused kernel (backend ``"torch"``, a dtype the kernels do not
    serve, mixed dtypes): the plan only replaces the module walk, never the arithmetic.
    The stream stays as ``(B, emb_dim)`` rows, the layout the kernels take.
    """

    def __init__(self, model, norms, linears, gelu):
        self.model = model
        self.norms, self.linears, self.gelu = norms, linears, gelu
        self.heads = [(block.att.num_heads, block.att.head_dim) for block in model.trf_blocks]

    @classmethod
    def build(cls, model, x, linear_kernel):
        """The plan for steps whose embedded input looks like ``x`` ``(B, 1, emb_dim)``, or ``None``.

        ``linear_kernel(x, weight, bias)`` is the runner's choice of kernel for a linear layer
        (``None`` for ``F.linear``).
        """
        if not plannable(model):
            return None
        norm_modules = [n for block in model.trf_blocks for n in (block.norm1, block.norm2)] + [model.final_norm]
        norms = []
        for norm in norm_modules:
            if not norm.takes_fused_op(x):
                return None  # LayerNorm.forward would run the book's formula
            layer_norm = ops.fused_entry_point("layer_norm", x.device, (x, norm.scale, norm.shift),
                                               {"eps": norm.eps})
            if layer_norm is None:
                return None
            norms.append(_Norm(norm, layer_norm))
        gelu = None
        linears = []
        for block in model.trf_blocks:
            att, ff = block.att, block.ff.layers
            hidden = x.new_empty((*x.shape[:-1], ff[0].out_features))
            for module, sample in ((att.W_query, x), (att.W_key, x), (att.W_value, x), (att.out_proj, x),
                                   (ff[0], x), (ff[2], hidden)):
                linears.append(_Linear(module, linear_kernel(sample, module.weight, module.bias)))
            if gelu is None:
                entry_point = ops.fused_entry_point("gelu", hidden.device, (hidden,), {})
                if entry_point is None:
                    return None
                gelu = gelu_rows(entry_point, guarded=True) or entry_point
        linears.append(_Linear(model.out_head, linear_kernel(x, model.out_head.weight, model.out_head.bias)))
        return cls(model, norms, linears, gelu)

    def run(self, idx, positions, attend):
        """Logits ``(B, vocab)`` of the step's tokens ``idx`` ``(B, 1)`` at ``positions`` (``(1,)``, or ``(B, 1)`` for
        rows at their own positions); ``attend(i, q, k, v)`` is layer ``i``'s attention core (it writes the
        cache), as in ``CachedRunner._run``."""
        with without_graph():  # once for the step: the rows kernels are bound without their own guard
            return self._run(idx, positions, attend)

    def _run(self, idx, positions, attend):
        model = self.model
        b = idx.shape[0]
        x = (model.tok_emb(idx) + model.pos_emb(positions)).view(b, -1)
        norms, linears, gelu = self.norms, self.linears, self.gelu
        for i, (heads, head_dim) in enumerate(self.heads):
            w_query, w_key, w_value, out_proj, fc1, fc2 = linears[6 * i:6 * i + 6]
            h = norms[2 * i](x)
            # (B, heads * head_dim) rows are (B, heads, 1, head_dim) heads of one query position: views only.
            q, k, v = (proj(h).view(b, heads, 1, head_dim) for proj in (w_query, w_key, w_value))
            x = x + out_proj(attend(i, q, k, v).reshape(b, -1))
            x = x + fc2(gelu(fc1(norms[2 * i + 1](x))))
        return linears[-1](norms[-1](x))


# ----------------------------------------------------------------------------- Llama 3 / Qwen3

_RMS_NORMS = (qwen3.RMSNorm, layers.BuiltinRMSNorm)


def _rotary_block(block) -> bool:
    """True for a Llama 3 / Qwen3 block whose every part has a forward this plan reproduces."""
    att, ff = block.att, block.ff
    qk_norms = [getattr(att, name, None) for name in ("q_norm", "k_norm")]
    return (type(block.norm1) in _RMS_NORMS and type(block.norm2) in _RMS_NORMS
            and all(norm is None or type(norm) in _RMS_NORMS for norm in qk_norms)
            and all(_plain_linear(getattr(att, name)) for name in ("W_query", "W_key", "W_value", "out_proj"))
            and type(ff) is layers.FeedForward and all(_plain_linear(getattr(ff, n)) for n in ("fc1", "fc2", "fc3")))


def rotary_plannable(model) -> bool:
    """True when :class:`PlannedRotaryStep` may stand in for the generic cached step of ``model``.

    gptfast's Llama 3 / Qwen3 decoders (plain, KV-cache or batched variants) with dense
    SwiGLU feed-forwards and gptfast's RMSNorms, no forward hook (on them or globally), no
    instance-level ``forward`` and plain tensors only (as :func:`plannable`).
    """
    return (type(model.tok_emb) is nn.Embedding and model.tok_emb.max_norm is None
            and type(model.final_norm) in _RMS_NORMS and _plain_linear(model.out_head)
            and all(_rotary_block(block) for block in model.trf_blocks) and not _has_hooks(model)
            and _plain_tensors(model))


class _RMSNorm:
    """A gptfast RMSNorm on rows ``(M, D)`` as its forward runs it on a fused backend."""

    def __init__(self, weight, eps, entry_point):
        self.weight, self.eps, self.entry_point = weight, float(eps), entry_point
        self.rows = rms_norm_rows(entry_point, guarded=True) if weight.is_contiguous() else None

    @classmethod
    def build(cls, norm, x):
        """The plan of ``norm`` for inputs like ``x``, or ``None`` when its forward would not run a fused kernel."""
        weight_eps = norm.fused_args(x)
        if weight_eps is None:
            return None
        weight, eps = weight_eps
        entry_point = ops.fused_entry_point("rms_norm", x.device, (x, weight), {"eps": float(eps)})
        return None if entry_point is None else cls(weight, eps, entry_point)

    def __call__(self, x):
        if self.rows is None:
            return self.entry_point(x, self.weight, eps=self.eps)
        return self.rows(x, self.weight, self.eps)


def _rope_at(entry_point, x, cos, sin, positions):
    """``entry_point`` (a fused backend's rope) for rows at their own ``positions``."""
    return entry_point(x, cos, sin, offset=0, positions=positions)


class PlannedRotaryStep:
    """One cached decode step of a plannable Llama 3 / Qwen3 decoder (:func:`rotary_plannable`).

    As :class:`PlannedGPTStep`: built from the first step's tensors, ``None`` where a
    forward would not take a fused kernel; the stream stays as ``(B, emb_dim)`` rows and
    queries/keys are normalised as ``(B * heads, head_dim)`` rows, the kernels' layout.
    """

    def __init__(self, model, norms, qk_norms, linears, rope, swiglu, rope_at=None):
        self.model = model
        self.norms, self.qk_norms, self.linears, self.rope, self.swiglu = norms, qk_norms, linears, rope, swiglu
        self.rope_at = rope_at  # rows at their own positions (None: the formula, as the generic step)
        self.heads = [(block.att.num_heads, block.att.num_kv_groups, block.att.head_dim) for block in model.trf_blocks]
        self.head_dtype = model.out_head.weight.dtype

    @classmethod
    def build(cls, model, x, linear_kernel):
        """The plan for steps whose embedded input looks like ``x``, or ``None`` (as :meth:`PlannedGPTStep.build`)."""
        if not rotary_plannable(model):
            return None
        b = x.shape[0]
        norm_modules = [n for block in model.trf_blocks for n in (block.norm1, block.norm2)] + [model.final_norm]
        norms = [_RMSNorm.build(norm, x) for norm in norm_modules]
        qk_norms, linears, rope, swiglu, rope_at = [], [], None, None, None
        for block in model.trf_blocks:
            att, ff = block.att, block.ff
            heads = x.new_empty((b, att.num_heads, 1, att.head_dim))
            for name in ("q_norm", "k_norm"):
                norm = getattr(att, name, None)
                qk_norms.append(None if norm is None else _RMSNorm.build(norm, heads))
                if norm is not None and qk_norms[-1] is None:
                    return None
            merged = x.new_empty((b, 1, att.num_heads * att.head_dim))
            hidden = x.new_empty((b, 1, ff.fc1.out_features))
            for module, sample in ((att.W_query, x), (att.W_key, x), (att.W_value, x), (att.out_proj, merged),
                                   (ff.fc1, x), (ff.fc2, x), (ff.fc3, hidden)):
                linears.append(_Linear(module, linear_kernel(sample, module.weight, module.bias)))
            if rope is None:
                if not layers.rope_takes_op(heads, model.cos[:1], model.sin[:1]):
                    return None  # rotate_half_rope would run the formula itself
                entry_point = ops.fused_entry_point("rope", x.device, (heads, model.cos[:1], model.sin[:1]),
                                                    {"offset": 0, "positions": None})
                if entry_point is None:
                    return None
                bound = rope_rows(entry_point, guarded=True)
                rope = bound or entry_point
                if x.device.type == "cpu":  # the generic step's op with the positions, on its kernel where bound
                    rope_at = bound or functools.partial(_rope_at, entry_point)
                # The backend ops.swiglu resolves to, on its kernel where that is a fused backend's.
                entry_point = ops.resolve("swiglu", x.device, (hidden, hidden), {})[1]
                swiglu = swiglu_rows(entry_point, guarded=True) or entry_point
        if any(norm is None for norm in norms):
            return None
        final_sample = x.new_empty(x.shape, dtype=model.out_head.weight.dtype)
        linears.append(_Linear(model.out_head, linear_kernel(final_sample, model.out_head.weight, model.out_head.bias)))
        return cls(model, norms, qk_norms, linears, rope, swiglu, rope_at)

    def run(self, idx, positions, attend):
        """Logits ``(B, vocab)`` of the step's tokens ``idx`` ``(B, 1)`` at ``positions`` (``(1,)``, or ``(B, 1)`` for
        rows at their own positions); ``attend(i, q, k, v)`` is layer ``i``'s attention core over grouped k/v (it
        writes the cache), as in ``CachedRunner._run``."""
        with without_graph():  # once for the step: the rows kernels are bound without their own guard
            return self._run(idx, positions, attend)

    def _rope_for(self, positions):
        """``(rope, cos, sin)`` with ``rope(x, cos, sin)`` rotating the step's heads at ``positions``: ``(1,)`` for
        every row, ``(B, 1)`` for rows at their own positions (as the generic step rotates them)."""
        model = self.model
        if positions.dim() == 1:
            return self.rope, model.cos[positions], model.sin[positions]
        if self.rope_at is not None:  # the kernel reads each row's table row: the generic step's op
            return (lambda x, cos, sin: self.rope_at(x, cos, sin, positions)), model.cos, model.sin
        # Per-row tables (B, 1, 1, D): rotate_half_rope computes these with its own formula, as the generic step does.
        return layers.rotate_half_rope, model.cos[positions].unsqueeze(1), model.sin[positions].unsqueeze(1)

    def _run(self, idx, positions, attend):
        model = self.model
        b = idx.shape[0]
        x = model.tok_emb(idx).view(b, -1)
        rope, cos, sin = self._rope_for(positions)
        norms, qk_norms, linears, swiglu = self.norms, self.qk_norms, self.linears, self.swiglu
        for i, (heads, kv_heads, head_dim) in enumerate(self.heads):
            w_query, w_key, w_value, out_proj, fc1, fc2, fc3 = linears[7 * i:7 * i + 7]
            q_norm, k_norm = qk_norms[2 * i:2 * i + 2]
            h = norms[2 * i](x)
            q, k = w_query(h), w_key(h)
            if q_norm is not None:
                q = q_norm(q.view(b * heads, head_dim))
            if k_norm is not None:
                k = k_norm(k.view(b * kv_heads, head_dim))
            q = rope(q.view(b, heads, 1, head_dim), cos, sin)
            k = rope(k.view(b, kv_heads, 1, head_dim), cos, sin)
            v = w_value(h).view(b, kv_heads, 1, head_dim)
            x = out_proj(attend(i, q, k, v).reshape(b, -1)) + x
            h = norms[2 * i + 1](x)
            x = fc3(swiglu(fc1(h), fc2(h))) + x
        return linears[-1](norms[-1](x).to(self.head_dtype))
