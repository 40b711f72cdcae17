"""SwiGLU ``silu(gate) * up`` forward and backward in Triton (schemas ``swiglu_fwd`` / ``swiglu_bwd``).

Elementwise over the contiguous data, ``BLOCK`` elements per program, float32 math and one
rounding to the inputs' dtype.  With ``s = sigmoid(a)``: ``d gate = grad * up * s * (1 + a (1 - s))``,
``d up = grad * a * s``.  ``gptfast.ops.activation`` registers the autograd.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ._checks import require, require_device, require_floating, require_same_shape
from ._launch import INTERPRETER, launch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BLOCK = 65536 if INTERPRETER else 1024  # the interpreter's cost is per operation: few, large blocks


@triton.jit
def _swiglu_fwd_kernel(a_ptr, b_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    a = tl.load(a_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    out = a / (1.0 + tl.exp(-a)) * b
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _swiglu_bwd_kernel(g_ptr, a_ptr, b_ptr, da_ptr, db_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    g = tl.load(g_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-a))
    tl.store(da_ptr + offs, (g * b * s * (1.0 + a * (1.0 - s))).to(da_ptr.dtype.element_ty), mask=inside)
    tl.store(db_ptr + offs, (g * a * s).to(db_ptr.dtype.element_ty), mask=inside)


def _check_pair(op: str, gate: torch.Tensor, up: torch.Tensor) -> None:
    """The kernels read ``gate.numel()`` elements of both: one shape, one floating dtype, one device."""
    require_device(op, "gate", gate, up=up)
    require(tuple(gate.shape) == tuple(up.shape), op,
            f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have one shape")
    require_floating(op, gate=gate)
    require(up.dtype == gate.dtype, op, f"up ({up.dtype}) must have gate's dtype {gate.dtype}")


def _grid(n: int):
    return (triton.cdiv(n, _BLOCK),)


@triton_op("gptfast_triton::swiglu_fwd", mutates_args=())
def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, contiguous, in gate's dtype."""
    _check_pair("swiglu_fwd", gate, up)
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty(gate.shape, device=gate.device, dtype=gate.dtype)
    n = gate.numel()
    if n > 0:
        launch(_swiglu_fwd_kernel, _grid(n), gate, up, out, n, BLOCK=_BLOCK)
    return out


@triton_op("gptfast_triton::swiglu_bwd", mutates_args=())
def swiglu_bwd(grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d_gate, d_up)`` recomputed from gate and up."""
    _check_pair("swiglu_bwd", gate, up)
    require_device("swiglu_bwd", "gate", gate, grad_out=grad_out)
    require_same_shape("swiglu_bwd", "grad_out", grad_out, "gate", gate)
    gate, up = gate.contiguous(), up.contiguous()
    g = grad_out.to(gate.dtype).contiguous()
    d_gate = torch.empty(gate.shape, device=gate.device, dtype=gate.dtype)
    d_up = torch.empty(gate.shape, device=gate.device, dtype=gate.dtype)
    n = gate.numel()
    if n > 0:
        launch(_swiglu_bwd_kernel, _grid(n), g, gate, up, d_gate, d_up, n, BLOCK=_BLOCK)
    return d_gate, d_up


def unsupported_reason(gate: torch.Tensor, *_) -> str | None:
    """``None`` if the kernels can run on these inputs, else why not."""
    if gate.dtype not in DTYPES:
        return f"dtype {gate.dtype} is not supported (float32/float16/bfloat16)"
    return None
