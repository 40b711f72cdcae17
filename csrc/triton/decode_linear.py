"""Few-row linear layer of decode steps in Triton (schema ``decode_linear``, csrc/schemas.h).

``out = x @ weight.T + bias`` for ``x`` ``(M, K)`` with M a decode step's few rows.  The time
is the time to stream the weight, so each program owns ``BLOCK_N`` output columns (weight rows)
and walks K in ``BLOCK_K`` tiles, reading each weight element once against all of its
``BLOCK_M`` rows of x; ``BLOCK_M`` is M rounded up to a power of two, at least 16 (``tl.dot``'s
smallest tile) and at most 64; more rows take further row groups, each streaming the weight
again.  Accumulators are float32 (exact fp32 products for float32, ``input_precision="ieee"``);
bias is added in float32 and the result rounded once to x's dtype.  x is read through its
strides (no copy); the weight must be contiguous.

Split-K: a decode layer such as Qwen3-0.6B's ``k_proj`` (N=1024) gives only a few dozen column
blocks, too few programs to keep a GPU's memory system busy.  When the column blocks fall
short of ``TARGET_PROGRAMS``, K is split into ranges of whole tiles, each program writes its
float32 partial sums into its own slice of a ``(splits, M, N)`` buffer, and the slices are
added in split order (deterministic, no atomics) before the bias and the single rounding.
Wide layers (gate/up projections, the LM head) run unsplit, with bias and rounding in the kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ._checks import require, require_device, require_dtype, require_shape
from ._launch import INTERPRETER, dot_precision, launch, next_power_of_2

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK_N = 32
MIN_BLOCK_M, MAX_BLOCK_M = 16, 64
# Programs worth having in flight: a few per SM on the GPUs this targets (H100/H200: 132 SMs).
TARGET_PROGRAMS = 256


@triton.jit
def _decode_linear_kernel(x_ptr, sxm, sxk, w_ptr, b_ptr, out_ptr, M, N, K, tiles_per_split,
                          HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_in = rows < M
    col_in = cols < N
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    first = pid_k.to(tl.int64) * tiles_per_split * BLOCK_K
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for t in range(0, tiles_per_split):
        kk = first + t * BLOCK_K + ks
        k_in = kk < K
        xt = tl.load(x_ptr + rows[:, None] * sxm + kk[None, :] * sxk, mask=row_in[:, None] & k_in[None, :],
                     other=0.0)
        wt = tl.load(w_ptr + cols[:, None] * K + kk[None, :], mask=col_in[:, None] & k_in[None, :], other=0.0)
        acc = tl.dot(xt, tl.trans(wt), acc, input_precision=PRECISION)
    inside = row_in[:, None] & col_in[None, :]
    if SPLIT:
        # float32 partials of this K range: slice pid_k of a (splits, M, N) buffer
        tl.store(out_ptr + (pid_k * M + rows[:, None]) * N + cols[None, :], acc, mask=inside)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=inside)


def plan(m: int, n: int, k: int, dtype: torch.dtype) -> dict:
    """Tile sizes and K split for an ``(m, k) x (n, k)`` call: a function of the shape only."""
    block_k = 64 if dtype == torch.float32 else 128  # 256 bytes of each weight row per tile
    block_m = min(MAX_BLOCK_M, max(MIN_BLOCK_M, next_power_of_2(m)))
    col_blocks = triton.cdiv(n, BLOCK_N)
    tiles = max(1, triton.cdiv(k, block_k))
    splits = max(1, min(tiles, TARGET_PROGRAMS // max(1, col_blocks * triton.cdiv(m, block_m))))
    tiles_per_split = triton.cdiv(tiles, splits)
    splits = triton.cdiv(tiles, tiles_per_split)  # no empty range
    return dict(block_m=block_m, block_k=block_k, splits=splits, tiles_per_split=tiles_per_split)


def _check_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """One dtype, one device; weight ``(N, K)`` for x ``(M, K)``, bias ``(N,)``."""
    op = "decode_linear"
    require(x.dim() == 2, op, f"x must be (M, K), got {tuple(x.shape)}")
    require(weight.dim() == 2 and weight.shape[1] == x.shape[1], op,
            f"weight must be (N, {x.shape[1]}), got {tuple(weight.shape)}")
    require_device(op, "x", x, weight=weight, bias=bias)
    require(x.dtype in DTYPES, op, f"x must be float32, bfloat16 or float16, got {x.dtype}")
    require_dtype(op, "weight", weight, x.dtype)
    if bias is not None:
        require_shape(op, "bias", bias, (weight.shape[0],))
        require_dtype(op, "bias", bias, x.dtype)


@triton_op("gptfast_triton::decode_linear", mutates_args=())
def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias``: x ``(M, K)``, weight ``(N, K)``, bias ``(N,)`` or None; out ``(M, N)`` contiguous."""
    _check_args(x, weight, bias)
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return out
    if k == 0:  # an empty sum: only the bias
        out.zero_()
        return out if bias is None else out.add_(bias)
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()  # the kernel reads bias[col] at col, not col * stride
    p = plan(m, n, k, x.dtype)
    grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(m, p["block_m"]), p["splits"])
    split = p["splits"] > 1
    target = torch.empty((p["splits"], m, n), device=x.device, dtype=torch.float32) if split else out
    launch(_decode_linear_kernel, grid, x, x.stride(0), x.stride(1), weight, weight if bias is None else bias,
           target, m, n, k, p["tiles_per_split"], HAS_BIAS=bias is not None, SPLIT=split, BLOCK_M=p["block_m"],
           BLOCK_N=BLOCK_N, BLOCK_K=p["block_k"], PRECISION=dot_precision(x.dtype), **_warps())
    if split:
        total = target.sum(0)
        if bias is not None:
            total += bias.float()
        out.copy_(total)
    return out


def _warps() -> dict:
    return {} if INTERPRETER else dict(num_warps=4)


def unsupported_reason(x: torch.Tensor, weight: torch.Tensor, *_) -> str | None:
    """``None`` if the kernel can run on these inputs, else why not."""
    if x.dtype not in DTYPES:
        return f"decode_linear runs float32, bfloat16 and float16, not {x.dtype}"
    return None
