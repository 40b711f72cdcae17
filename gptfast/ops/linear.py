"""The small-batch linear layer (``gptfast.ops.decode_linear``) above the kernels, for every fused backend.

The kernel is one torch op per namespace (gptfast_cpu, gptfast_cuda, gptfast_triton; csrc/schemas.h)::

    decode_linear(x, weight, bias) -> out      # x (M, K), weight (N, K), bias (N,) or None

Here, once for all backends: the fake, the convention that the kernels see 2-D
contiguous rows (``x`` of any rank is flattened here and the result viewed back; a
contiguous weight is passed as is, never copied per call), and the gradient, which
uses ``F.linear``'s formulas in plain torch (``dx = g @ W``, ``dW = g^T x``,
``db = sum g``) so the op can sit in a graph that needs one; the kernels target the
forward of decode steps.

Also here, in plain torch: :func:`linear_in_float32`, the product of 16-bit rows on a
CPU when there are too many rows for the decode kernel (a prompt's prefill).
"""

from __future__ import annotations

import functools

import torch

from ._dispatch import bound_kernel, kernels, without_graph


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
        torch.library.register_fake(f"{namespace}::decode_linear")(_fake_decode_linear)
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
