"""Dropout in Triton (schema ``dropout_fwd``) with the counter-based mask of csrc/dropout_hash.h.

Element ``i`` of the contiguous tensor is kept iff the top 24 bits of splitmix64's finaliser of
``seed + i * 0x9E3779B97F4A7C15`` are ``>= round(p * 2^24)``: the same arithmetic as the C++ and
CUDA kernels, in wrapping uint64, so every backend draws the same mask.  ``out = x * keep / (1 - p)``
in float32, rounded once; a dropped element is multiplied by 0 (NaN and inf give NaN, as in torch).
The seed is read from its tensor inside the kernel (no host synchronisation).  The backward is
this op on ``grad_out`` with the forward's ``p`` and seed (``gptfast.ops.dropout``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ._checks import require_floating, require_probability, require_seed
from ._launch import INTERPRETER, launch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BLOCK = 65536 if INTERPRETER else 1024  # the interpreter's cost is per operation: few, large blocks
_DRAW_RANGE = 16777216.0  # 2^24 draws


def _as_int64(value: int) -> int:
    """A uint64 constant as the int64 with the same bits (a kernel argument is an int64)."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _as_int64(0x9E3779B97F4A7C15)
_MIX1 = _as_int64(0xBF58476D1CE4E5B9)
_MIX2 = _as_int64(0x94D049BB133111EB)


@triton.jit
def _dropout_kernel(x_ptr, out_ptr, seed_ptr, n, threshold, scale, golden, mix1, mix2, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    seed = tl.load(seed_ptr).to(tl.uint64, bitcast=True)
    h = seed + offs.to(tl.uint64, bitcast=True) * golden.to(tl.uint64, bitcast=True)
    h = (h ^ (h >> 30)) * mix1.to(tl.uint64, bitcast=True)
    h = (h ^ (h >> 27)) * mix2.to(tl.uint64, bitcast=True)
    h = h ^ (h >> 31)
    keep = (h >> 40).to(tl.int64) >= threshold
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    out = x * tl.where(keep, scale, 0.0)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=inside)


@triton_op("gptfast_triton::dropout_fwd", mutates_args=())
def dropout_fwd(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """``x * keep / (1 - p)``, contiguous, in x's dtype."""
    require_probability("dropout_fwd", "p", p)
    require_floating("dropout_fwd", x=x)  # an integer x would store its scaled values truncated
    require_seed("dropout_fwd", seed, "x", x)
    x = x.contiguous()
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    n = x.numel()
    if n > 0:
        threshold = math.floor(p * _DRAW_RANGE + 0.5)  # draw_threshold in csrc/dropout_hash.h
        scale = 1.0 / (1.0 - p) if p < 1.0 else 0.0
        launch(_dropout_kernel, (triton.cdiv(n, _BLOCK),), x, out, seed, n, threshold, scale, _GOLDEN, _MIX1, _MIX2,
               BLOCK=_BLOCK)
    return out


def unsupported_reason(x: torch.Tensor, *_) -> str | None:
    """``None`` if the kernel can run on this input, else why not."""
    if x.dtype not in DTYPES:
        return f"dtype {x.dtype} is not supported (float32/float16/bfloat16)"
    return None
