"""Backend ``"cuda"``: loads the hand-written CUDA kernels (csrc/cuda, extension ``gptfast._C_cuda``).

Everything above the kernels is in the op modules ``attention`` (head-dim padding, the
decode kernel, dropout seed), ``loss`` (cross-entropy reductions, autograd, the chunked linear
cross-entropy) and ``sampling``; this module loads the extension, registers those for
the ``gptfast_cuda`` namespace and binds the ops to it.

Random numbers: dropout seeds come from torch's CUDA generator (``torch.randint`` on the
device); sampling reserves a Philox offset range from the caller's generator in C++, as
torch's own random kernels do, so there is no host synchronisation and CUDA-graph capture
works.  A target outside ``[0, V)`` is never read: its row's loss and gradient are NaN.
"""

from __future__ import annotations


import torch

from .. import _build_info
from . import attention as _attention
from ._dispatch import fused_entry_points, register_kernels, stale_extension_reason

NAMESPACE = "gptfast_cuda"
DEVICES = ("cuda",)
# Ops that "auto" may pick: only ops measured faster than the torch path.  None of the CUDA
# kernels has run on a GPU in this project's checks yet, so each joins once the GPU parity tests
# pass and benchmarks/ shows it faster; until then they run only when asked for by name.
AUTO_OPS: frozenset[str] = frozenset()
# The float types the loss and sampling kernels read; float64 goes to another backend.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NOT_BUILT = ("gptfast was built without CUDA (torch has no CUDA or nvcc was not found at install time); "
              "reinstall with CUDA torch and nvcc, or GPTFAST_BUILD_CUDA=1 to force the build")


def _load() -> str | None:
    """Import the extension (registering the ops); the reason it cannot be built or loaded, if any."""
    try:
        from gptfast import _C_cuda  # noqa: F401
    except ImportError as exc:
        why = _build_info.why_not_built("cuda")  # recorded by setup.py, e.g. the compiler's error
        return f"gptfast._C_cuda is unavailable: {why} [{exc}]" if why else f"{_NOT_BUILT} [{exc}]"
    stale = stale_extension_reason(NAMESPACE)
    if stale is not None:
        return stale
    register_kernels(NAMESPACE)
    return None


_LOAD_ERROR = _load()


def unavailable_reason() -> str | None:
    """``None`` when the CUDA kernels are built and a CUDA device exists, else why not."""
    if _LOAD_ERROR is None and not torch.cuda.is_available():
        return "no CUDA device is available (torch.cuda.is_available() is False)"
    return _LOAD_ERROR


def supports(op, *args, **kwargs) -> str | None:
    """``None`` when the kernels can run ``op`` on these inputs, else the reason."""
    if op == "causal_attention":
        return _attention.cuda_unsupported_reason(*args, **kwargs)
    x = args[0]
    if x.dtype not in KERNEL_DTYPES:
        return f"the CUDA kernels read float32/float16/bfloat16, not {x.dtype}"
    if op in ("rms_norm", "layer_norm", "rope"):
        bad = [t.dtype for t in args[1:3] if t.dtype not in KERNEL_DTYPES]
        return f"the CUDA kernels read float32/float16/bfloat16, not {bad[0]}" if bad else None
    if op in ("swiglu", "gelu", "dropout", "decode_linear"):  # every tensor shares x's dtype (checked in gptfast.ops)
        return None
    vocab = args[1].shape[0] if op == "linear_cross_entropy" else x.shape[-1]
    if vocab >= 2**31:
        return "the CUDA cross-entropy and sampling kernels need a vocabulary below 2**31"
    return None


# One function per op, bound to this namespace (``causal_attention``, ``cross_entropy``, ...).
globals().update(fused_entry_points(NAMESPACE, causal_attention=_attention.cuda_causal_attention))
