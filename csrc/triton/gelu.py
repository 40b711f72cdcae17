"""GPT-2's tanh GELU forward and backward in Triton (schemas ``gelu_fwd`` / ``gelu_bwd``).

Elementwise over the contiguous data, ``BLOCK`` elements per program, float32 math and one
rounding to the input's dtype.  ``0.5 (1 + tanh(u))`` is ``sigmoid(2u)``, so with
``u = b (x + k x^3)`` and ``s = 1 / (1 + exp(-2u))``: ``gelu = x / (1 + exp(-2u))`` and
``d gelu / dx = s + x s (1 - s) 2b (1 + 3k x^2)`` -- one exp instead of a tanh.  In the backward
``x^2`` is capped at 400 inside the polynomial (past ``|x| = 20`` ``s (1 - s)`` is exactly 0), so
a large finite ``x`` gets the limit 1 or 0 instead of ``0 * inf``.  ``b`` is ``sqrt(2/pi)`` at the
book's float32 value, taken from torch as the book takes it (its last bit depends on the machine), and
passed to the kernels as coefficients.  ``gptfast.ops.activation`` registers the autograd.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.library import triton_op

from ._checks import require_floating, require_row_grad
from ._launch import INTERPRETER, launch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BLOCK = 65536 if INTERPRETER else 1024  # the interpreter's cost is per operation: few, large blocks
_SQUARE_CAP = tl.constexpr(400.0)  # a constexpr global: a jitted kernel may read only those
_KAPPA = 0.044715


def _book_coefficients() -> tuple[float, float, float, float]:
    """``(-2b, -2bk, 2b, 6bk)`` with ``b`` the book's ``torch.sqrt(torch.tensor(2.0 / torch.pi))``.

    Computed at import, on real tensors even if that import happens while a graph is traced.
    """
    with unset_fake_temporarily():
        beta = float(torch.sqrt(torch.tensor(2.0 / torch.pi, dtype=torch.float32, device="cpu")))
    return -2.0 * beta, -2.0 * beta * _KAPPA, 2.0 * beta, 6.0 * beta * _KAPPA


_COEFFICIENTS = _book_coefficients()


@triton.jit
def _gelu_fwd_kernel(x_ptr, out_ptr, n, minus_two_b, minus_two_bk, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    minus_two_u = x * (minus_two_b + minus_two_bk * x * x)
    out = x / (1.0 + tl.exp(minus_two_u))
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _gelu_bwd_kernel(g_ptr, x_ptr, dx_ptr, n, minus_two_b, minus_two_bk, two_b, six_bk, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    g = tl.load(g_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    x2 = x * x
    s = 1.0 / (1.0 + tl.exp(x * (minus_two_b + minus_two_bk * x2)))
    slope = two_b + six_bk * tl.minimum(x2, _SQUARE_CAP)
    dx = g * (s + x * (slope * s * (1.0 - s)))
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=inside)


def _grid(n: int):
    return (triton.cdiv(n, _BLOCK),)


@triton_op("gptfast_triton::gelu_fwd", mutates_args=())
def gelu_fwd(x: torch.Tensor) -> torch.Tensor:
    """Tanh GELU of ``x``, contiguous, in x's dtype."""
    require_floating("gelu_fwd", x=x)
    x = x.contiguous()
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    n = x.numel()
    if n > 0:
        launch(_gelu_fwd_kernel, _grid(n), x, out, n, *_COEFFICIENTS[:2], BLOCK=_BLOCK)
    return out


@triton_op("gptfast_triton::gelu_bwd", mutates_args=())
def gelu_bwd(grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``dx`` recomputed from x."""
    require_floating("gelu_bwd", x=x)
    require_row_grad("gelu_bwd", grad_out, x)
    x = x.contiguous()
    g = grad_out.to(x.dtype).contiguous()
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    n = x.numel()
    if n > 0:
        launch(_gelu_bwd_kernel, _grid(n), g, x, dx, n, *_COEFFICIENTS, BLOCK=_BLOCK)
    return dx


def unsupported_reason(x: torch.Tensor, *_) -> str | None:
    """``None`` if the kernels can run on this input, else why not."""
    if x.dtype not in DTYPES:
        return f"dtype {x.dtype} is not supported (float32/float16/bfloat16)"
    return None
