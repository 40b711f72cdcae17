"""Argument checks of the raw Triton ops, the conditions of the C++ kernels' own checks.

A kernel reads its inputs through raw pointers with the sizes of one argument (a row's length, the
rows of ``x``): a shorter weight, bias or second operand would be read past its end, silently.  So
every op checks shapes, dtypes, devices and the seed on the host before it launches anything.  The
checks read metadata only (no tensor value, no device synchronisation) and compare sizes with
``==``, which symbolic sizes under ``torch.compile`` support.  Like ``TORCH_CHECK`` in the C++
kernels, a failed check raises ``RuntimeError`` naming the op and the argument.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def require(ok, op: str, message: str) -> None:
    """Raise ``RuntimeError("gptfast_triton <op>: <message>")`` unless ``ok``."""
    if not ok:
        raise RuntimeError(f"gptfast_triton {op}: {message}")


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def require_shape(op: str, name: str, t: torch.Tensor, shape: tuple) -> None:
    """``t`` has exactly ``shape``."""
    require(t.dim() == len(shape) and _shape(t) == tuple(shape), op,
            f"{name} must be {tuple(shape)}, got {_shape(t)}")


def require_same_shape(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """``t`` has ``ref``'s shape."""
    require(_shape(t) == _shape(ref), op, f"{name} {_shape(t)} must have {ref_name}'s shape {_shape(ref)}")


def require_device(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every tensor of ``others`` (``None`` skipped) is on ``ref``'s device."""
    for name, t in others.items():
        if t is not None:
            require(t.device == ref.device, op, f"{name} must be on {ref_name}'s device {ref.device}, got {t.device}")


def require_floating(op: str, **tensors: torch.Tensor) -> None:
    """Every tensor has a floating dtype."""
    for name, t in tensors.items():
        require(t.dtype in FLOAT_DTYPES, op, f"{name} must be floating point, got {t.dtype}")


def require_integer(op: str, name: str, t: torch.Tensor) -> None:
    """``t`` holds integers (not bool): a float index would be truncated by the kernel's load, silently."""
    require(not t.dtype.is_floating_point and not t.dtype.is_complex and t.dtype != torch.bool, op,
            f"{name} must be an integer tensor, got {t.dtype}")


def require_dtype(op: str, name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    """``t`` has ``dtype``."""
    require(t.dtype == dtype, op, f"{name} must be {dtype}, got {t.dtype}")


def require_seed(op: str, seed: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """``seed``: an int64 tensor with at least one element (the kernel reads the first) on ``ref``'s device."""
    require(seed.dtype == torch.int64 and seed.numel() >= 1, op,
            f"seed must be an int64 tensor with >= 1 element, got {seed.dtype} with {seed.numel()} elements")
    require_device(op, ref_name, ref, seed=seed)


def require_probability(op: str, name: str, p: float) -> None:
    """``0 <= p <= 1``."""
    require(0.0 <= p <= 1.0, op, f"{name} must be in [0, 1], got {p}")


def require_rows(op: str, x: torch.Tensor, *params: tuple[str, torch.Tensor]) -> None:
    """``x`` is ``(N, D)`` and floating; each named parameter is a floating ``(D,)`` on x's device."""
    require(x.dim() == 2, op, f"x must be (N, D), got {_shape(x)}")
    # Rows of no element have no statistics (a mean of nothing): refused, as the C++ kernels do.
    require(x.shape[1] > 0, op, f"x's rows must hold at least one element, got {_shape(x)}")
    require_floating(op, x=x)
    for name, p in params:
        require_device(op, "x", x, **{name: p})
        require_shape(op, name, p, (x.shape[1],))
        require_floating(op, **{name: p})


def require_stat(op: str, name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    """``t``: a forward's float32 per-row statistic ``(N,)`` for ``x`` ``(N, D)``, on x's device."""
    require_device(op, "x", x, **{name: t})
    require_shape(op, name, t, (x.shape[0],))
    require_dtype(op, name, t, torch.float32)


def require_row_grad(op: str, grad_out: torch.Tensor, x: torch.Tensor) -> None:
    """``grad_out`` has x's shape and device."""
    require_device(op, "x", x, grad_out=grad_out)
    require_same_shape(op, "grad_out", grad_out, "x", x)
