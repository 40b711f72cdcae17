"""The small-batch linear layer (``gptfast.ops.decode_linear``) above the kernels, for every fused backend.

The kernel is one torch op per namespace (gptfast_cpu, gptfast_cuda, gptfast_triton; csrc/schemas.h)::

    decode_linear(x, weight, bias) -> out      # x (M, K), weight (N, K), bias (N,) or None

Here, once for all backends: the fake, the convention that the kernels see 2-D
contiguous rows (``x`` of any rank is flattened here and the result viewed back; a
contiguous weight is passed as is, never copied per call), and the gradient, which
uses ``F.linear``'s formulas in plain torch (``dx = g @ W``, ``dW = g^T x``,
``db = sum g``) so the op can sit in a graph that needs one; the kernels target the
forward of decode steps.
"""

from __future__ import annotations

import torch

from ._dispatch import kernels, without_graph


def _fake_decode_linear(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    dx = grad_out @ weight if ctx.needs_input_grad[0] else None
    dw = grad_out.t() @ x if ctx.needs_input_grad[1] else None
    db = grad_out.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return dx, dw, db


def register(namespace: str, *, fakes: bool = True) -> None:
    """Register the autograd formula (and, with ``fakes``, the fake impl) of ``namespace``'s decode_linear."""
    if fakes:
        torch.library.register_fake(f"{namespace}::decode_linear")(_fake_decode_linear)
    torch.library.register_autograd(f"{namespace}::decode_linear", _backward, setup_context=_setup_context)


def fused_decode_linear(ops, x, weight, bias=None):
    """``x @ weight.T + bias`` on ``ops``' kernels (a namespace name such as ``"gptfast_cpu"``).

    Same contract as ``gptfast.ops.decode_linear`` (inputs already validated).
    """
    rows = x.reshape(x.shape[:-1].numel(), x.shape[-1])
    with without_graph():
        out = kernels(ops).decode_linear(rows, weight.contiguous(), None if bias is None else bias.contiguous())
    return out.view(*x.shape[:-1], weight.shape[0])
