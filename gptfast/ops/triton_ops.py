"""Backend ``"triton"``: the Triton kernels of ``csrc/triton`` (package ``gptfast.triton_kernels``).

Runs on CUDA tensors.  With ``TRITON_INTERPRET=1`` set before triton is imported,
Triton's interpreter runs the same kernels on CPU tensors, which is how the test
suite checks them on machines without a GPU; ``"auto"`` never picks this backend
there (the interpreter is far slower than PyTorch).

Every op is a ``torch.library.triton_op`` (namespace ``gptfast_triton``) with its
autograd registered, so ``torch.compile`` traces into the kernels on a GPU.
"""

from __future__ import annotations

import importlib
import os

import torch

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICES = ("cuda", "cpu") if INTERPRETER else ("cuda",)
# Ops that "auto" may pick: only those measured faster than the torch path.  The kernels
# have so far run only under the interpreter (no GPU has been available to this project's
# checks), so none is auto-selected yet; benchmarks/gpu/run_all.sh measures them, and the
# ops it shows faster (and parity-tested on the GPU) go here.  Name backend="triton" to use them.
AUTO_OPS: frozenset[str] = frozenset()

_KERNEL_MODULES = ("attention", "cross_entropy", "linear_cross_entropy", "sampling")
_kernels: dict[str, object] = {}
_import_error: str | None = None


def _load_kernels() -> str | None:
    """Import triton and the kernel modules once; return the failure, if any."""
    global _import_error
    if _kernels or _import_error is not None:
        return _import_error
    try:
        for name in _KERNEL_MODULES:
            _kernels[name] = importlib.import_module(f"gptfast.triton_kernels.{name}")
    except (ImportError, RuntimeError, OSError) as exc:  # missing triton, or one that cannot load its backend
        _kernels.clear()
        _import_error = f"triton is not importable: {exc}"
    return _import_error


def unavailable_reason() -> str | None:
    """``None`` if the Triton kernels can run here, else why not."""
    if not INTERPRETER and not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU)"
    return _load_kernels()


def _kernel(name: str):
    reason = _load_kernels()
    if reason is not None:
        raise RuntimeError(reason)
    return _kernels[name]


def supports(op: str, *args, **kwargs) -> str | None:
    """``None`` if the kernels can serve this call, else the reason (dtype, head dim ...)."""
    if op == "causal_attention":
        return _kernel("attention").unsupported_reason(args[0], args[1])
    if op == "cross_entropy":
        return _kernel("cross_entropy").unsupported_reason(args[0])
    if op == "linear_cross_entropy":
        return _kernel("linear_cross_entropy").unsupported_reason(args[0], args[1], kwargs.get("bias"))
    if op == "sample_next_token":
        return _kernel("sampling").unsupported_reason(args[0])
    return f"unknown op {op!r}"


def causal_attention(q, k, v, *, dropout_p=0.0, training=False, scale=None):
    """Causal flash attention (forward and backward kernels, in-kernel dropout)."""
    return _kernel("attention").causal_attention(q, k, v, dropout_p=dropout_p, training=training, scale=scale)


def cross_entropy(logits, targets, *, ignore_index=-100, reduction="mean"):
    """Cross-entropy with the gradient written during the forward pass."""
    return _kernel("cross_entropy").cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)


def linear_cross_entropy(hidden, weight, targets, *, bias=None, ignore_index=-100, reduction="mean"):
    """Output-head cross-entropy in token chunks, never holding the full logits."""
    return _kernel("linear_cross_entropy").linear_cross_entropy(
        hidden, weight, targets, bias=bias, ignore_index=ignore_index, reduction=reduction)


def sample_next_token(logits, *, temperature=0.0, top_k=None, generator=None):
    """Sort-free top-k / temperature sampling, no host synchronisation."""
    return _kernel("sampling").sample_next_token(logits, temperature=temperature, top_k=top_k, generator=generator)
