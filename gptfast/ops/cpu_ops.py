"""Backend ``"cpu"``: loads gptfast's C++ CPU kernels (csrc/cpu, extension ``gptfast._C_cpu``, or its
AVX-512 build ``gptfast._C_cpu_avx512`` on a CPU that torch reports as AVX512, where it was built).

Everything above the kernels (fakes, autograd, reductions, argument conventions) is in
the op modules (``attention``, ``loss``, ``sampling``, ``normalization``, ``activation``,
``regularization``, ``rotary``, ``linear``); this module loads the
extension, registers those for the ``gptfast_cpu`` namespace and binds the ops to it.
"""

from __future__ import annotations

import importlib.util
import platform
import sys

import torch

from .. import _build_info
from ._dispatch import fused_entry_points, register_direct_calls, register_kernels, stale_extension_reason

NAMESPACE = "gptfast_cpu"
DEVICES = ("cpu",)
# Ops measured faster than the torch path (2-core shared machine, fp32, same process):
# attention fwd+bwd B=2 H=12 T=256 D=64 ~3x, cross-entropy fwd+bwd N=512 V=50257 1.5-2.8x
# (and a third of the peak memory), sampling B=8 V=50257 top_k=25 >100x, linear
# cross-entropy fwd+bwd N=512 H=768 V=50257 1.08x and 1.74x in two loaded runs (both are three
# matmuls of the same size) at a sixth of the peak memory, and free rows where targets are ignored.
# RMSNorm (256x1024) fwd 4x / fwd+bwd ~5x in fp32, ~2x / ~2.5x in bf16; RoPE (16 heads x 256 x 128)
# fwd ~3.5x / fwd+bwd ~6x.  LayerNorm (960x768 and 512x768 fp32, one thread): fwd 7-10x / fwd+bwd
# 5-7x the book's formula (backend "torch"); the kernels alone match aten's (fwd 0.93-0.97x, bwd
# 1.04-1.18x), the op's Python dispatch and autograd put it at 0.6-0.85x F.layer_norm.
# GELU (960x3072 and 512x3072 fp32): fwd 8-16x / fwd+bwd 8-11x the book's formula, 1.1-3x
# F.gelu(approximate="tanh").  SwiGLU (4 x 256 x 1536): fp32 fwd ~1.5x / fwd+bwd 1.6-1.8x torch's
# silu-and-multiply, bf16 1.2x / 1.2x; in a Llama-shaped training step (8 such layers) 23-41 ms
# against 58-69 ms, the two allocations per layer it spares included.  Below ~10 K elements the op's
# dispatch costs more than it saves (1 x 3072 bf16: 14 against 8 us), which a decode plan avoids by
# binding the kernel.
# decode_linear, 8 rows (K=1024, N=3072 and the 151936-row head, fp32 and bf16): 2.5-4x; one row
# measured from 1.3x faster to slower on a busy machine, 1.15-2x on a quiet one; the decode routing
# (gptfast/generation/runner.py, which has the figures) sends it 1-16 rows.
# dropout (2 x 256 x 768 fp32, p 0.1, AVX-512 build): 0.27 ms against F.dropout's 3.5 ms (its Bernoulli draws).
AUTO_OPS = frozenset({"causal_attention", "cross_entropy", "linear_cross_entropy", "sample_next_token",
                      "rms_norm", "layer_norm", "gelu", "dropout", "rope", "decode_linear", "swiglu"})


LOADED = None  # the extension module the kernels came from, once loaded


def _import_kernels() -> str:
    """Import the kernels' extension (its import registers the ops) and return its name.

    Both builds register the same namespace, so exactly one of them may ever be imported: the
    AVX-512 one where torch reports the CPU as AVX512 (``ATEN_CPU_CAPABILITY`` lowers that)
    and it was built, else ``_C_cpu``.
    """
    # Where the AVX-512 build exists its import must succeed: a failed import may have registered the
    # namespace already, and importing _C_cpu after it would abort the process.  find_spec only looks.
    if (torch.backends.cpu.get_cpu_capability() == "AVX512"
            and importlib.util.find_spec("gptfast._C_cpu_avx512") is not None):
        from gptfast import _C_cpu_avx512  # noqa: F401
        return "gptfast._C_cpu_avx512"
    from gptfast import _C_cpu  # noqa: F401
    return "gptfast._C_cpu"


def _load() -> str | None:
    """Import the extension (registering the ops); the reason it cannot be used, if any."""
    global LOADED
    if (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() == "DEFAULT"
            and _build_info.cpu_needs_avx2()):  # checked before loading; a portable build runs anywhere
        return "gptfast._C_cpu is compiled for AVX2 and this CPU (or ATEN_CPU_CAPABILITY) does not provide it"
    try:
        LOADED = _import_kernels()
    except ImportError as exc:  # not built
        why = _build_info.why_not_built("cpu")  # recorded by setup.py, e.g. the compiler's error
        if why:
            return f"extension gptfast._C_cpu is unavailable: {why}"
        return f"extension {exc.name or 'gptfast._C_cpu'} not built: run pip install --no-build-isolation -e . ({exc})"
    stale = stale_extension_reason(NAMESPACE, own_ops=("cross_entropy_fwd_inplace",))
    if stale is not None:
        return stale
    register_kernels(NAMESPACE)
    register_direct_calls(NAMESPACE, sys.modules[LOADED])
    return None


_LOAD_ERROR = _load()


def unavailable_reason() -> str | None:
    """``None`` when the extension is built and this CPU can run it, else why not."""
    return _LOAD_ERROR


# One function per op, bound to this namespace (``causal_attention``, ``cross_entropy``, ...).
globals().update(fused_entry_points(NAMESPACE))


def bf16_native_rows() -> int:
    """Most rows (from 2) of a bf16 ``decode_linear`` the loaded kernels multiply without widening the weight:
    16 with AMX tile products (the AVX-512 build on Linux, on a CPU with AMX), 4 with AVX512-BF16 dot products
    (that build on a CPU with them); 0 elsewhere, also where the backend is unavailable."""
    if _LOAD_ERROR is not None or not LOADED:
        return 0
    return int(getattr(sys.modules.get(LOADED), "BF16_NATIVE_MAX_ROWS", 0))


def supports(op: str, *args, **kwargs) -> str | None:
    """``None`` when this call can run here, else why not (decode_linear: float32/bfloat16/float16 only)."""
    if op == "decode_linear" and args[0].dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"decode_linear runs float32, bfloat16 and float16, not {args[0].dtype}"
    return None
