"""The activations above the kernels, for every fused backend (cpu, cuda, triton): SwiGLU
(``silu(gate) * up``) and GPT-2's tanh GELU.

The kernels are torch ops with one schema in each namespace (csrc/schemas.h)::

    swiglu_fwd(gate, up) -> out
    swiglu_bwd(grad_out, gate, up) -> (d_gate, d_up)
    gelu_fwd(x) -> out
    gelu_bwd(grad_out, x) -> dx

Here, once for all backends: the fakes (for the C++ ops; a Triton op's fake is its own
body) and the autograd formulas.  The backwards recompute from the saved inputs instead of
saving intermediates (``sigmoid(gate)``, GELU's ``tanh``): the inputs are kept alive by the
projections' own backward anyway, so this costs no memory, and GELU keeps no copy of its
output.  The kernels see contiguous data of any shape.
"""

from __future__ import annotations

import torch

from ._autograd import first_order_only
from ._dispatch import bound_kernel, kernels, register_fake, without_graph


def _fake_swiglu_fwd(gate, up):
    return gate.new_empty(gate.shape)


def _fake_swiglu_bwd(grad_out, gate, up):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def _fake_gelu_fwd(x):
    return x.new_empty(x.shape)


def _fake_gelu_bwd(grad_out, x):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)
    ctx.set_materialize_grads(False)


def _make_backward(namespace: str):
    def backward(ctx, grad_out):
        if grad_out is None:
            return None, None
        gate, up = ctx.saved_tensors
        return kernels(namespace).swiglu_bwd(grad_out, gate, up)

    return backward


def _make_gelu_backward(namespace: str):
    def backward(ctx, grad_out):
        if grad_out is None:
            return None
        (x,) = ctx.saved_tensors
        return kernels(namespace).gelu_bwd(grad_out, x)

    return backward


def register(namespace: str, *, fakes: bool = True) -> None:
    """Register the autograd formulas (and, with ``fakes``, the fake impls) of ``namespace``'s activation ops."""
    if fakes:
        register_fake(f"{namespace}::swiglu_fwd", _fake_swiglu_fwd)
        register_fake(f"{namespace}::swiglu_bwd", _fake_swiglu_bwd)
        register_fake(f"{namespace}::gelu_fwd", _fake_gelu_fwd)
        register_fake(f"{namespace}::gelu_bwd", _fake_gelu_bwd)
    torch.library.register_autograd(f"{namespace}::swiglu_fwd",
                                    first_order_only(f"{namespace}::swiglu", _make_backward(namespace)),
                                    setup_context=_setup_context)
    torch.library.register_autograd(f"{namespace}::gelu_fwd",
                                    first_order_only(f"{namespace}::gelu", _make_gelu_backward(namespace)),
                                    setup_context=_setup_context)


def fused_swiglu(ops, gate, up):
    """``silu(gate) * up`` on ``ops``' kernels (inputs already validated); the result has ``gate``'s shape."""
    with without_graph():
        return kernels(ops).swiglu_fwd(gate, up)


def fused_gelu(ops, x):
    """GPT-2's tanh GELU on ``ops``' kernels (input already validated); the result has ``x``'s shape."""
    with without_graph():
        return kernels(ops).gelu_fwd(x)


def gelu_rows(entry_point, *, guarded=False):
    """``fn(x)`` running the kernel behind a resolved ``gelu`` entry point, or ``None`` when it is not a fused
    backend's; for a caller that calls it many times on validated input (a decode plan).  ``guarded``: the
    caller holds :func:`~gptfast.ops._dispatch.without_graph` (see ``bound_kernel``)."""
    return bound_kernel(entry_point, fused_gelu, "gelu_fwd", guarded=guarded)


def swiglu_rows(entry_point, *, guarded=False):
    """``fn(gate, up)`` running the kernel behind a resolved ``swiglu`` entry point, or ``None`` when it is not a
    fused backend's (same contract as :func:`gelu_rows`)."""
    return bound_kernel(entry_point, fused_swiglu, "swiglu_fwd", guarded=guarded)
