"""The one dispatch point for gptfast's fused hot spots.

Model, training and generation code call only these functions.  Each validates
its input (clear ``TypeError``/``ValueError`` naming the argument), picks a
backend (``use_backend``, ``$GPTFAST_BACKEND`` or ``"auto"``) and runs it.

Backends: ``"torch"`` (plain PyTorch, the parity oracle), ``"cpu"`` (csrc/cpu),
``"triton"`` (csrc/triton), ``"cuda"`` (csrc/cuda).  ``"auto"`` takes, per op,
the first backend in that priority order (cuda, triton, cpu, torch) that is built,
serves the tensors' device and has been measured faster than the torch path.

Layout: ``_checks`` (validation), ``_dispatch`` (backend registry and selection),
``torch_ops`` (the oracle), one module per op above the kernels (``attention``,
``loss`` for the cross-entropy and the linear cross-entropy, ``sampling``, ``normalization``
for RMSNorm and LayerNorm, ``activation`` for SwiGLU and GELU, ``regularization`` for dropout, ``rotary``
for RoPE, ``linear`` for ``decode_linear``; not named after the functions of
this package, which would shadow them), and one thin loader
per kernel backend (``cpu_ops``, ``cuda_ops``, ``triton_ops``).  The kernels' torch-op
schemas are listed in csrc/schemas.h.
"""

from __future__ import annotations

import torch

from . import _checks
from ._dispatch import (
    BACKEND_CHOICES,
    OPS,
    autocast_inputs,
    available_backends,
    backend_status,
    check_backend_choice,
    get_backend,
    fused_entry_point,
    resolve,
    unavailable_reason,
    use_backend,
)

__all__ = [
    "causal_attention",
    "cross_entropy",
    "linear_cross_entropy",
    "sample_next_token",
    "sampler",
    "rms_norm",
    "layer_norm",
    "swiglu",
    "gelu",
    "dropout",
    "rope",
    "decode_linear",
    "available_backends",
    "backend_status",
    "check_backend_choice",
    "get_backend",
    "fused_entry_point",
    "use_backend",
    "selected_backend",
    "BACKEND_CHOICES",
]


