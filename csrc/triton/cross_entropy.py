"""Softmax cross-entropy in Triton with the gradient written during the forward pass.

One program per row: a first sweep over vocabulary blocks keeps a running maximum
and a running sum of exponentials (online log-sum-exp), so the row is read once for
the loss; a second sweep writes ``(softmax - onehot) * scale`` for the row.  The
op follows the shared schema (csrc/schemas.h); ``gptfast.ops.loss`` registers its
autograd (which only scales the stored gradient) and the reductions.

Targets are bounds-checked in the kernel: a target outside ``[0, V)`` that is not
``ignore_index`` gives a NaN loss instead of an out-of-bounds read.

Non-finite rows follow ``F.cross_entropy`` without special cases: a row holding a NaN
or +inf, or only -inf, has a non-finite log-sum-exp, so its loss and its gradient row
are NaN (an ignored row's loss is 0 but its gradient, ``NaN * 0``, stays NaN, as in
PyTorch); a -inf logit elsewhere is an ordinary zero probability.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ._checks import require, require_device
from ._launch import INTERPRETER, launch, next_power_of_2

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _cross_entropy_kernel(logits_ptr, logits_row_stride, targets_ptr, targets_stride, loss_ptr, grad_ptr,
                          grad_row_stride, grad_scale_ptr, grad_scale_stride, n_cols, ignore_index,
                          BLOCK_V: tl.constexpr, WRITE_GRAD: tl.constexpr, SCALE_PER_ROW: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    target = tl.load(targets_ptr + row * targets_stride).to(tl.int64)
    ignored = target == ignore_index
    valid = (target >= 0) & (target < n_cols)

    # Sweep 1: online max and sum of exp over the vocabulary blocks.
    row_max = tl.full([], float("-inf"), tl.float32)
    row_sum = tl.zeros([], tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + offs, mask=offs < n_cols, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(row_max, tl.max(x, 0))
        # Shift by 0 while everything seen is -inf, so exp never sees (-inf) - (-inf).
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        row_sum = row_sum * tl.exp(row_max - shift) + tl.sum(tl.exp(x - shift), 0)
        row_max = new_max
    log_sum = tl.log(row_sum)
    lse = row_max + log_sum

    target_logit = tl.load(row_ptr + target, mask=valid & ~ignored, other=0.0).to(tl.float32)
    # (max - target) + log(sum) rather than lse - target: a small loss next to a large max keeps its digits.
    loss = tl.where(ignored, 0.0, tl.where(valid, (row_max - target_logit) + log_sum, float("nan")))
    tl.store(loss_ptr + row, loss)

    if WRITE_GRAD:
        # Sweep 2: d loss / d logits = softmax - onehot(target), times this row's scale.
        if SCALE_PER_ROW:
            scale = tl.load(grad_scale_ptr + row * grad_scale_stride).to(tl.float32)
        else:
            scale = tl.load(grad_scale_ptr).to(tl.float32)
        scale = tl.where(ignored, 0.0, scale)
        grad_row_ptr = grad_ptr + row * grad_row_stride
        for start in range(0, n_cols, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            in_row = offs < n_cols
            x = tl.load(row_ptr + offs, mask=in_row, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) - tl.where(offs == target, 1.0, 0.0)
            tl.store(grad_row_ptr + offs, (grad * scale).to(grad_ptr.dtype.element_ty), mask=in_row)


def _config(n_cols: int) -> dict:
    if INTERPRETER:  # its cost is per operation: few, large blocks
        return dict(BLOCK_V=min(next_power_of_2(n_cols), 8192))
    block = min(next_power_of_2(n_cols), 4096)
    return dict(BLOCK_V=block, num_warps=8 if block >= 2048 else 4)


def launch_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, losses: torch.Tensor,
                         grad: torch.Tensor | None, grad_scale: torch.Tensor | None, ignore_index: int) -> None:
    """Run the kernel on ``logits`` ``(N, V)`` (unit column stride); fills ``losses`` ``(N,)`` float32.

    ``targets`` and ``grad_scale`` may be strided views (a slice ``Y[:, -1]``, an
    expanded tensor): the kernel reads them through their strides.  ``losses`` must be
    contiguous.

    With ``grad`` given (``(N, V)``, may be ``logits`` itself: each element is read
    before it is overwritten), also writes ``(softmax - onehot) * grad_scale`` into it;
    ``grad_scale`` has one element (all rows) or ``N`` (one per row).
    """
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    write_grad = grad is not None
    if losses.stride(0) != 1 and n_rows > 1:
        raise ValueError("launch_cross_entropy: losses must be contiguous")
    per_row = write_grad and grad_scale.numel() == n_rows and n_rows != 1
    launch(_cross_entropy_kernel, (n_rows,), logits, logits.stride(0), targets, targets.stride(0), losses,
           grad if write_grad else logits, grad.stride(0) if write_grad else 0,
           grad_scale if write_grad else losses, grad_scale.stride(0) if per_row else 0, n_cols, ignore_index,
           WRITE_GRAD=write_grad, SCALE_PER_ROW=per_row, **_config(n_cols))


def _check_args(logits: torch.Tensor, targets: torch.Tensor) -> None:
    """The kernel reads one target per row of ``logits`` ``(N, V)``."""
    op = "cross_entropy_fwd"
    require(logits.dim() == 2, op, f"logits must be (N, V), got {tuple(logits.shape)}")
    require(logits.shape[1] > 0, op, "logits need at least one class")
    require_device(op, "logits", logits, targets=targets)
    require(targets.dim() == 1 and targets.shape[0] == logits.shape[0], op,
            f"targets must be ({logits.shape[0]},), got {tuple(targets.shape)}")
    require(targets.dtype in (torch.int64, torch.int32), op, f"targets must be int64 or int32, got {targets.dtype}")


@triton_op("gptfast_triton::cross_entropy_fwd", mutates_args=())
def cross_entropy_fwd(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                      want_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses ``(N,)`` float32 and, if ``want_grad``, ``softmax - onehot`` ``(N, V)`` (else empty)."""
    _check_args(logits, targets)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    losses = torch.empty(logits.shape[0], device=logits.device, dtype=torch.float32)
    if want_grad:
        grad = torch.empty(logits.shape, device=logits.device, dtype=logits.dtype)
        unit_scale = torch.ones(1, device=logits.device, dtype=torch.float32)
        launch_cross_entropy(logits, targets, losses, grad, unit_scale, ignore_index)
    else:
        grad = logits.new_empty(0)
        launch_cross_entropy(logits, targets, losses, None, None, ignore_index)
    return losses, grad


def unsupported_reason(logits: torch.Tensor) -> str | None:
    """``None`` if the kernel can run on these logits, else why not."""
    if logits.dtype not in DTYPES:
        return f"dtype {logits.dtype} is not supported (float32/float16/bfloat16)"
    return None

