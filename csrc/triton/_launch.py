"""Launch helpers shared by the gptfast Triton kernels.

Each kernel is launched through ``wrap_triton`` inside a ``torch.library.triton_op``
so ``torch.compile`` can trace into it.  This package registers the raw ops only (the
schemas of csrc/schemas.h) and imports nothing from ``gptfast``: autograd, reductions and
argument conventions live in ``gptfast.ops``.  Triton's interpreter (``TRITON_INTERPRET=1``)
would try to run a kernel on FakeTensors while an op's shape-only ("fake") version
is traced, so there the launch is skipped: only output shapes matter then.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Seeds are drawn below 2**31 so they fit the low word of Philox's key; kernels put a
# program's row or head index into the high word to get independent streams.
_SEED_BOUND = 2**31 - 1


def launch(kernel, grid, *args, **kwargs) -> None:
    """Run ``kernel[grid](*args, **kwargs)`` traceably; a no-op on FakeTensors under the interpreter."""
    if INTERPRETER and any(isinstance(a, torch.Tensor) and is_fake(a) for a in args):
        return
    wrap_triton(kernel)[grid](*args, **kwargs)


def draw_seed(device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """A one-element int64 seed tensor on ``device`` drawn from torch's generator (no host sync)."""
    return torch.randint(0, _SEED_BOUND, (1,), device=device, dtype=torch.int64, generator=generator)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact fp32 ("ieee") for fp32 so results match the oracle, else native."""
    return "ieee" if dtype == torch.float32 else "tf32"


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= ``n`` (at least 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())


# -- row kernels (the norms): one row of at most MAX_ROW elements in registers per program ---------------

ROW_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_ROW = 65536


def row_warps(block: int) -> dict:
    """Launch options of a program that holds one ``block``-wide row (none under the interpreter)."""
    return {} if INTERPRETER else dict(num_warps=min(16, max(1, block // 256)))


def row_slices(n: int, max_programs: int = 128) -> tuple[int, int]:
    """``(programs, rows_per_program)``: ``n`` rows cut into fixed slices, a function of ``n`` alone.

    A backward that sums per-program partials in program order is then the same on every run.
    """
    programs = max(1, min(n, max_programs))
    return programs, ((n + programs - 1) // programs if n > 0 else 0)


def row_unsupported_reason(x: torch.Tensor, *params: torch.Tensor) -> str | None:
    """``None`` when a row kernel takes ``x`` (rows of its last dim) and ``params``, else why not."""
    dtypes = [t.dtype for t in (x, *params)]
    if any(dtype not in ROW_DTYPES for dtype in dtypes):
        return f"dtypes {'/'.join(map(str, dtypes))} are not supported (float32/float16/bfloat16)"
    if x.shape[-1] > MAX_ROW:
        return f"rows longer than {MAX_ROW} elements are not supported, got {x.shape[-1]}"
    return None


@triton.jit
def load_row_f32(ptr, row, D, cols, inside):
    """Row ``row`` of a contiguous ``(N, D)`` tensor in float32 (masked lanes 0)."""
    return tl.load(ptr + row * D + cols, mask=inside, other=0.0).to(tl.float32)
