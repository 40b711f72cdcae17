"""LayerNorm forward and backward in Triton (schemas ``layer_norm_fwd`` / ``layer_norm_bwd``, csrc/schemas.h).

Forward: one program per row; the whole row sits in registers (``BLOCK_D`` is the next
power of two of ``D``), so the row is read once for the mean (corrected by the mean deviation
from it), the variance (of the deviations, biased) and the output.  Math is float32; the
result is rounded once to ``x``'s dtype.

Backward: each program takes a fixed slice of rows, writes their ``dx`` and sums their
``grad * xhat`` and ``grad`` into its own float32 rows of two partial buffers; the partials
are then added in program order with ``torch.sum``.  The grid depends on the shape only,
so ``dweight`` and ``dbias`` are the same on every run.  ``gptfast.ops.normalization``
registers the autograd.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ._checks import require, require_row_grad, require_rows, require_stat
from ._launch import launch, load_row_f32, next_power_of_2, row_slices, row_unsupported_reason, row_warps


@triton.jit
def _layer_norm_fwd_kernel(x_ptr, w_ptr, b_ptr, out_ptr, mean_ptr, rstd_ptr, D, eps, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    inside = cols < D
    x = load_row_f32(x_ptr, row, D, cols, inside)
    w = load_row_f32(w_ptr, 0, D, cols, inside)
    b = load_row_f32(b_ptr, 0, D, cols, inside)
    # The mean corrected by the mean deviation from it: off by an ulp, it would be the whole deviation of a
    # constant row far from 0 (xhat +-1 instead of 0).
    mean = tl.sum(x, 0) / D
    mean += tl.sum(tl.where(inside, x - mean, 0.0), 0) / D
    dev = tl.where(inside, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(dev * dev, 0) / D + eps)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)
    tl.store(out_ptr + row * D + cols, ((dev * rstd) * w + b).to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _layer_norm_bwd_kernel(g_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, partial_w_ptr, partial_b_ptr, N, D,
                           rows_per_program, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    inside = cols < D
    w = load_row_f32(w_ptr, 0, D, cols, inside)
    dw = tl.zeros([BLOCK_D], tl.float32)
    db = tl.zeros([BLOCK_D], tl.float32)
    first = pid * rows_per_program
    for i in range(0, rows_per_program):
        row = first + i
        if row < N:
            x = load_row_f32(x_ptr, row, D, cols, inside)
            g = load_row_f32(g_ptr, row, D, cols, inside)
            mean = tl.load(mean_ptr + row)
            rstd = tl.load(rstd_ptr + row)
            xhat = tl.where(inside, (x - mean) * rstd, 0.0)
            gw = g * w
            dw += g * xhat
            db += g
            c1 = tl.sum(gw, 0) / D
            c2 = tl.sum(gw * xhat, 0) / D
            dx = rstd * (gw - c1 - xhat * c2)
            tl.store(dx_ptr + row * D + cols, dx.to(dx_ptr.dtype.element_ty), mask=inside)
    tl.store(partial_w_ptr + pid * D + cols, dw, mask=inside)
    tl.store(partial_b_ptr + pid * D + cols, db, mask=inside)


@triton_op("gptfast_triton::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, mean, rstd)``: ``x`` ``(N, D)`` normalised, scaled and shifted; float32 statistics ``(N,)``."""
    require_rows("layer_norm_fwd", x, ("weight", weight), ("bias", bias))
    require(eps >= 0, "layer_norm_fwd", f"eps must be >= 0, got {eps}")
    x = x.contiguous()
    n, d = x.shape
    out = torch.empty((n, d), device=x.device, dtype=x.dtype)
    mean = torch.empty((n,), device=x.device, dtype=torch.float32)
    rstd = torch.empty((n,), device=x.device, dtype=torch.float32)
    if n > 0:
        block = next_power_of_2(d)
        launch(_layer_norm_fwd_kernel, (n,), x, weight.contiguous(), bias.contiguous(), out, mean, rstd, d, eps,
               BLOCK_D=block, **row_warps(block))
    return out, mean, rstd


@triton_op("gptfast_triton::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                   rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dweight, dbias)`` for the forward's statistics; the parameter gradients in float32."""
    require_rows("layer_norm_bwd", x, ("weight", weight))
    require_row_grad("layer_norm_bwd", grad_out, x)
    require_stat("layer_norm_bwd", "mean", mean, x)
    require_stat("layer_norm_bwd", "rstd", rstd, x)
    x = x.contiguous()
    g = grad_out.to(x.dtype).contiguous()
    n, d = x.shape
    dx = torch.empty((n, d), device=x.device, dtype=x.dtype)
    programs, rows_per_program = row_slices(n)
    partial_w = torch.zeros((programs, d), device=x.device, dtype=torch.float32)
    partial_b = torch.zeros((programs, d), device=x.device, dtype=torch.float32)
    if n > 0:
        block = next_power_of_2(d)
        launch(_layer_norm_bwd_kernel, (programs,), g, x, weight.contiguous(), mean.contiguous(), rstd.contiguous(),
               dx, partial_w, partial_b, n, d, rows_per_program, BLOCK_D=block, **row_warps(block))
    return dx, partial_w.sum(0), partial_b.sum(0)


def unsupported_reason(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> str | None:
    """``None`` if the kernels can run on these inputs, else why not."""
    return row_unsupported_reason(x, weight, bias)
