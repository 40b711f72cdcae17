"""Backend ``"cpu"``: gptfast's C++ CPU kernels (csrc/cpu), registered as ``gptfast_cpu::*`` torch ops.

The C++ side implements the forward/backward kernels; this module registers their fake
(meta) implementations and autograd formulas, so the ops work under autograd and
``torch.compile``, and exposes one function per op with the ``gptfast.ops`` signature.

* ``causal_attention``: flash-style kernel; dropout masks come from a 64-bit seed drawn
  from torch's default CPU generator, so ``torch.manual_seed`` reproduces them.
* ``cross_entropy``: loss and gradient in one pass per row; backward only scales the
  gradient saved by forward (in place, so backward may run once per forward).
* ``linear_cross_entropy``: chunks of tokens through ``hidden @ weight.T`` and the fused
  cross-entropy, so the full ``(N, V)`` logits never exist.
* ``sample_next_token``: top-k without a sort, temperature, one draw per row from a
  uniform taken from the caller's generator.
"""

from __future__ import annotations

import platform

import torch

from .. import _build_info
from ._autograd import register_saved_grad_autograd

DEVICES = ("cpu",)
# Ops measured faster than the torch path (2-core shared machine, fp32, same process):
# attention fwd+bwd B=2 H=12 T=256 D=64 ~3x, cross-entropy fwd+bwd N=512 V=50257 1.5-2.8x
# (and a third of the peak memory), sampling B=8 V=50257 top_k=25 >100x.  Not
# linear_cross_entropy: its chunked matmuls re-read the weight per chunk and measured on
# par or slightly slower than one big matmul (its gain is memory, not speed).
AUTO_OPS = frozenset({"causal_attention", "cross_entropy", "sample_next_token"})

def _cpu_lacks_avx2() -> bool:
    return (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() == "DEFAULT"
            and _build_info.cpu_needs_avx2())  # a portable build (setup.py's report) runs anywhere


_LOAD_ERROR: str | None = None
if _cpu_lacks_avx2():  # checked before loading: the extension is compiled with -mavx2
    _LOAD_ERROR = "gptfast._C_cpu is compiled for AVX2 and this CPU (or ATEN_CPU_CAPABILITY) does not provide it"
else:
    try:
        from gptfast import _C_cpu  # noqa: F401  (importing registers the gptfast_cpu ops)
    except ImportError as exc:  # not built
        _why = _build_info.why_not_built("cpu")  # recorded by setup.py, e.g. the compiler's error
        _LOAD_ERROR = (f"extension gptfast._C_cpu is unavailable: {_why}" if _why else
                       f"extension gptfast._C_cpu not built: run pip install --no-build-isolation -e . ({exc})")

# Rows of tokens per chunk in linear_cross_entropy: bounds the logits chunk to ~64 MB in fp32
# (about 330 tokens of GPT-2's vocabulary: large enough for efficient matmuls).
_LOGITS_CHUNK_ELEMENTS = 1 << 24


def unavailable_reason() -> str | None:
    """``None`` when the extension is built and this CPU can run it, else why not."""
    return _LOAD_ERROR


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _random_seed() -> int:
    """A 63-bit seed from torch's default CPU generator (so torch.manual_seed reproduces dropout)."""
    return int(torch.empty((), dtype=torch.int64).random_())


# ----------------------------------------------------------------------------- registration

