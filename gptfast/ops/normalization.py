"""RMSNorm above the kernels, for every fused backend (cpu, cuda, triton).

The kernels are two torch ops with one schema in each namespace (csrc/schemas.h)::

    rms_norm_fwd(x, weight, eps) -> (out, rstd)
    rms_norm_bwd(grad_out, x, weight, rstd) -> (dx, dweight)

Here, once for all backends: the fakes (for the C++ ops; a Triton op's fake is its own
body), the autograd formula (the forward saves ``x`` and the per-row ``rstd``, not the
output) and the convention that the kernels see 2-D ``(rows, D)`` inputs: ``x`` of any
rank is flattened to rows here and the result viewed back.

Numerics (the convention of the reference's Qwen3 ``RMSNorm`` and of ``F.rms_norm``):
``x`` is widened to float32, ``x * rstd * weight`` is computed there and rounded once to
``x``'s dtype.  The weight may have another float dtype than ``x`` (a float32 weight
with bfloat16 activations); its gradient comes back in the weight's dtype.
"""

from __future__ import annotations

import torch


def _namespace(ops):
    """``torch.ops.<ops>`` for a namespace name; any other object (a test's stand-in) as is."""
    return getattr(torch.ops, ops) if isinstance(ops, str) else ops


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the per-row ``rstd``: float64 for float64 inputs (cpu), else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_rms_norm_fwd(x, weight, eps):
    return x.new_empty(x.shape), x.new_empty((x.shape[0],), dtype=stat_dtype(x.dtype))


def _fake_rms_norm_bwd(grad_out, x, weight, rstd):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    x, weight, _eps = inputs
    _out, rstd = output
    ctx.save_for_backward(x, weight, rstd)
    ctx.mark_non_differentiable(rstd)
    ctx.set_materialize_grads(False)


def _make_backward(namespace: str):
    def backward(ctx, grad_out, _grad_rstd):
        if grad_out is None:  # the output did not reach the differentiated result
            return None, None, None
        x, weight, rstd = ctx.saved_tensors
        dx, dweight = _namespace(namespace).rms_norm_bwd(grad_out, x, weight, rstd)
        return dx, dweight, None

    return backward


def register(namespace: str, *, fakes: bool = True) -> None:
    """Register the autograd formula (and, with ``fakes``, the fake impls) of ``namespace``'s RMSNorm ops."""
    if fakes:
        torch.library.register_fake(f"{namespace}::rms_norm_fwd")(_fake_rms_norm_fwd)
        torch.library.register_fake(f"{namespace}::rms_norm_bwd")(_fake_rms_norm_bwd)
    torch.library.register_autograd(f"{namespace}::rms_norm_fwd", _make_backward(namespace),
                                    setup_context=_setup_context)


def fused_rms_norm(ops, x, weight, *, eps=1e-6):
    """RMSNorm on ``ops``' kernels (a namespace name such as ``"gptfast_cpu"``).

    Same contract as ``gptfast.ops.rms_norm`` (inputs already validated): ``x`` ``(..., D)``
    is viewed as ``(rows, D)`` (copied only when its layout does not allow that).
    """
    rows = x.reshape(-1, x.shape[-1])
    out, _rstd = _namespace(ops).rms_norm_fwd(rows, weight, float(eps))
    return out.view(x.shape)
