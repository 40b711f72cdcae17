"""RMSNorm forward and backward in Triton (schemas ``rms_norm_fwd`` / ``rms_norm_bwd``, csrc/schemas.h).

Forward: one program per row; the whole row sits in registers (``BLOCK_D`` is the next
power of two of ``D``), so the row is read once.  Math is float32; the result is rounded
once to ``x``'s dtype.

Backward: each program takes a fixed slice of rows, writes their ``dx`` and sums their
``grad * xhat`` into its own float32 row of a partial buffer; the partials are then added
in program order with ``torch.sum``.  The grid depends on the shape only, so ``dweight``
is the same on every run.  ``gptfast.ops.normalization`` registers the autograd.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ._checks import require, require_row_grad, require_rows, require_stat
from ._launch import launch, load_row_f32, next_power_of_2, row_slices, row_unsupported_reason, row_warps


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, out_ptr, rstd_ptr, D, eps, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    inside = cols < D
    x = load_row_f32(x_ptr, row, D, cols, inside)
    w = load_row_f32(w_ptr, 0, D, cols, inside)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / D + eps)
    tl.store(rstd_ptr + row, rstd)
    tl.store(out_ptr + row * D + cols, ((x * rstd) * w).to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _rms_norm_bwd_kernel(g_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, partial_ptr, N, D, rows_per_program,
                         BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    inside = cols < D
    w = load_row_f32(w_ptr, 0, D, cols, inside)
    dw = tl.zeros([BLOCK_D], tl.float32)
    first = pid * rows_per_program
    for i in range(0, rows_per_program):
        row = first + i
        if row < N:
            x = load_row_f32(x_ptr, row, D, cols, inside)
            g = load_row_f32(g_ptr, row, D, cols, inside)
            rstd = tl.load(rstd_ptr + row)
            xhat = x * rstd
            gxh = g * xhat
            dw += gxh
            c = tl.sum(gxh * w, 0) / D
            dx = rstd * (g * w - xhat * c)
            tl.store(dx_ptr + row * D + cols, dx.to(dx_ptr.dtype.element_ty), mask=inside)
    tl.store(partial_ptr + pid * D + cols, dw, mask=inside)


@triton_op("gptfast_triton::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, rstd)``: ``x`` ``(N, D)`` normalised, scaled by ``weight``; float32 ``rstd`` ``(N,)``."""
    require_rows("rms_norm_fwd", x, ("weight", weight))
    require(eps > 0, "rms_norm_fwd", f"eps must be positive, got {eps}")
    x = x.contiguous()
    n, d = x.shape
    out = torch.empty((n, d), device=x.device, dtype=x.dtype)
    rstd = torch.empty((n,), device=x.device, dtype=torch.float32)
    if n > 0:
        block = next_power_of_2(d)
        launch(_rms_norm_fwd_kernel, (n,), x, weight.contiguous(), out, rstd, d, eps, BLOCK_D=block, **row_warps(block))
    return out, rstd


@triton_op("gptfast_triton::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                 rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dweight)`` for the forward's ``rstd``; ``dweight`` in the weight's dtype."""
    _check_bwd(grad_out, x, weight, rstd)
    x = x.contiguous()
    g = grad_out.to(x.dtype).contiguous()
    n, d = x.shape
    dx = torch.empty((n, d), device=x.device, dtype=x.dtype)
    programs, rows_per_program = row_slices(n)
    partial = torch.zeros((programs, d), device=x.device, dtype=torch.float32)
    if n > 0:
        block = next_power_of_2(d)
        launch(_rms_norm_bwd_kernel, (programs,), g, x, weight.contiguous(), rstd.contiguous(), dx, partial, n, d,
               rows_per_program, BLOCK_D=block, **row_warps(block))
    return dx, partial.sum(0).to(weight.dtype)


def _check_bwd(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> None:
    """The forward's checks, and ``grad_out`` of x's shape and the forward's float32 ``rstd`` ``(N,)``."""
    require_rows("rms_norm_bwd", x, ("weight", weight))
    require_row_grad("rms_norm_bwd", grad_out, x)
    require_stat("rms_norm_bwd", "rstd", rstd, x)


def unsupported_reason(x: torch.Tensor, weight: torch.Tensor, *_) -> str | None:
    """``None`` if the kernels can run on these inputs, else why not."""
    return row_unsupported_reason(x, weight)
