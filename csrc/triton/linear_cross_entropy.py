"""Fused output-head cross-entropy: ``cross_entropy(hidden @ weight.T + bias, targets)``.

The tokens are processed in chunks so the full ``(N, V)`` logits never exist: for
each chunk the logits are computed with a matmul, the cross-entropy kernel turns them
*in place* into ``(softmax - onehot) * scale``, and that chunk's gradient is folded
into ``d hidden`` (a matmul) and ``d weight``/``d bias`` (accumulated in float32).

For ``reduction`` "mean"/"sum" the scale of every row is known in the forward pass
(``1 / #kept targets`` or 1), so all gradients are finished there and the backward
only multiplies them by the upstream scalar.  For "none" the upstream gradient is a
per-row vector known only in the backward pass, which then recomputes the chunks.
"""

from __future__ import annotations

from typing import Optional  # op schema annotations: Optional[...] is parsed by every torch version

import torch
import torch.nn.functional as F
from torch.library import triton_op

from gptfast.ops._autograd import scale_saved_grad

from ._launch import INTERPRETER, next_power_of_2
from .cross_entropy import DTYPES, launch_cross_entropy, reduce_losses


def chunk_rows(n_rows: int, hidden_size: int, vocab: int) -> int:
    """Tokens per chunk: about ``hidden_size``, so a chunk's logits are about the size of the weight.

    Memory then stays of the order of the weight (which d weight needs anyway), while
    the per-chunk cost of adding into the float32 d weight (a pass over ``V x H``) is
    paid only ``N / hidden_size`` times.
    """
    if INTERPRETER:
        return 16  # small, so tests go through several chunks
    return max(1, min(n_rows, max(256, next_power_of_2(hidden_size))))


def _chunked_pass(hidden, weight, bias, targets, ignore_index, grad_scale, write_grad):
    """Losses ``(N,)`` float32 and, if ``write_grad``, ``(d hidden, d weight, d bias)`` for row scales ``grad_scale``."""
    n_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    losses = torch.empty(n_rows, device=hidden.device, dtype=torch.float32)
    d_hidden = torch.empty_like(hidden) if write_grad else hidden.new_empty(0)
    # Chunk products are summed in float32 so many chunks do not pile up 16-bit rounding.
    d_weight = torch.zeros(vocab, hidden_size, device=hidden.device, dtype=torch.float32) if write_grad else None
    d_bias = (torch.zeros(vocab, device=hidden.device, dtype=torch.float32)
              if write_grad and bias is not None else None)
    per_row = grad_scale is not None and grad_scale.numel() == n_rows
    step = chunk_rows(n_rows, hidden_size, vocab)
    for start in range(0, n_rows, step):
        rows = slice(start, min(start + step, n_rows))
        h = hidden[rows]
        logits = F.linear(h, weight, bias)
        scale = grad_scale[rows] if per_row else grad_scale
        launch_cross_entropy(logits, targets[rows], losses[rows], logits if write_grad else None, scale,
                             ignore_index)
        if write_grad:
            torch.mm(logits, weight, out=d_hidden[rows])
            d_weight.add_(logits.t() @ h)
            if d_bias is not None:
                d_bias.add_(logits.sum(0, dtype=torch.float32))
    if not write_grad:
        return losses, d_hidden, hidden.new_empty(0), hidden.new_empty(0)
    d_bias = d_bias.to(bias.dtype) if d_bias is not None else hidden.new_empty(0)
    return losses, d_hidden, d_weight.to(weight.dtype), d_bias


def _mean_scale(targets, ignore_index, device):
    """``1 / #kept targets`` as a one-element device tensor (no host sync)."""
    kept = (targets != ignore_index).sum().clamp_(min=1)
    return (1.0 / kept.to(torch.float32)).reshape(1).to(device)


@triton_op("gptfast_triton::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                             targets: torch.Tensor, ignore_index: int, reduction: str, compute_grad: bool
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, d hidden, d weight, d bias)``; loss float32, reduced unless "none".

    Gradients are of the reduced loss (for "mean"/"sum" with ``compute_grad``),
    otherwise empty tensors (the backward recomputes them for "none").
    """
    write_grad = compute_grad and reduction != "none"
    scale = None
    if write_grad:
        scale = (_mean_scale(targets, ignore_index, hidden.device) if reduction == "mean"
                 else torch.ones(1, device=hidden.device, dtype=torch.float32))
    losses, d_hidden, d_weight, d_bias = _chunked_pass(hidden, weight, bias, targets, ignore_index, scale, write_grad)
    loss = reduce_losses(losses, targets, ignore_index, reduction, targets.shape)
    return loss, d_hidden, d_weight, d_bias


@triton_op("gptfast_triton::linear_cross_entropy_bwd", mutates_args=())
def linear_cross_entropy_bwd(grad_losses: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                             bias: Optional[torch.Tensor], targets: torch.Tensor,
                             ignore_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for ``reduction="none"``: recompute each chunk with per-row scales ``grad_losses``."""
    scale = grad_losses.to(torch.float32).contiguous()
    _, d_hidden, d_weight, d_bias = _chunked_pass(hidden, weight, bias, targets, ignore_index, scale, True)
    return d_hidden, d_weight, d_bias


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, ignore_index, reduction, compute_grad = inputs
    _, d_hidden, d_weight, d_bias = output
    ctx.mark_non_differentiable(d_hidden, d_weight, d_bias)
    ctx.reduction = reduction
    ctx.ignore_index = ignore_index
    ctx.has_bias = bias is not None
    ctx.computed_grad = compute_grad
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, bias, targets)
    else:
        ctx.save_for_backward(d_hidden, d_weight, d_bias)


def _backward(ctx, grad_loss, *_unused):
    if not ctx.computed_grad:
        raise RuntimeError("gptfast_triton::linear_cross_entropy_fwd ran with compute_grad=False")
    if ctx.reduction == "none":
        hidden, weight, bias, targets = ctx.saved_tensors
        d_hidden, d_weight, d_bias = linear_cross_entropy_bwd(grad_loss, hidden, weight, bias, targets,
                                                              ctx.ignore_index)
    else:
        d_hidden, d_weight, d_bias = (scale_saved_grad(g, grad_loss) for g in ctx.saved_tensors)
    return d_hidden, d_weight, d_bias if ctx.has_bias else None, None, None, None, None


linear_cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)


def unsupported_reason(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    """``None`` if the fused kernel can serve these tensors, else why not."""
    if hidden.dtype not in DTYPES:
        return f"dtype {hidden.dtype} is not supported (float32/float16/bfloat16)"
    if bias is not None and bias.dtype != hidden.dtype:
        return f"bias dtype {bias.dtype} differs from hidden's {hidden.dtype}"
    return None


def linear_cross_entropy(hidden, weight, targets, *, bias=None, ignore_index=-100, reduction="mean"):
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` without materialising the ``(N, V)`` logits."""
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    needs_grad = hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    compute_grad = torch.is_grad_enabled() and needs_grad
    loss, *_ = linear_cross_entropy_fwd(flat_hidden, weight, bias, flat_targets, int(ignore_index), reduction,
                                        compute_grad)
    if reduction == "none":
        loss = loss.view(targets.shape)
    return loss.to(hidden.dtype)