def selected_backend(op: str, *tensors: torch.Tensor) -> str:
    """Name of the backend that would run ``op`` on these tensors right now.

    ``tensors`` are the op's tensor arguments in its order; the leading ones may do (the other arguments count
    as their defaults) unless the choice depends on a later one, as RoPE's does on its tables: a ``TypeError``
    then says so.
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}, got {op!r}")
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise TypeError(f"selected_backend needs {op}'s tensor arguments, got {[type(t).__name__ for t in tensors]}")
    try:
        return resolve(op, tensors[0].device, tensors)[0]
    except (TypeError, IndexError, ValueError) as exc:  # a backend's limits read an argument not given
        raise TypeError(f"selected_backend({op!r}, ...) needs more of {op}'s tensor arguments to decide, got "
                        f"{len(tensors)}: {exc}") from None


def causal_attention(q, k, v, *, dropout_p=0.0, training=False, scale=None, backend=None):
    """Causal softmax attention ``softmax(q k^T * scale + mask) v`` with attention dropout.

    q is ``(B, H, Tq, D)``, k and v ``(B, H_kv, Tk, D)`` with ``Tq <= Tk``: the queries
    are the last ``Tq`` positions of the keys (``Tq = 1`` is a KV-cache decode step).
    ``H_kv`` may divide ``H`` (grouped-query attention; ``H_kv = 1`` is multi-query):
    query head ``h`` reads kv head ``h // (H // H_kv)``, and the fused backends read the
    shared k/v heads in place, without expanding them.
    ``scale`` defaults to ``1 / sqrt(D)``.  Dropout on the attention weights is applied
    only when ``training`` is true.  Returns ``(B, H, Tq, D)``.
    """
    _checks.check_attention(q, k, v, dropout_p, scale, training)
    kwargs = dict(dropout_p=float(dropout_p), training=bool(training), scale=scale)
    cast = autocast_inputs(q, k, v)
    name, fn = resolve("causal_attention", q.device, cast, kwargs, backend)
    return fn(q, k, v, **kwargs) if name == "torch" else fn(*cast, **kwargs)


def cross_entropy(logits, targets, *, ignore_index=-100, reduction="mean", backend=None):
    """Softmax cross-entropy of ``logits`` ``(N, V)`` or ``(B, T, V)`` against class indices.

    Same semantics as ``torch.nn.functional.cross_entropy``: targets equal to
    ``ignore_index`` add nothing and are left out of the mean; ``reduction="none"``
    returns one loss per target, in the targets' shape.
    """
    _checks.check_cross_entropy(logits, targets, ignore_index, reduction)
    targets = _checks.comparable_targets(targets, ignore_index)
    kwargs = dict(ignore_index=int(ignore_index), reduction=reduction)
    _, fn = resolve("cross_entropy", logits.device, (logits, targets), kwargs, backend)
    return fn(logits, targets, **kwargs)


def linear_cross_entropy(hidden, weight, targets, *, bias=None, ignore_index=-100, reduction="mean",
                         backend=None):
    """Cross-entropy of the output head ``hidden @ weight.T (+ bias)`` against ``targets``.

    Fused backends never build the full ``(N, V)`` logits; the torch backend does.
    hidden is ``(..., H)``, weight ``(V, H)``, targets ``hidden.shape[:-1]``.
    """
    _checks.check_linear_cross_entropy(hidden, weight, targets, bias, ignore_index, reduction)
    targets = _checks.comparable_targets(targets, ignore_index)
    kwargs = dict(bias=bias, ignore_index=int(ignore_index), reduction=reduction)
    # The backend is chosen for the tensors as autocast hands them over (each backend's path casts them so).
    hidden_cast, weight_cast, bias_cast = autocast_inputs(hidden, weight, bias)
    _, fn = resolve("linear_cross_entropy", hidden.device, (hidden_cast, weight_cast, targets),
                    {**kwargs, "bias": bias_cast}, backend)
    return fn(hidden, weight, targets, **kwargs)


def sample_next_token(logits, *, temperature=0.0, top_k=None, generator=None, backend=None):
    """Draw the next token of every row of ``logits`` ``(B, V)``; returns ``(B, 1)`` int64.

    ``top_k`` keeps every logit >= the row's k-th largest (ties kept, as the
    reference does); ``temperature`` divides the logits before the softmax, and 0
    means argmax.  Both may be per-row tensors of shape ``(B,)``.
    """
    temperature, top_k = _checks.normalize_sampling_args(logits, temperature, top_k, generator)
    kwargs = dict(temperature=temperature, top_k=top_k, generator=generator)
    _, fn = resolve("sample_next_token", logits.device, (logits,), kwargs, backend)
    return fn(logits, **kwargs)


def sampler(batch, vocab, device, *, temperature=0.0, top_k=None, generator=None, backend=None):
    """Check the sampling arguments once; return ``draw(logits)`` for ``(batch, vocab)`` logits on ``device``.

    A decoding loop calls ``draw`` once per token.  It runs what :func:`sample_next_token`
    runs minus the argument checks (per-row tensors are not re-validated, which would
    cost a device read per token); the backend is still chosen per call, so
    ``use_backend`` and the logits' dtype are honoured.
    """
    shape_only = torch.empty((), device=device).expand(batch, vocab)  # the checks read shape, dtype, device
    temperature, top_k = _checks.normalize_sampling_args(shape_only, temperature, top_k, generator)
    kwargs = dict(temperature=temperature, top_k=top_k, generator=generator)
    expected = (batch, vocab)

    def draw(logits):
        """The next token of every row of ``logits``, ``(batch, 1)`` int64."""
        if tuple(logits.shape) != expected or not logits.is_floating_point():
            raise ValueError(f"logits must be floating point of shape {expected}, got {logits.dtype} "
                             f"{tuple(logits.shape)}")
        _, fn = resolve("sample_next_token", logits.device, (logits,), kwargs, backend)
        return fn(logits, **kwargs)

    return draw


def rms_norm(x, weight, *, eps=1e-6, backend=None):
    """Root-mean-square norm over the last axis: ``x / sqrt(mean(x^2) + eps) * weight``.

    x is ``(..., D)``, weight ``(D,)`` (any float dtype).  The statistics and the scaling
    by ``weight`` run in float32 and the result is rounded once to ``x``'s dtype, as the
    reference's Qwen3 ``RMSNorm`` and ``torch.nn.functional.rms_norm`` compute it.
    """
    _checks.check_rms_norm(x, weight, eps)
    kwargs = dict(eps=float(eps))
    _, fn = resolve("rms_norm", x.device, (x, weight), kwargs, backend)
    return fn(x, weight, **kwargs)


def layer_norm(x, weight, bias, *, eps=1e-5, backend=None):
    """Layer norm over the last axis: ``(x - mean) / sqrt(var + eps) * weight + bias``.

    The book's GPT ``LayerNorm`` (biased variance).  x is ``(..., D)``, weight and bias
    ``(D,)`` (any float dtype), ``eps >= 0``.  Fused backends compute the statistics and
    the affine map in float32 and round the result once to ``x``'s dtype; backend
    ``"torch"`` runs the book's lines as they are.
    """
    _checks.check_layer_norm(x, weight, bias, eps)
    kwargs = dict(eps=float(eps))
    _, fn = resolve("layer_norm", x.device, (x, weight, bias), kwargs, backend)
    return fn(x, weight, bias, **kwargs)


def swiglu(gate, up, *, backend=None):
    """SwiGLU activation ``silu(gate) * up`` (the product of the two projections' outputs).

    gate and up have one shape and dtype; fused backends compute in float32 and round once.
    """
    _checks.check_swiglu(gate, up)
    _, fn = resolve("swiglu", gate.device, (gate, up), {}, backend)
    return fn(gate, up)


def gelu(x, *, backend=None):
    """GELU with GPT-2's tanh approximation, ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``.

    The book's ``GELU`` module (``sqrt(2/pi)`` at its float32 value); fused backends compute
    in float32 and round once, and their backward recomputes from ``x``.  Returns ``x``'s shape
    and dtype; the one exception is the ``torch`` backend on a 0-dim 16-bit ``x``, which returns
    float32 as the book's module does (two 0-dim tensors promote to the wider dtype).
    """
    _checks.check_gelu(x)
    _, fn = resolve("gelu", x.device, (x,), {}, backend)
    return fn(x)


def dropout(x, p=0.5, *, training=True, backend=None):
    """Dropout: each element zeroed with probability ``p``, the rest scaled by ``1 / (1 - p)``.

    ``torch.nn.functional.dropout``'s contract (``x`` itself when not ``training``).  Fused
    backends draw one seed from torch's generator per call and derive the mask from it and each
    element's index (the same mask on every fused backend, so ``torch.manual_seed`` reproduces it);
    their backward regenerates the mask instead of storing it, and math is float32, rounded once.
    Backend ``"torch"`` is ``F.dropout`` itself, whose mask (torch's Bernoulli draws) the book's
    numbers depend on.
    """
    _checks.check_dropout(x, p, training)
    kwargs = dict(training=bool(training))
    _, fn = resolve("dropout", x.device, (x,), kwargs, backend)
    return fn(x, float(p), **kwargs)


def rope(x, cos, sin, *, offset=0, positions=None, backend=None):
    """Rotary position embedding (rotate-half) of ``x`` ``(B, H, T, D)`` from tables ``cos``/``sin`` ``(P, D)``.

    ``x * cos[p] + cat(-x2, x1) * sin[p]`` where token ``t`` sits at position
    ``p = offset + t``, or ``p = positions[b, t]`` with per-row ``positions`` ``(B, T)``
    (a left-padded batch in KV-cache decode).  The result has ``x``'s dtype.  Tables that
    require grad get one on the torch path only (``"auto"`` takes it for such calls).
    """
    offset = _checks.as_int(offset)
    _checks.check_rope(x, cos, sin, offset, positions)
    kwargs = dict(offset=int(offset), positions=positions)
    _, fn = resolve("rope", x.device, (x, cos, sin), kwargs, backend)
    return fn(x, cos, sin, **kwargs)


def decode_linear(x, weight, bias=None, *, backend=None):
    """``x @ weight.T + bias`` for a few rows of ``x`` (``F.linear``), the matrix-vector products of decoding.

    x is ``(..., K)``, weight ``(N, K)``, bias ``(N,)`` or None, one dtype for all.  The
    fused kernels read each weight row once for all rows of ``x`` and accumulate in
    float32 (16-bit weights widened in registers); they are valid for any row count but
    built for the one to a few rows of a decode step.  Differentiable (plain-torch backward).
    Kernels on cpu, cuda and triton; decode steps route to it on CPU only (1-16 rows), GPU
    routing waits for a GPU measurement.
    """
    _checks.check_decode_linear(x, weight, bias)
    x_cast, weight_cast, bias_cast = autocast_inputs(x, weight, bias)
    name, fn = resolve("decode_linear", x.device, (x_cast, weight_cast), dict(bias=bias_cast), backend)
    return fn(x, weight, bias=bias) if name == "torch" else fn(x_cast, weight_cast, bias=bias_cast)
