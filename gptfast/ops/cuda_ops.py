"""Backend ``"cuda"``: hand-written CUDA C++ kernels from ``csrc/cuda`` (extension ``gptfast._C_cuda``).

The kernels are registered as torch ops in the ``gptfast_cuda`` namespace for the
CUDA dispatch key; this module adds their fake (meta) implementations and autograd
formulas so that they work under ``torch.compile``, and wraps them in the backend
contract of ``gptfast.ops._dispatch``.

Cross-entropy (``gptfast_cuda::cross_entropy_fwd``)
    One pass computes each row's loss (fp32) and, when a gradient will be needed,
    the unscaled gradient ``softmax(x) - onehot(target)`` in the logits' dtype.  The
    reduction (mean/sum/none) is done here with torch ops, so its gradient arrives
    in the backward as one factor per row, and the backward scales the saved
    gradient rows in place (no second read of the logits, no extra (N, V) buffer).
    An out-of-range target (neither in ``[0, V)`` nor ``ignore_index``) is never
    read: its row's loss and gradient are NaN, so a mean/sum loss becomes NaN.
    The check costs no host synchronisation; call :func:`check_targets` (which
    does synchronise) to turn such NaNs into a ``ValueError`` naming the target.

Sampling (``gptfast_cuda::sample_next_token``)
    Random numbers come from Philox4x32-10 keyed by torch's CUDA generator: the
    C++ binding reserves an offset range with ``philox_cuda_state`` exactly as
    torch's own random kernels do, so results follow ``torch.manual_seed`` /
    the ``generator`` argument, there is no host synchronisation, and CUDA-graph
    capture works (the captured graph reads seed and offset from device memory
    and each replay advances the offset).  The draw is an exponential race
    (equivalent to Gumbel-max), so it equals torch's multinomial in distribution,
    not token for token.
"""

from __future__ import annotations

import torch

from ._autograd import register_saved_grad_autograd

DEVICES = ("cuda",)

# The float types the kernels read; float64 goes to another backend.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_NOT_BUILT = ("gptfast was built without CUDA (torch has no CUDA or nvcc was not found at install time); "
              "reinstall with CUDA torch and nvcc, or GPTFAST_BUILD_CUDA=1 to force the build")

try:
    from gptfast import _C_cuda  # noqa: F401  (loading it registers the gptfast_cuda ops)
    _IMPORT_ERROR: str | None = None
except ImportError as exc:
    from .. import _build_info

    _C_cuda = None
    _why = _build_info.why_not_built("cuda")  # recorded by setup.py, e.g. the compiler's error
    _IMPORT_ERROR = f"gptfast._C_cuda is unavailable: {_why} [{exc}]" if _why else f"{_NOT_BUILT} [{exc}]"


def unavailable_reason() -> str | None:
    """``None`` when the CUDA kernels are built and a CUDA device exists, else why not."""
    if _C_cuda is None:
        return _IMPORT_ERROR
    if not torch.cuda.is_available():
        return "no CUDA device is available (torch.cuda.is_available() is False)"
    return None


def _ops():
    return torch.ops.gptfast_cuda


# --------------------------------------------------------------------------- cross-entropy


def _fake_cross_entropy_fwd(logits, targets, ignore_index, want_grad):
    loss_rows = logits.new_empty((logits.shape[0],), dtype=torch.float32)
    grad = logits.new_empty(logits.shape) if want_grad else logits.new_empty((0,))  # contiguous, as the kernel
    return loss_rows, grad


def cross_entropy(logits, targets, *, ignore_index=-100, reduction="mean"):
    """Softmax cross-entropy in one fused CUDA pass (forward and gradient), same semantics as the oracle."""
    flat = logits.reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1)
    want_grad = torch.is_grad_enabled() and logits.requires_grad
    loss_rows, _ = _ops().cross_entropy_fwd(flat, flat_targets, int(ignore_index), bool(want_grad))
    if reduction == "none":
        return loss_rows.to(logits.dtype).view(targets.shape)
    total = loss_rows.sum()
    if reduction == "mean":
        # 0 kept targets: NaN as in PyTorch, with zero gradients as there (not 0 * inf).
        kept = (flat_targets != ignore_index).sum()
        total = torch.where(kept > 0, total / kept.clamp(min=1), torch.full_like(total, float("nan")))
    return total.to(logits.dtype)


