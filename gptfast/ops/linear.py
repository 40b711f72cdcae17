"""The small-batch linear layer (``gptfast.ops.decode_linear``) above the kernels, for every fused backend.

The kernel is one torch op per namespace (gptfast_cpu, gptfast_cuda, gptfast_triton; csrc/schemas.h)::

    decode_linear(x, weight, bias) -> out      # x (M, K), weight (N, K), bias (N,) or None

Here, once for all backends: the fake, the convention that the kernels see 2-D
contiguous rows (``x`` of any rank is flattened here and the result viewed back; a
contiguous weight is passed as is, never copied per call), and the gradient, which
uses ``F.linear``'s formulas in plain torch (``dx = g @ W``, ``dW = g^T x``,
``db = sum g``) so the op can sit in a graph that needs one; the kernels target the
forward of decode steps.

Also here, in plain torch:

* :func:`dense_linear`, the models' own linear layers and output heads: on an x86 CPU the
  float32 forward product of a large enough layer runs through oneDNN (faster there than
  torch's BLAS for ``x @ W.T``), the backward is ``F.linear``'s; the linear cross-entropy's
  chunk logits use the same oneDNN product (:func:`onednn_linear`);
* :func:`linear_in_float32`, the product of 16-bit rows on a CPU when there are too many
  rows for the decode kernel (a prompt's prefill).
"""

from __future__ import annotations

import functools
import platform

import torch
import torch.nn.functional as F

from ._dispatch import bound_kernel, is_tracing, kernels, register_fake, without_graph


