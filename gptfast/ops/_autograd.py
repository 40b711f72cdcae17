"""Autograd helpers shared by the fused cross-entropy backends."""

from __future__ import annotations

import torch
from torch.utils import _python_dispatch


def is_tracing(t: torch.Tensor) -> bool:
    """True while dynamo/AOTAutograd/make_fx/opcheck trace (fake, functional or proxy tensors), False when eager."""
    return (torch.compiler.is_compiling() or type(t) is not torch.Tensor
            or _python_dispatch._get_current_dispatch_mode() is not None)


def scale_saved_grad(grad: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``grad * factor`` in ``grad``'s dtype: the backward of a loss whose forward saved d loss / d logits.

    Eagerly it multiplies in place, so the saved buffer becomes the logits gradient and
    no second ``(N, V)`` buffer exists; a second backward through the same graph
    (``retain_graph=True``) is then refused by autograd's saved-tensor version check.
    While tracing it is out of place, so the traced backward has no mutated inputs.
    """
    if is_tracing(grad):
        return (grad * factor).to(grad.dtype)
    return grad.mul_(factor)


def register_saved_grad_autograd(op_name: str) -> None:
    """Autograd for a fused loss op ``(logits, targets, ignore_index, want_grad) -> (loss_rows, grad)``.

    The forward already wrote d loss_row / d logits into ``grad`` (when ``want_grad``),
    so the backward only chains each row with its upstream factor.  Shared by the cpu,
    triton and cuda cross-entropy ops, which all have this schema.
    """

    def setup_context(ctx, inputs, output):
        _, grad = output
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(grad)
        ctx.want_grad = inputs[3]
        # Otherwise autograd hands backward a zero-filled (N, V) "gradient" of `grad`.
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_loss_rows, _grad_of_grad):
        if grad_loss_rows is None:  # the loss rows did not reach the differentiated result
            return None, None, None, None
        if not ctx.want_grad:
            raise RuntimeError(f"{op_name} ran without a gradient buffer (grad mode was off or logits did "
                               "not require grad); cannot backpropagate")
        (grad,) = ctx.saved_tensors
        return scale_saved_grad(grad, grad_loss_rows.unsqueeze(1)), None, None, None

    torch.library.register_autograd(op_name, backward, setup_context=setup_context)
