"""Low-rank adaptation (appendix E): a trainable ``alpha * x @ A @ B`` beside a frozen linear layer.

``A @ B`` is never formed: the update is ``(x @ A) @ B``, two thin matmuls through
the rank.  The wrapped layer's weights keep their own ``requires_grad``: freeze them
(the book does so before wrapping, or pass ``freeze_base=True``) and autograd neither
computes nor stores a gradient for them, only for ``A`` and ``B``.

Parameter names, shapes, creation order and initial values under a seed are those of
``llms_from_scratch.appendix_e``; with the ``"torch"`` ops backend outputs are bitwise
the reference's.  Otherwise :class:`LinearWithLoRA` adds the update into the linear
layer's output in one ``addmm_`` (no separate scaled copy and sum of the output).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from ..models.blocks import is_plain_linear, runs_own_forward
from ..ops.linear import dense_linear
from .heads import reference_numerics


def _whole(name, value, least):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < least:
        raise ValueError(f"{name} must be >= {least}, got {value}")
    return int(value)


def _alpha(value):
    """A real number, or a tensor (a learnable or per-feature scale), as the reference's product takes it."""
    if isinstance(value, torch.Tensor) or (isinstance(value, numbers.Real) and not isinstance(value, bool)):
        return value
    raise TypeError(f"alpha must be a real number or a tensor, got {type(value).__name__}")


def _features(linear):
    """``(in_features, out_features)`` of the layer to wrap: an ``nn.Linear``, or a module that says both."""
    sizes = getattr(linear, "in_features", None), getattr(linear, "out_features", None)
    if not isinstance(linear, nn.Module) or not all(isinstance(n, numbers.Integral) for n in sizes):
        raise TypeError(f"linear must be a torch.nn.Linear (or a module with int in_features and out_features), "
                        f"got {type(linear).__name__}")
    return sizes


class LoRALayer(nn.Module):
    """``alpha * (x @ A) @ B`` with ``A`` ``(in_dim, rank)`` Kaiming-uniform and ``B`` ``(rank, out_dim)`` zero."""

    def __init__(self, in_dim, out_dim, rank, alpha):
        super().__init__()
        in_dim, out_dim = _whole("in_dim", in_dim, 1), _whole("out_dim", out_dim, 1)
        rank = _whole("rank", rank, 0)  # rank 0: no update, as in the reference (torch warns on the empty init)
        self.A = nn.Parameter(torch.empty(in_dim, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # the bound nn.Linear uses for its weights
        self.B = nn.Parameter(torch.zeros(rank, out_dim))
        self.alpha = _alpha(alpha)

    def forward(self, x):
        return self.alpha * ((x @ self.A) @ self.B)


class LinearWithLoRA(nn.Module):
    """``linear(x) + lora(x)``: a linear layer plus a rank-``rank`` update scaled by ``alpha``.

    ``freeze_base=True`` (not in the reference) turns off ``requires_grad`` of the
    wrapped layer's weight and bias.
    """

    def __init__(self, linear, rank, alpha, freeze_base=False):
        super().__init__()
        self.linear = linear
        self.lora = LoRALayer(*_features(linear), rank, alpha)
        if freeze_base:
            linear.requires_grad_(False)

    def forward(self, x):
        # Under autocast the in-place addmm_ would mix its dtypes (in-place ops are not cast), and the fused sum
        # reads the two parts' weights, skipping their forwards: the plain sum then, for parts with a hook
        # (pruning's too) or a forward of their own, for an alpha addmm_ cannot take (a tensor) and for rank 0.
        if (reference_numerics() or torch.is_autocast_enabled(x.device.type) or not is_plain_linear(self.linear)
                or type(self.lora) is not LoRALayer or not runs_own_forward(self.lora)
                or not isinstance(self.lora.alpha, numbers.Real) or self.lora.A.shape[1] == 0):
            return self.linear(x) + self.lora(x)
        return _linear_plus_low_rank(x, self.linear.weight, self.linear.bias, self.lora.A, self.lora.B,
                                     self.lora.alpha)


def _linear_plus_low_rank(x, weight, bias, A, B, alpha):
    """``x @ weight.T + bias + alpha * (x @ A) @ B`` with the update accumulated in place by ``addmm_`` (the
    layer's own product as the models compute theirs, :func:`~gptfast.ops.linear.dense_linear`)."""
    out = dense_linear(x, weight, bias)
    low = (x @ A).reshape(-1, A.shape[1])
    # The linear's backward needs x and weight, not its output, so updating the output in place is safe.
    out.view(-1, out.shape[-1]).addmm_(low, B, alpha=alpha)
    return out


def replace_linear_with_lora(model, rank, alpha, freeze_base=False):
    """Wrap every ``nn.Linear`` inside ``model`` (recursively, in place) in a :class:`LinearWithLoRA`.

    The book freezes the whole model first, so only the LoRA matrices train;
    ``freeze_base=True`` (not in the reference) freezes the wrapped layers here.
    """
    rank, alpha = _whole("rank", rank, 0), _alpha(alpha)
    for name, child in model.named_children():
        if isinstance(child, nn.Linear):
            setattr(model, name, LinearWithLoRA(child, rank, alpha, freeze_base))
        else:
            replace_linear_with_lora(child, rank, alpha, freeze_base)