def check_targets(logits, targets, *, ignore_index=-100) -> None:
    """Raise ``ValueError`` if any target is outside ``[0, V)`` and not ``ignore_index``.

    Synchronises with the device (reads one flag); meant for debugging a NaN loss.
    """
    bad = ((targets < 0) | (targets >= logits.shape[-1])) & (targets != ignore_index)
    if bool(bad.any()):
        value = int(targets[bad][0])
        raise ValueError(f"targets contains {value}, outside [0, {logits.shape[-1]}) "
                         f"and not ignore_index={ignore_index}")


# --------------------------------------------------------------------------- sampling


def _fake_sample_next_token(logits, temperature, temperature_value, top_k, top_k_value, generator):
    return logits.new_empty((logits.shape[0], 1), dtype=torch.int64)


def register_python_parts(namespace: str = "gptfast_cuda") -> None:
    """Register the fake impls and the cross-entropy autograd for the ops of ``namespace``.

    Done once at import for ``gptfast_cuda``; tests call it for a namespace whose
    ops emulate the kernels on the CPU, to check this module's wiring without a GPU.
    """
    torch.library.register_fake(f"{namespace}::cross_entropy_fwd")(_fake_cross_entropy_fwd)
    register_saved_grad_autograd(f"{namespace}::cross_entropy_fwd")
    torch.library.register_fake(f"{namespace}::sample_next_token")(_fake_sample_next_token)


if _C_cuda is not None and hasattr(torch.ops.gptfast_cuda, "cross_entropy_fwd"):
    register_python_parts()


def sample_next_token(logits, *, temperature=0.0, top_k=None, generator=None):
    """Top-k / temperature sampling of one token per row in a single CUDA kernel; ``(B, 1)`` int64."""
    vocab = logits.shape[-1]
    if isinstance(temperature, torch.Tensor):
        temperature_tensor, temperature_value = temperature, 0.0
    else:
        temperature_tensor, temperature_value = None, float(temperature)
    if isinstance(top_k, torch.Tensor):
        top_k_tensor, top_k_value = top_k, vocab
    else:
        top_k_tensor, top_k_value = None, vocab if top_k is None else int(top_k)
    return _ops().sample_next_token(logits, temperature_tensor, temperature_value, top_k_tensor, top_k_value,
                                    generator)


# --------------------------------------------------------------------------- dispatch contract

try:  # the attention kernels live in their own module (csrc/cuda attention files)
    from .cuda_attention import attention_unsupported_reason, causal_attention  # noqa: F401
    _HAS_ATTENTION = True
except ImportError:
    _HAS_ATTENTION = False

# Ops that "auto" may pick this backend for: only ops measured faster than the torch path.
# None of the CUDA kernels has run on a GPU yet (written and checked on a CPU-only machine,
# see tests/cuda_emulation and tests/cuda_emulator), so each joins once the GPU parity tests
# pass and benchmarks/ shows it faster; until then they run only when asked for by name.
AUTO_OPS: frozenset[str] = frozenset()


def supports(op, *args, **kwargs) -> str | None:
    """``None`` when this backend can run ``op`` on these inputs, else the reason."""
    if op == "causal_attention":
        if not _HAS_ATTENTION:
            return "the CUDA attention kernels are not part of this build"
        return attention_unsupported_reason(*args, **kwargs)
    kernel = {"cross_entropy": "cross-entropy", "sample_next_token": "sampling"}.get(op)
    if kernel is None:
        return f"the CUDA backend does not implement {op}"
    logits = args[0]
    if logits.dtype not in KERNEL_DTYPES:
        return f"the CUDA {kernel} kernel reads float32/float16/bfloat16 logits, not {logits.dtype}"
    if logits.shape[-1] >= 2**31:
        return f"the CUDA {kernel} kernel needs a vocabulary below 2**31"
    return None
