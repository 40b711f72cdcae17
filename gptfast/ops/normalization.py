"""RMSNorm and LayerNorm above the kernels, for every fused backend (cpu, cuda, triton).

The kernels are torch ops with one schema in each namespace (csrc/schemas.h)::

    rms_norm_fwd(x, weight, eps) -> (out, rstd)
    rms_norm_bwd(grad_out, x, weight, rstd) -> (dx, dweight)
    layer_norm_fwd(x, weight, bias, eps) -> (out, mean, rstd)
    layer_norm_bwd(grad_out, x, weight, mean, rstd) -> (dx, dweight, dbias)

Here, once for all backends: the fakes (for the C++ ops; a Triton op's fake is its own
body), the autograd formulas (the forwards save ``x`` and the per-row statistics, not the
output) and the convention that the kernels see 2-D ``(rows, D)`` inputs: ``x`` of any
rank is flattened to rows here and the result viewed back.

Numerics: ``x`` is widened to float32 (float64 stays), the statistics and the affine map
are computed there and the result is rounded once to ``x``'s dtype -- the convention of
the reference's Qwen3 ``RMSNorm``, of ``F.rms_norm`` and of the book's GPT ``LayerNorm``
run in float32 (its variance is the biased one, ``unbiased=False``).  The weight (and
the LayerNorm bias) may have another float dtype than ``x`` (float32 parameters with
bfloat16 activations); their gradients come back in the parameters' own dtypes.
"""

from __future__ import annotations

import torch

from ._autograd import first_order_only
from ._dispatch import bound_kernel, kernels, register_fake, without_graph


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
        dx, dweight = kernels(namespace).rms_norm_bwd(grad_out, x, weight, rstd)
        return dx, dweight, None

    return backward


def _fake_layer_norm_fwd(x, weight, bias, eps):
    stat = x.new_empty((x.shape[0],), dtype=stat_dtype(x.dtype))
    return x.new_empty(x.shape), stat, stat.new_empty(stat.shape)


def _fake_layer_norm_bwd(grad_out, x, weight, mean, rstd):
    param = x.new_empty(weight.shape, dtype=stat_dtype(x.dtype))
    return x.new_empty(x.shape), param, param.new_empty(param.shape)


def _setup_layer_norm_context(ctx, inputs, output):
    x, weight, bias, _eps = inputs
    _out, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.bias_dtype = bias.dtype
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)


def _make_layer_norm_backward(namespace: str):
    def backward(ctx, grad_out, _grad_mean, _grad_rstd):
        if grad_out is None:  # the output did not reach the differentiated result
            return None, None, None, None
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias = kernels(namespace).layer_norm_bwd(grad_out, x, weight, mean, rstd)
        # The kernels sum the parameter gradients in the accumulation dtype; round once here.
        return dx, dweight.to(weight.dtype), dbias.to(ctx.bias_dtype), None

    return backward


def register(namespace: str, *, fakes: bool = True) -> None:
    """Register the autograd formulas (and, with ``fakes``, the fake impls) of ``namespace``'s norm ops."""
    if fakes:
        register_fake(f"{namespace}::rms_norm_fwd", _fake_rms_norm_fwd)
        register_fake(f"{namespace}::rms_norm_bwd", _fake_rms_norm_bwd)
        register_fake(f"{namespace}::layer_norm_fwd", _fake_layer_norm_fwd)
        register_fake(f"{namespace}::layer_norm_bwd", _fake_layer_norm_bwd)
    torch.library.register_autograd(f"{namespace}::rms_norm_fwd",
                                    first_order_only(f"{namespace}::rms_norm", _make_backward(namespace)),
                                    setup_context=_setup_context)
    torch.library.register_autograd(f"{namespace}::layer_norm_fwd",
                                    first_order_only(f"{namespace}::layer_norm", _make_layer_norm_backward(namespace)),
                                    setup_context=_setup_layer_norm_context)


def fused_rms_norm(ops, x, weight, *, eps=1e-6):
    """RMSNorm on ``ops``' kernels (a namespace name such as ``"gptfast_cpu"``).

    Same contract as ``gptfast.ops.rms_norm`` (inputs already validated): ``x`` ``(..., D)``
    is viewed as ``(rows, D)`` (copied only when its layout does not allow that).
    """
    rows = x.reshape(-1, x.shape[-1])
    with without_graph():
        out, _rstd = kernels(ops).rms_norm_fwd(rows, weight, float(eps))
    return out.view(x.shape)


def fused_layer_norm(ops, x, weight, bias, *, eps=1e-5):
    """LayerNorm on ``ops``' kernels (a namespace name such as ``"gptfast_cpu"``).

    Same contract as ``gptfast.ops.layer_norm`` (inputs already validated): ``x`` ``(..., D)``
    is viewed as ``(rows, D)`` (copied only when its layout does not allow that).
    """
    rows = x.reshape(-1, x.shape[-1])
    with without_graph():
        out, _mean, _rstd = kernels(ops).layer_norm_fwd(rows, weight, bias, float(eps))
    return out.view(x.shape)


def layer_norm_rows(entry_point, *, guarded=False):
    """``fn(rows, weight, bias, eps)`` running the kernel behind a resolved ``layer_norm`` entry point, or ``None``.

    For a caller that keeps its inputs in the kernel's layout (a decode plan): ``rows``
    ``(M, D)`` contiguous, already validated; returns the normalised ``(M, D)``.  ``None``
    when ``entry_point`` is not a fused backend's.  ``guarded``: the caller holds
    :func:`~gptfast.ops._dispatch.without_graph` (see ``bound_kernel``).
    """
    return bound_kernel(entry_point, fused_layer_norm, "layer_norm_fwd", first_output=True, guarded=guarded)


def rms_norm_rows(entry_point, *, guarded=False):
    """``fn(rows, weight, eps)`` running the kernel behind a resolved ``rms_norm`` entry point, or ``None``
    (same contract as :func:`layer_norm_rows`)."""
    return bound_kernel(entry_point, fused_rms_norm, "rms_norm_fwd", first_output=True, guarded=guarded)
