"""Rotary position embedding (rotate-half) forward and backward in Triton (schemas ``rope_fwd`` / ``rope_bwd``).

One program per (batch, head, token) row: the two halves of the row are loaded, rotated
with the position's cos/sin rows and stored into a contiguous output.  ``x`` is read
through its strides (a transposed head view needs no copy).  With ``(A, B) = (-s1, s2)``
forward and ``(s2, -s1)`` backward: ``y1 = x1 c1 + x2 A``, ``y2 = x2 c2 + x1 B``.  Positions
are ``offset + t`` or ``positions[b, t]``; they are validated on the host for CPU tensors, and
a position outside the tables is never read here: its output row is NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ._checks import require, require_device, require_integer, require_shape
from ._launch import launch, next_power_of_2

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _rope_kernel(x_ptr, sb, sh, st, cos_ptr, sin_ptr, pos_ptr, out_ptr, H, T, P, offset, HALF,
                 BLOCK_H: tl.constexpr, PER_ROW: tl.constexpr, BACKWARD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    t = row % T
    h = (row // T) % H
    b = row // (T * H)
    if PER_ROW:
        p = tl.load(pos_ptr + b * T + t).to(tl.int64)
    else:
        p = offset + t
    valid = (p >= 0) & (p < P)
    p = tl.where(valid, p, 0)
    cols = tl.arange(0, BLOCK_H)
    inside = cols < HALF
    src = x_ptr + b * sb + h * sh + t * st
    x1 = tl.load(src + cols, mask=inside, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + cols, mask=inside, other=0.0).to(tl.float32)
    tab = p * 2 * HALF
    c1 = tl.load(cos_ptr + tab + cols, mask=inside, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + tab + HALF + cols, mask=inside, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + tab + cols, mask=inside, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + tab + HALF + cols, mask=inside, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    y1 = tl.where(valid, y1, float("nan"))
    y2 = tl.where(valid, y2, float("nan"))
    dst = out_ptr + row * 2 * HALF
    tl.store(dst + cols, y1.to(out_ptr.dtype.element_ty), mask=inside)
    tl.store(dst + HALF + cols, y2.to(out_ptr.dtype.element_ty), mask=inside)


def _check_args(op: str, name: str, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                positions: torch.Tensor | None) -> None:
    """``x`` ``(B, H, T, D)`` with D even, tables ``(P, D)``, positions ``(B, T)``, all on x's device."""
    require(x.dim() == 4, op, f"{name} must be (B, H, T, D), got {tuple(x.shape)}")
    b, _, t, d = x.shape
    require(d % 2 == 0, op, f"head_dim must be even, got {d}")
    require(cos.dim() == 2 and tuple(cos.shape) == tuple(sin.shape) and cos.shape[1] == d, op,
            f"cos and sin must both be (positions, {d}), got {tuple(cos.shape)} and {tuple(sin.shape)}")
    require_device(op, name, x, cos=cos, sin=sin, positions=positions)
    if positions is not None:
        require_shape(op, "positions", positions, (b, t))
        require_integer(op, "positions", positions)


def _rope(x, cos, sin, positions, offset, backward):
    if x.stride(-1) != 1:
        x = x.contiguous()
    b, h, t, d = x.shape
    out = torch.empty((b, h, t, d), device=x.device, dtype=x.dtype)
    if out.numel() > 0:
        cos, sin = cos.contiguous(), sin.contiguous()
        per_row = positions is not None
        launch(_rope_kernel, (b * h * t,), x, x.stride(0), x.stride(1), x.stride(2), cos, sin,
               positions.contiguous() if per_row else cos, out, h, t, cos.shape[0], offset, d // 2,
               BLOCK_H=next_power_of_2(d // 2), PER_ROW=per_row, BACKWARD=backward)
    return out


@triton_op("gptfast_triton::rope_fwd", mutates_args=())
def rope_fwd(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor | None,
             offset: int) -> torch.Tensor:
    """RoPE of ``x`` ``(B, H, T, D)`` at positions ``offset + t`` or ``positions[b, t]``."""
    _check_args("rope_fwd", "x", x, cos, sin, positions)
    return _rope(x, cos, sin, positions, offset, False)


@triton_op("gptfast_triton::rope_bwd", mutates_args=())
def rope_bwd(grad_out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor | None,
             offset: int) -> torch.Tensor:
    """The gradient of ``rope_fwd`` with respect to ``x``: the transposed rotation of ``grad_out``."""
    _check_args("rope_bwd", "grad_out", grad_out, cos, sin, positions)
    return _rope(grad_out, cos, sin, positions, offset, True)


def unsupported_reason(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> str | None:
    """``None`` if the kernels can run on these inputs, else why not."""
    bad = [t.dtype for t in (x, cos, sin) if t.dtype not in DTYPES]
    if bad:
        return f"dtype {bad[0]} is not supported (float32/float16/bfloat16)"
    return None
