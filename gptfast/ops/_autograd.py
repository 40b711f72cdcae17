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
