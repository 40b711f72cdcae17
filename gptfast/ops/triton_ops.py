"""Backend ``"triton"``: loads the Triton kernels of ``csrc/triton`` (package ``gptfast.triton_kernels``).

Runs on CUDA tensors.  With ``TRITON_INTERPRET=1`` set before triton is imported,
Triton's interpreter runs the same kernels on CPU tensors, which is how the test suite
checks them without a GPU; "auto" never picks this backend (the interpreter is far
slower than PyTorch, and no GPU has measured the kernels yet).  The interpreter gets
float16/bfloat16 ``tl.dot`` wrong, so there only float32 is accepted.

The kernel package registers the raw ops (``triton_op``, namespace ``gptfast_triton``);
their autograd and the layer above them live in the op modules, as for every backend.
The linear cross-entropy runs the shared chunked driver on the Triton cross-entropy kernel.
"""

from __future__ import annotations

import importlib
import os

import torch

from ._dispatch import fused_entry_points, is_tracing, register_kernels

NAMESPACE = "gptfast_triton"
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICES = ("cuda", "cpu") if INTERPRETER else ("cuda",)
AUTO_OPS: frozenset[str] = frozenset()  # benchmarks/gpu/first_contact.py measures what joins
_kernels: dict[str, object] = {}


def _load() -> str | None:
    """Import triton and the kernel modules (registering the ops); the failure, if any."""
    if not INTERPRETER and not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU)"
    try:
        for name in ("attention", "cross_entropy", "sampling", "rms_norm", "layer_norm", "swiglu", "gelu", "dropout",
                     "rope", "decode_linear"):
            _kernels[name] = importlib.import_module(f"gptfast.triton_kernels.{name}")
    except (ImportError, RuntimeError, OSError) as exc:  # missing triton, or one that cannot load its backend
        return f"triton is not importable: {exc}"
    register_kernels(NAMESPACE, fakes_in_bodies=True)
    return None


_LOAD_ERROR = _load()


def unavailable_reason() -> str | None:
    """``None`` if the Triton kernels can run here, else why not."""
    return _LOAD_ERROR


def supports(op: str, *args, **kwargs) -> str | None:
    """``None`` if the kernels can serve this call, else the reason (dtype, head dim ...)."""
    x = args[0]
    if INTERPRETER and x.device.type == "cpu" and is_tracing(x):
        # Traced (torch.compile, make_fx), the interpreter's kernels read tensors without real data: garbage.
        return "Triton's interpreter (TRITON_INTERPRET=1) cannot run under torch.compile or other tracing"
    if INTERPRETER and x.dtype in (torch.float16, torch.bfloat16):
        return (f"Triton's interpreter (TRITON_INTERPRET=1) computes {x.dtype} tl.dot wrongly; "
                "use float32, or a GPU without the interpreter")
    if op == "causal_attention":
        dropout = bool(kwargs.get("training")) and kwargs.get("dropout_p", 0.0) > 0.0
        return _kernels["attention"].unsupported_reason(args[0], args[1], dropout)
    if op in ("rms_norm", "layer_norm", "swiglu", "gelu", "dropout", "rope", "decode_linear"):
        return _kernels[op].unsupported_reason(*args[:3])
    if op == "linear_cross_entropy" and kwargs.get("bias") is not None and kwargs["bias"].dtype != x.dtype:
        return f"bias dtype {kwargs['bias'].dtype} differs from hidden's {x.dtype}"
    return _kernels["sampling" if op == "sample_next_token" else "cross_entropy"].unsupported_reason(x)


# One function per op, bound to this namespace (``causal_attention``, ``cross_entropy``, ...).
globals().update(fused_entry_points(NAMESPACE))