if _LOAD_ERROR is None:
    _ops = torch.ops.gptfast_cpu

    @torch.library.register_fake("gptfast_cpu::attention_forward")
    def _attention_forward_fake(q, k, v, scale, dropout_p, seed):
        b, h, tq, d = q.shape
        return q.new_empty((b, h, tq, d)), q.new_empty((b, h, tq), dtype=_acc_dtype(q.dtype))

    @torch.library.register_fake("gptfast_cpu::attention_backward")
    def _attention_backward_fake(grad_out, q, k, v, out, lse, scale, dropout_p, seed):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def _attention_setup(ctx, inputs, output):
        q, k, v, scale, dropout_p, seed = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.params = (scale, dropout_p, seed)
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)

    def _attention_backward(ctx, grad_out, _grad_lse):
        if grad_out is None:
            return None, None, None, None, None, None
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ops.attention_backward(grad_out, q, k, v, out, lse, *ctx.params)
        return dq, dk, dv, None, None, None

    torch.library.register_autograd("gptfast_cpu::attention_forward", _attention_backward,
                                    setup_context=_attention_setup)

    @torch.library.register_fake("gptfast_cpu::cross_entropy_forward")
    def _cross_entropy_forward_fake(logits, targets, ignore_index, compute_grad):
        grad = logits.new_empty(logits.shape) if compute_grad else logits.new_empty((0,))
        return logits.new_empty((logits.shape[0],), dtype=_acc_dtype(logits.dtype)), grad

    register_saved_grad_autograd("gptfast_cpu::cross_entropy_forward")

    @torch.library.register_fake("gptfast_cpu::sample_next_token")
    def _sample_fake(logits, temperature, top_k, temperatures, top_ks, uniforms):
        return logits.new_empty((logits.shape[0], 1), dtype=torch.int64)


# ----------------------------------------------------------------------------- ops


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def causal_attention(q, k, v, *, dropout_p=0.0, training=False, scale=None):
    """Fused causal attention; accepts strided q/k/v (e.g. transposed head views) without copying."""
    scale = k.shape[-1] ** -0.5 if scale is None else float(scale)
    p = float(dropout_p) if training else 0.0
    seed = _random_seed() if p > 0.0 else 0
    out, _ = torch.ops.gptfast_cpu.attention_forward(
        _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v), scale, p, seed)
    return out


def _reduce(loss_rows, targets, ignore_index, reduction, dtype):
    """Applies the reduction to per-row losses (float32/64) and returns the logits' dtype."""
    if reduction == "none":
        return loss_rows.view(targets.shape).to(dtype)
    total = loss_rows.sum()
    if reduction == "mean":  # all ignored: NaN with zero gradients, as in PyTorch (not 0 * inf)
        kept = (targets != ignore_index).sum()
        total = torch.where(kept > 0, total / kept.clamp(min=1), torch.full_like(total, float("nan")))
    return total.to(dtype)


def cross_entropy(logits, targets, *, ignore_index=-100, reduction="mean"):
    """Fused softmax cross-entropy over the last dimension."""
    flat = logits.reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1)
    want_grad = torch.is_grad_enabled() and logits.requires_grad
    loss_rows, _ = torch.ops.gptfast_cpu.cross_entropy_forward(flat, flat_targets, ignore_index, want_grad)
    return _reduce(loss_rows, targets, ignore_index, reduction, logits.dtype)


