"""Rotary position embedding (rotate-half RoPE) above the kernels, for every fused backend.

The kernels are two torch ops with one schema in each namespace (csrc/schemas.h)::

    rope_fwd(x, cos, sin, positions, offset) -> out
    rope_bwd(grad_out, cos, sin, positions, offset) -> grad_x

RoPE is a rotation per pair ``(x[j], x[j + D/2])``, linear in ``x``: the backward is the
transposed rotation of the upstream gradient, so nothing but the tables is saved.  The
tables get no gradient (they are constants of the model); a call whose tables require one is
not served here (:func:`fused_rope_limit`), so it takes the torch path.  Conventions held here: the
per-row ``positions`` go to the kernels as int64, ``offset`` is unused with them, and ``x``
may be a strided view (the heads of a projection) as long as ``D`` is unit-stride.
"""

from __future__ import annotations

import torch

from ._autograd import first_order_only
from ._dispatch import bound_kernel, kernels, register_fake, without_graph


def _fake_rope(x, cos, sin, positions, offset):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    _x, cos, sin, positions, offset = inputs
    ctx.save_for_backward(cos, sin, positions)
    ctx.offset = offset
    ctx.set_materialize_grads(False)


def _make_backward(namespace: str):
    def backward(ctx, grad_out):
        if grad_out is None:
            return None, None, None, None, None
        cos, sin, positions = ctx.saved_tensors
        grad_x = kernels(namespace).rope_bwd(grad_out, cos, sin, positions, ctx.offset)
        return grad_x, None, None, None, None

    return backward


def register(namespace: str, *, fakes: bool = True) -> None:
    """Register the autograd formula (and, with ``fakes``, the fake impls) of ``namespace``'s RoPE ops."""
    if fakes:
        register_fake(f"{namespace}::rope_fwd", _fake_rope)
        register_fake(f"{namespace}::rope_bwd", _fake_rope)
    torch.library.register_autograd(f"{namespace}::rope_fwd",
                                    first_order_only(f"{namespace}::rope", _make_backward(namespace)),
                                    setup_context=_setup_context)


def fused_rope_limit(x, cos, sin, **_):
    """Why no fused backend runs this call, or ``None``: the kernels give the tables no gradient, so tables
    that need one take the torch path under ``"auto"`` (a named fused backend refuses the call)."""
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        return "cos/sin require grad, and the fused kernels give the RoPE tables no gradient"
    return None


def fused_rope(ops, x, cos, sin, *, offset=0, positions=None):
    """RoPE on ``ops``' kernels (inputs already validated); same contract as ``gptfast.ops.rope``."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if positions is not None:
        positions = positions.to(torch.int64)
        offset = 0
    with without_graph():
        return kernels(ops).rope_fwd(x, cos, sin, positions, int(offset))


def rope_rows(entry_point, *, guarded=False):
    """``fn(x, cos, sin, positions=None)`` running the kernel behind a resolved ``rope`` entry point, or ``None``.

    For a caller that calls it many times on validated input in the kernel's layout (a
    decode plan): ``x`` ``(B, H, T, D)`` with a unit-stride last axis; ``cos``/``sin`` the
    ``(T, D)`` rows of its positions, or, with ``positions`` (the ``(B, T)`` int64 position of
    each token; the kernels check that they lie in the tables), the whole ``(P, D)`` tables.
    ``None`` when ``entry_point`` is not a fused backend's.  ``guarded``: the caller holds
    :func:`~gptfast.ops._dispatch.without_graph` (see ``bound_kernel``).
    """
    kernel = bound_kernel(entry_point, fused_rope, "rope_fwd", guarded=guarded)
    if kernel is None:
        return None
    return lambda x, cos, sin, positions=None: kernel(x, cos, sin, positions, 0)