def _fake_decode_linear(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


def save_linear_inputs(ctx, inputs, output):
    """``setup_context`` of a linear product ``x @ weight.T (+ bias)`` whose backward is :func:`linear_backward`."""
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def linear_backward(ctx, grad_out):
    """``F.linear``'s gradients of ``x``, ``weight`` and ``bias`` (2-D ``x``), in plain torch."""
    x, weight = ctx.saved_tensors
    dx = grad_out @ weight if ctx.needs_input_grad[0] else None
    dw = grad_out.t() @ x if ctx.needs_input_grad[1] else None
    db = grad_out.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return dx, dw, db


def register(namespace: str, *, fakes: bool = True) -> None:
    """Register the autograd formula (and, with ``fakes``, the fake impl) of ``namespace``'s decode_linear."""
    if fakes:
        register_fake(f"{namespace}::decode_linear", _fake_decode_linear)
    torch.library.register_autograd(f"{namespace}::decode_linear", linear_backward, setup_context=save_linear_inputs)


def fused_decode_linear(ops, x, weight, bias=None):
    """``x @ weight.T + bias`` on ``ops``' kernels (a namespace name such as ``"gptfast_cpu"``).

    Same contract as ``gptfast.ops.decode_linear`` (inputs already validated).
    """
    rows = x.reshape(x.shape[:-1].numel(), x.shape[-1])
    with without_graph():
        out = kernels(ops).decode_linear(rows, weight.contiguous(), None if bias is None else bias.contiguous())
    return out.view(*x.shape[:-1], weight.shape[0])


def decode_linear_rows(entry_point, *, guarded=False):
    """``fn(rows, weight, bias)`` running the kernel behind a resolved ``decode_linear`` entry point, or ``None``.

    For a caller that keeps its inputs in the kernel's layout (a decode plan): ``rows``
    ``(M, K)`` and ``weight`` contiguous, ``bias`` contiguous or ``None``, one dtype, already
    validated; the result is ``(M, N)``.  ``None`` when ``entry_point`` is not a fused backend's.
    ``guarded``: the caller holds :func:`~gptfast.ops._dispatch.without_graph` (see ``bound_kernel``).
    """
    return bound_kernel(entry_point, fused_decode_linear, "decode_linear", guarded=guarded)


# The float32 copy of the weight exists one block of output rows at a time; 4 MiB blocks measured as fast as
# whole-matrix copies on Qwen3-0.6B's matrices at 17-128 rows (2 cores) and keep the extra memory small.
FLOAT32_WEIGHT_BLOCK_BYTES = 4 << 20


# torch.cpu's probes of the instructions a 16-bit matmul runs fast on (private, hence looked up by name:
# a torch without one counts as lacking the instructions).
_NATIVE_16_BIT_PROBES = {torch.bfloat16: ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
                         torch.float16: ("_is_amx_fp16_supported",)}


@functools.lru_cache(maxsize=None)
def widens_16_bit(dtype) -> bool:
    """True when many-row products of ``dtype`` are faster through :func:`linear_in_float32` on this CPU.

    That is a bf16/fp16 ``dtype`` on a CPU without instructions for it (AVX512-BF16 or
    AMX for bf16, AMX-FP16 for fp16): there torch's own 16-bit matmul is the slow one.
    """
    probes = _NATIVE_16_BIT_PROBES.get(dtype)
    if probes is None:
        return False
    return not any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def linear_in_float32(x, weight, bias=None):
    """``F.linear(x, weight, bias)`` for 16-bit CPU tensors, computed in float32 and rounded once to ``x``'s dtype.

    On CPUs without 16-bit matrix instructions torch's bf16/fp16 matmul runs at a fraction
    of float32's speed (Qwen3-0.6B's matrices at 128 rows: 4-5x slower, 2 cores).  Here the
    weight is widened to float32 a block of output rows at a time (:data:`FLOAT32_WEIGHT_BLOCK_BYTES`),
    multiplied with float32 accumulation and the result rounded, which is what a 16-bit
    matmul with float32 accumulation returns.  Works with autograd (plain torch ops).
    """
    wide_x = x.float()
    block = max(1, FLOAT32_WEIGHT_BLOCK_BYTES // (4 * max(1, weight.shape[1])))
    out = x.new_empty((*x.shape[:-1], weight.shape[0]))
    for start in range(0, weight.shape[0], block):
        stop = min(start + block, weight.shape[0])
        block_bias = None if bias is None else bias[start:stop].float()
        out[..., start:stop] = torch.nn.functional.linear(wide_x, weight[start:stop].float(), block_bias)
    return out


# ----------------------------------------------------------------------------- dense products

# A weight with at least this many output rows (a vocabulary) goes through oneDNN at any row count.
ONEDNN_MIN_VOCAB = 8192
# Other layers: at least this many weight elements and multiply-adds.  oneDNN's call costs ~50-80 us
# more than torch's BLAS (2-core AMD, AVX2), which small products do not win back: 256x256 layers lost
# at every row count up to 2048, 768x768 ones tied at 128-512 rows and won by 1.15x at 2048, 768x3072
# ones won by 1.1-1.6x from 8 rows on.
ONEDNN_MIN_WEIGHT = 1 << 18
ONEDNN_MIN_MACS = 1 << 26


@functools.lru_cache(maxsize=None)
def onednn_linear():
    """torch's oneDNN linear ``(x, weight, bias) -> x @ weight.T + bias`` for CPU float32, or None.

    On a 2-core AMD (AVX2) torch's BLAS ran ``x @ W.T`` at 75-105 GFLOP/s on a model's
    shapes (512-1024 rows by 512x1536, 768x3072, 32000x512, 50257x768 weights) against
    oneDNN's 90-130; the backward's products (``g @ W``, ``g.T @ x``) were as fast or faster
    through torch's BLAS, so only forwards use this.  x86-64 only: on arm64 torch's BLAS is
    Apple's Accelerate (or OpenBLAS), against which this was never measured.  oneDNN's op is
    not public API: it is used only once a small product through it has matched ``torch.mm``
    here, and the plain matmul stays the fallback.
    """
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise.default
        x = torch.arange(12, dtype=torch.float32).view(3, 4) / 7  # no random numbers: the user's seed stays
        w = torch.arange(20, dtype=torch.float32).view(5, 4).flip(0) / 11
        b = torch.arange(5, dtype=torch.float32)
        if not torch.allclose(op(x, w, b, "none", [], ""), torch.addmm(b, x, w.t()), rtol=1e-5, atol=1e-5):
            return None
    except (AttributeError, RuntimeError):
        return None
    return lambda x, weight, bias: op(x, weight, bias, "none", [], "")


def onednn_pays(rows: int, weight: torch.Tensor) -> bool:
    """True when ``rows`` rows times ``weight`` ``(N, K)`` is a product oneDNN computes faster than torch's BLAS
    (see :data:`ONEDNN_MIN_VOCAB`, :data:`ONEDNN_MIN_WEIGHT`, :data:`ONEDNN_MIN_MACS`)."""
    if weight.shape[0] >= ONEDNN_MIN_VOCAB:
        return True
    return weight.numel() >= ONEDNN_MIN_WEIGHT and rows * weight.numel() >= ONEDNN_MIN_MACS


def onednn_fits(x, weight, bias) -> bool:
    """True when :func:`onednn_linear` computes ``x @ weight.T (+ bias)`` here and that pays: eager (not traced,
    not under autocast) CPU float32, every tensor contiguous, a product large enough, the op available."""
    # Traced first: a tracer's symbolic sizes are not compared below (each comparison would be a guard).
    if x.device.type != "cpu" or is_tracing(x):
        return False
    # Shapes that do not multiply are left to F.linear, which names them in its usual error.
    if (x.dim() < 1 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]
            or (bias is not None and tuple(bias.shape) != (weight.shape[0],))):
        return False
    # The size rule first: it turns away a decode step's small products at the least cost.
    if x.numel() == 0 or not onednn_pays(x.numel() // x.shape[-1], weight):
        return False
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return (all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors)
            and not any(is_tracing(t) for t in tensors[1:]) and not torch.is_autocast_enabled("cpu")
            and onednn_linear() is not None)


class _OneDNNForward(torch.autograd.Function):
    """``rows @ weight.T (+ bias)`` with oneDNN's forward and ``F.linear``'s backward products in plain torch
    (differentiable again, so a second derivative works as through ``F.linear``)."""

    @staticmethod
    def forward(rows, weight, bias):
        return onednn_linear()(rows, weight, bias)

    setup_context = staticmethod(save_linear_inputs)
    backward = staticmethod(linear_backward)


def dense_linear(x, weight, bias=None):
    """``F.linear(x, weight, bias)`` for a model's own layers and output heads, ``x`` ``(..., K)``.

    On an x86-64 CPU, float32, the forward product of a large enough layer (:func:`onednn_pays`)
    runs through oneDNN (:func:`onednn_linear`; 1.1-1.5x torch's BLAS on a 2-core AMD
    CPU) and the backward is ``F.linear``'s two products.  Elsewhere (other dtypes and devices,
    small layers, non-contiguous tensors, autocast, ``torch.compile`` and ``torch.func``) it is
    ``F.linear`` itself.  Results agree with ``F.linear`` within float32 rounding (another
    summation order), not bitwise.
    """
    if not onednn_fits(x, weight, bias):
        return F.linear(x, weight, bias)
    rows = x.view(-1, x.shape[-1])
    return _OneDNNForward.apply(rows, weight, bias).view(*x.shape[:-1], weight.shape[0])
