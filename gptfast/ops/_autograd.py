"""Backward formulas whose gradients cannot be differentiated again.

The fused ops' backward kernels have no derivative of their own.  Under
``create_graph=True`` (a gradient penalty, a Hessian-vector product) autograd runs a
backward formula with grad mode on and lets the caller differentiate its results; a
kernel's result would then carry no graph, so a second derivative through the op would
come out as 0 without a word.  :func:`first_order_only` makes it an error instead.
"""

from __future__ import annotations

import functools

import torch


def second_derivative_message(op_name: str) -> str:
    return (f"{op_name}: the fused backward has no derivative of its own, so a gradient computed with "
            "create_graph=True cannot be differentiated through it; run that part with "
            "gptfast.ops.use_backend('torch') for higher-order gradients")


class _RaiseWhenDifferentiated(torch.autograd.Function):
    """The given gradients unchanged, made to depend on ``anchors``; differentiating through them raises."""

    @staticmethod
    def forward(ctx, message, n_anchors, *tensors):
        ctx.message = message
        return tuple(t.view_as(t) for t in tensors[n_anchors:])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.message)


def guard_second_derivative(message: str, gradients, anchors):
    """``gradients`` (a tuple with ``None`` entries) as they are, or, when grad mode is on (``create_graph``),
    each tensor tied to ``anchors`` (the op's inputs that require grad, and incoming gradients that do) so
    that a later backward reaching them raises ``message``.  With nothing to tie them to, the gradients
    could still be differentiated silently as constants: refuse at once."""
    if not torch.is_grad_enabled():
        return gradients
    anchors = [t for t in anchors if isinstance(t, torch.Tensor) and t.requires_grad]
    if not anchors:
        raise RuntimeError(message)
    positions = [i for i, g in enumerate(gradients) if isinstance(g, torch.Tensor)]
    if not positions:
        return gradients
    guarded = _RaiseWhenDifferentiated.apply(message, len(anchors), *anchors,
                                             *(gradients[i].detach() for i in positions))
    out = list(gradients)
    for i, g in zip(positions, guarded):
        out[i] = g
    return tuple(out)


def first_order_only(op_name: str, backward):
    """``backward`` (a ``register_autograd`` formula) whose results raise if differentiated again."""
    message = second_derivative_message(op_name)

    @functools.wraps(backward)
    def checked(ctx, *grads):
        if not torch.is_grad_enabled():
            return backward(ctx, *grads)
        anchors = [*ctx.saved_tensors, *grads]  # read first: a backward may reuse a saved buffer in place
        gradients = backward(ctx, *grads)
        single = not isinstance(gradients, tuple)
        guarded = guard_second_derivative(message, (gradients,) if single else gradients, anchors)
        return guarded[0] if single else guarded

    return checked
