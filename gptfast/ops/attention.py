"""Causal attention above the kernels, for every fused backend (cpu, cuda, triton).

The kernels are torch ops with one schema in each namespace (csrc/schemas.h)::

    attention_fwd(q, k, v, scale, dropout_p, seed) -> (out, lse)
    attention_bwd(grad_out, q, k, v, out, lse, scale, dropout_p, seed) -> (dq, dk, dv)

k and v may have fewer heads than q (``H_kv`` dividing ``H``, grouped-query attention):
every kernel reads the shared heads in place and returns dk/dv in k/v's shape.

This module holds what sits above them: the fake implementations (for the C++ ops;
a Triton op's fake is its own Python body), the autograd formula, the scale default,
the dropout seed, and the CUDA-only routing (zero-padded head dims, the decode kernel).

Dropout: one int64 seed per call, drawn from torch's generator on q's device (so
``torch.manual_seed`` reproduces it and a GPU needs no host synchronisation).  Every
kernel derives its mask from that seed and the element's (batch, head, query, key),
so the backward regenerates the forward's mask from the saved seed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._autograd import first_order_only
from ._dispatch import kernels, register_fake, without_graph

# Seeds stay below 2**31 so kernels keyed by Philox can put (batch, head) in the high word.
SEED_BOUND = 2**31 - 1

# The CUDA kernels: float16/bfloat16 with head dim 64 or 128 (smaller ones zero-padded up);
# batch and heads are grid dimensions.
CUDA_DTYPES = (torch.float16, torch.bfloat16)
CUDA_HEAD_DIMS = (64, 128)
CUDA_MAX_GRID_DIM = 65535


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The log-sum-exp dtype the kernels return: float64 for float64 inputs (cpu), else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- registration


def _fake_attention_fwd(q, k, v, scale, dropout_p, seed):
    b, h, tq, d = q.shape
    return q.new_empty((b, h, tq, d)), q.new_empty((b, h, tq), dtype=lse_dtype(q.dtype))


def _fake_attention_bwd(grad_out, q, k, v, out, lse, scale, dropout_p, seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _fake_decode_attention(q, k, v, scale):
    return q.new_empty(q.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, seed)
    ctx.params = (scale, dropout_p)
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def _make_backward(namespace: str):
    def backward(ctx, grad_out, _grad_lse):
        if grad_out is None:  # the output did not reach the differentiated result
            return None, None, None, None, None, None
        q, k, v, out, lse, seed = ctx.saved_tensors
        dq, dk, dv = kernels(namespace).attention_bwd(grad_out, q, k, v, out, lse, *ctx.params, seed)
        return dq, dk, dv, None, None, None

    return backward


def register(namespace: str, *, fakes: bool = True) -> None:
    """Register the autograd formula (and, with ``fakes``, the fake impls) of ``namespace``'s attention ops.

    ``fakes=False`` for Triton ops, whose fake is their own body.
    """
    if fakes:
        register_fake(f"{namespace}::attention_fwd", _fake_attention_fwd)
        register_fake(f"{namespace}::attention_bwd", _fake_attention_bwd)
        if hasattr(kernels(namespace), "decode_attention"):
            register_fake(f"{namespace}::decode_attention", _fake_decode_attention)
    torch.library.register_autograd(f"{namespace}::attention_fwd",
                                    first_order_only(f"{namespace}::causal_attention", _make_backward(namespace)),
                                    setup_context=_setup_context)


# --------------------------------------------------------------------------- calls


def dropout_seed(device: torch.device) -> torch.Tensor:
    """One int64 seed on ``device`` from torch's generator there (no host synchronisation)."""
    return torch.randint(0, SEED_BOUND, (1,), dtype=torch.int64, device=device)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def fused_causal_attention(ops, q, k, v, *, dropout_p=0.0, training=False, scale=None):
    """Causal attention on ``ops``' kernels (a namespace name such as ``"gptfast_cpu"``).

    Same contract as ``gptfast.ops.causal_attention`` (inputs already validated).  Strided
    q/k/v (e.g. transposed head views) are passed as they are, unless the last dimension
    is not unit-stride.
    """
    scale = k.shape[-1] ** -0.5 if scale is None else float(scale)
    p = float(dropout_p) if training else 0.0
    seed = dropout_seed(q.device) if p > 0.0 else None
    with without_graph():
        out, _ = kernels(ops).attention_fwd(_unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v),
                                            scale, p, seed)
    return out


def cuda_causal_attention(ops, q, k, v, *, dropout_p=0.0, training=False, scale=None):
    """Causal attention on the CUDA kernels: pads small head dims, routes decode steps to ``decode_attention``.

    A smaller head dim is zero-padded up to the next kernel head dim (zeros change neither
    the scores nor the kept columns of the output).  A single query with no dropout and no
    gradient to track (a KV-cache decode step) runs the split-key decode kernel.
    """
    head_dim = q.shape[-1]
    scale = head_dim ** -0.5 if scale is None else float(scale)
    kernel_dim = next(d for d in CUDA_HEAD_DIMS if d >= head_dim)
    if kernel_dim != head_dim:
        q, k, v = (F.pad(t, (0, kernel_dim - head_dim)) for t in (q, k, v))
        out = cuda_causal_attention(ops, q, k, v, dropout_p=dropout_p, training=training, scale=scale)
        return out[..., :head_dim]
    p = float(dropout_p) if training else 0.0
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if q.shape[2] == 1 and p == 0.0 and not needs_grad:
        with without_graph():
            return kernels(ops).decode_attention(q, k, v, scale)
    return fused_causal_attention(ops, q, k, v, dropout_p=p, training=True, scale=scale)


def cuda_unsupported_reason(q, k, v, **_kwargs) -> str | None:
    """Why the CUDA attention kernels cannot take these inputs (dtype, head dim, grid), or ``None``."""
    if q.dtype not in CUDA_DTYPES:
        return (f"the CUDA attention kernels take float16/bfloat16 inputs, got {q.dtype} "
                "(use backend 'triton' or 'torch')")
    head_dim = q.shape[-1]
    if head_dim > CUDA_HEAD_DIMS[-1]:
        return (f"the CUDA attention kernels support head_dim up to {CUDA_HEAD_DIMS[-1]} "
                f"(64 and 128 natively), got {head_dim}")
    if q.shape[0] > CUDA_MAX_GRID_DIM or q.shape[1] > CUDA_MAX_GRID_DIM:
        return f"the CUDA attention kernels need batch and heads <= {CUDA_MAX_GRID_DIM}, got {tuple(q.shape[:2])}"
    if q.device.type == "cuda" and torch.cuda.get_device_capability(q.device) < (8, 0):
        return "the CUDA attention kernels use sm_80+ tensor-core instructions (mma.sync bf16/fp16)"
    return None
