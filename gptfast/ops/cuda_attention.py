"""Causal attention on gptfast's CUDA kernels (csrc/cuda attention files, extension ``gptfast._C_cuda``).

Ops (``gptfast_cuda`` namespace, CUDA dispatch key, defined in ``ops_attention.cpp``):

``attention_fwd(q, k, v, scale, dropout_p, seed) -> (out, lse)``
    FlashAttention-2 style forward on tensor cores; ``lse`` (float32, ``(B, H, Tq)``)
    is internal state for the backward.
``attention_bwd(grad_out, q, k, v, out, lse, scale, dropout_p, seed) -> (dq, dk, dv)``
    Recomputes the scores tile by tile; dropout is regenerated from ``seed``.
``decode_attention(q, k, v, scale) -> out``
    ``Tq == 1`` against a long KV cache, keys split across thread blocks
    (flash-decoding).  Used for inference steps: no dropout, no gradient.

This module registers their fake implementations (so ``torch.compile`` can trace
them) and the autograd formula of ``attention_fwd``.  Dropout draws one int64 seed
per call from torch's CUDA generator (``torch.randint`` on the device: follows
``torch.manual_seed``, no host synchronisation); the mask is a pure function of
that seed and the element's (batch, head, query, key), so the backward regenerates
it exactly.  The kernels take float16/bfloat16 with head dim 64 or 128; a smaller
head dim is zero-padded up to the next of those (zeros change neither the scores nor
the kept columns of the output; it costs the extra memory traffic).  Other inputs
(float32/float64, head dim > 128) are refused by :func:`attention_unsupported_reason`,
so ``"auto"`` falls back to another backend and ``backend="cuda"`` raises with the reason.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KERNEL_DTYPES = (torch.float16, torch.bfloat16)
HEAD_DIMS = (64, 128)  # head dims with a kernel; smaller ones are padded up to one of these
_MAX_GRID_DIM = 65535  # batch and heads are grid dimensions

try:
    from gptfast import _C_cuda  # noqa: F401  (loading it registers the gptfast_cuda ops)
    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # CPU-only build: the backend reports itself unavailable
    _C_cuda = None
    _IMPORT_ERROR = f"gptfast._C_cuda is not built ({exc})"


def _registered() -> bool:
    return _C_cuda is not None and hasattr(torch.ops.gptfast_cuda, "attention_fwd")


def _ops():
    """The op namespace the wrappers call (a function, so CPU tests can substitute a recorder)."""
    return torch.ops.gptfast_cuda


# --------------------------------------------------------------------------- fake implementations


def _fake_attention_fwd(q, k, v, scale, dropout_p, seed):
    b, h, tq, d = q.shape
    return q.new_empty((b, h, tq, d)), q.new_empty((b, h, tq), dtype=torch.float32)


def _fake_attention_bwd(grad_out, q, k, v, out, lse, scale, dropout_p, seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _fake_decode_attention(q, k, v, scale):
    return q.new_empty(q.shape)


# --------------------------------------------------------------------------- autograd


def _setup_attention_fwd(ctx, inputs, output):
    q, k, v, scale, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, seed)
    ctx.scale = scale
    ctx.dropout_p = dropout_p


def _backward_attention_fwd(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, seed = ctx.saved_tensors
    dq, dk, dv = _ops().attention_bwd(grad_out, q, k, v, out, lse, ctx.scale, ctx.dropout_p, seed)
    return dq, dk, dv, None, None, None


if _registered():
    torch.library.register_fake("gptfast_cuda::attention_fwd")(_fake_attention_fwd)
    torch.library.register_fake("gptfast_cuda::attention_bwd")(_fake_attention_bwd)
    torch.library.register_fake("gptfast_cuda::decode_attention")(_fake_decode_attention)
    torch.library.register_autograd("gptfast_cuda::attention_fwd", _backward_attention_fwd,
                                    setup_context=_setup_attention_fwd)


# --------------------------------------------------------------------------- backend functions


def attention_unsupported_reason(q, k, v, *, dropout_p=0.0, training=False, scale=None) -> str | None:
    """``None`` if the CUDA attention kernels can run this call, else a sentence saying why not.

    Input properties (dtype, head dim) are checked first, so the reason is useful even
    on a machine without the extension.
    """
    if q.dtype not in KERNEL_DTYPES:
        return (f"the CUDA attention kernels take float16/bfloat16 inputs, got {q.dtype} "
                "(use backend 'triton' or 'torch')")
    head_dim = q.shape[-1]
    if head_dim > HEAD_DIMS[-1]:
        return f"the CUDA attention kernels support head_dim up to {HEAD_DIMS[-1]} (64 and 128 natively), got {head_dim}"
    if q.shape[0] > _MAX_GRID_DIM or q.shape[1] > _MAX_GRID_DIM:
        return f"the CUDA attention kernels need batch and heads <= {_MAX_GRID_DIM}, got {tuple(q.shape[:2])}"
    if not _registered():
        return _IMPORT_ERROR or "gptfast._C_cuda was built without the attention kernels"
    if q.device.type != "cuda":
        return f"the CUDA attention kernels run on CUDA tensors, not {q.device.type}"
    if torch.cuda.get_device_capability(q.device) < (8, 0):
        return "the CUDA attention kernels use sm_80+ tensor-core instructions (mma.sync bf16/fp16)"
    return None


def causal_attention(q, k, v, *, dropout_p=0.0, training=False, scale=None):
    """Causal attention ``softmax(q k^T * scale + mask) (dropout) v`` on the CUDA kernels.

    Same contract as ``gptfast.ops.causal_attention`` (inputs already validated and
    accepted by :func:`attention_unsupported_reason`).  A single query with no dropout
    and no gradient to track (a KV-cache decode step) runs the split-key decode kernel.
    """
    head_dim = q.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    kernel_dim = next(d for d in HEAD_DIMS if d >= head_dim)
    if kernel_dim != head_dim:
        q, k, v = (F.pad(t, (0, kernel_dim - head_dim)) for t in (q, k, v))
        out = causal_attention(q, k, v, dropout_p=dropout_p, training=training, scale=scale)
        return out[..., :head_dim]
    p = float(dropout_p) if training else 0.0
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if q.shape[2] == 1 and p == 0.0 and not needs_grad:
        return _ops().decode_attention(q, k, v, scale)
    seed = None
    if p > 0.0:
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=q.device)  # 62 random key bits
    out, _ = _ops().attention_fwd(q, k, v, scale, p, seed)
    return out