def _chunk_rows(n_rows: int, vocab: int) -> int:
    return max(1, min(n_rows, _LOGITS_CHUNK_ELEMENTS // max(vocab, 1)))


def _linear_ce_chunks(hidden, weight, bias, targets, ignore_index, row_scale, need):
    """Per-row losses and (if any of ``need`` = (hidden, weight, bias)) gradients, chunk by chunk.

    Gradients are of ``sum_i row_scale[i] * loss_i`` (row_scale None = all ones).  Weight
    and bias gradients accumulate in fp32 (fp64 for double inputs).
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    any_grad = any(need)
    loss_rows = torch.empty(n, dtype=acc)
    grad_hidden = torch.empty_like(hidden) if need[0] else None
    grad_weight = torch.zeros(weight.shape, dtype=acc) if need[1] else None
    grad_bias = torch.zeros(vocab, dtype=acc) if need[2] else None
    step = _chunk_rows(n, vocab)
    for start in range(0, n, step):
        stop = min(n, start + step)
        h = hidden[start:stop]
        logits = torch.nn.functional.linear(h, weight, bias)
        loss, dlogits = torch.ops.gptfast_cpu.cross_entropy_forward(logits, targets[start:stop], ignore_index,
                                                                    any_grad)
        loss_rows[start:stop] = loss
        del logits
        if not any_grad:
            continue
        if row_scale is not None:
            dlogits.mul_(row_scale[start:stop].unsqueeze(1).to(dlogits.dtype))
        if grad_hidden is not None:
            torch.mm(dlogits, weight, out=grad_hidden[start:stop])
        if grad_weight is not None:
            if dlogits.dtype == acc:
                grad_weight.addmm_(dlogits.t(), h)  # no (V, H) temporary per chunk
            else:
                grad_weight += (dlogits.t() @ h).to(acc)
        if grad_bias is not None:
            grad_bias += dlogits.sum(0, dtype=acc)
    return loss_rows, grad_hidden, grad_weight, grad_bias


class _LinearCrossEntropy(torch.autograd.Function):
    """Chunked ``cross_entropy(hidden @ weight.T + bias)``; never holds the full logits.

    For mean/sum the gradients are computed during forward (one logits pass) and only
    scaled in backward; for ``"none"`` the per-row upstream gradients are needed first, so
    backward recomputes the chunks.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, reduction):
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        precompute = reduction != "none" and any(need)
        loss_rows, gh, gw, gb = _linear_ce_chunks(hidden, weight, bias, targets, ignore_index, None,
                                                  need if precompute else (False, False, False))
        ctx.reduction, ctx.ignore_index, ctx.need = reduction, ignore_index, need
        ctx.weight_dtype = weight.dtype
        if reduction == "none":
            ctx.save_for_backward(hidden, weight, bias, targets)
            return loss_rows.to(hidden.dtype)
        count = (targets != ignore_index).sum() if reduction == "mean" else None
        ctx.grads = (gh, gw, gb)
        ctx.count = count
        total = loss_rows.sum()
        return (total / count if count is not None else total).to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.reduction == "none":
            hidden, weight, bias, targets = ctx.saved_tensors
            _, gh, gw, gb = _linear_ce_chunks(hidden, weight, bias, targets, ctx.ignore_index,
                                              grad_loss.to(_acc_dtype(hidden.dtype)), ctx.need)
        else:
            gh, gw, gb = ctx.grads
            factor = grad_loss.to(_acc_dtype(grad_loss.dtype))
            if ctx.count is not None:  # all ignored: the gradients are 0, not 0 * inf
                factor = factor / ctx.count.clamp(min=1)
            gh = gh * factor.to(gh.dtype) if gh is not None else None
            gw = gw * factor if gw is not None else None
            gb = gb * factor if gb is not None else None
        gw = gw.to(ctx.weight_dtype) if gw is not None else None
        gb = gb.to(ctx.weight_dtype) if gb is not None else None
        return gh, gw, gb, None, None, None


def linear_cross_entropy(hidden, weight, targets, *, bias=None, ignore_index=-100, reduction="mean"):
    """Cross-entropy of the output head without materialising the ``(N, V)`` logits."""
    flat = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    flat_targets = targets.reshape(-1).long()
    loss = _LinearCrossEntropy.apply(flat, weight, bias, flat_targets, int(ignore_index), reduction)
    return loss.view(targets.shape) if reduction == "none" else loss


def sample_next_token(logits, *, temperature=0.0, top_k=None, generator=None):
    """Top-k / temperature sampling; per-row ``temperature``/``top_k`` tensors allowed."""
    per_row_t = temperature if isinstance(temperature, torch.Tensor) else None
    per_row_k = top_k if isinstance(top_k, torch.Tensor) else None
    scalar_t = 0.0 if per_row_t is not None else float(temperature)
    scalar_k = 0 if (top_k is None or per_row_k is not None) else int(top_k)
    if per_row_t is None and scalar_t == 0.0:  # greedy: leave the generator untouched, as torch does
        uniforms = torch.zeros(logits.shape[0], dtype=torch.float64)
    else:
        uniforms = torch.rand(logits.shape[0], generator=generator, dtype=torch.float64)
    return torch.ops.gptfast_cpu.sample_next_token(logits, scalar_t, scalar_k, per_row_t, per_row_k, uniforms)
