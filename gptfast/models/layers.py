"""Building blocks shared by the Llama 3 and Qwen3 models: the hot spots as small functions.

The models built from them (:mod:`gptfast.models.llama3`, :mod:`gptfast.models.qwen3`)
keep the reference's classes, constructor arguments, parameter names, creation order
(so the same initial weights under a seed) and forward signatures.

Each function here is written op for op as ``llms_from_scratch`` computes the same
thing, so a model built from them gives bitwise the reference's numbers with the
``"torch"`` backend.  They are the seams where fused kernels plug in: attention
already goes through :func:`gptfast.ops.causal_attention`; :func:`rms_norm`,
:func:`rotate_half_rope` and :func:`swiglu` are the plain-PyTorch versions of the
fused ops to come and keep their argument conventions.
"""

from __future__ import annotations

import numbers
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from .blocks import apply_linear

# ----------------------------------------------------------------------------- argument checks


def require_positive_int(name: str, value) -> int:
    """``value`` as an int, or a ``ValueError``/``TypeError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return int(value)


def require_divisible(name: str, value: int, by_name: str, by: int) -> None:
    if value % by != 0:
        raise ValueError(f"{name} ({value}) must be divisible by {by_name} ({by})")


def embedding_rows(tok_emb, vocab_size: int) -> int:
    """The token ids ``tok_emb`` looks up: its rows (an embedding grown for added tokens has more than the config
    says), or ``vocab_size`` for a module that does not say."""
    rows = getattr(tok_emb, "num_embeddings", None)
    return rows if isinstance(rows, int) else vocab_size


def check_token_ids(in_idx: torch.Tensor, vocab_size: int, context_length: int) -> None:
    """Token ids must be a ``(batch, tokens)`` integer tensor within the vocabulary and context.

    Values are only checked on CPU tensors and outside ``torch.compile`` (on a GPU
    that would cost a device sync, in a compiled graph a graph break; the embedding
    kernel bounds-checks there).
    """
    if not isinstance(in_idx, torch.Tensor):
        raise TypeError(f"in_idx must be a torch.Tensor of token ids, got {type(in_idx).__name__}")
    if in_idx.dim() != 2:
        raise ValueError(f"in_idx must be 2-D (batch, tokens), got shape {tuple(in_idx.shape)}")
    if in_idx.dtype not in (torch.int64, torch.int32):  # the index types the embedding takes
        raise TypeError(f"in_idx must hold integer token ids as int64 or int32, got {in_idx.dtype}")
    if in_idx.shape[1] > context_length:
        raise ValueError(
            f"in_idx has {in_idx.shape[1]} tokens, more than the model's context_length {context_length}")
    if in_idx.device.type == "cpu" and in_idx.numel() > 0 and not torch.compiler.is_compiling():
        low, high = int(in_idx.min()), int(in_idx.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"in_idx contains token id {bad}, outside the vocabulary [0, {vocab_size})")


# ----------------------------------------------------------------------------- RMSNorm


def rms_norm_takes_op(x: torch.Tensor, weight: torch.Tensor, eps, *, bias=None, upcast: bool = True) -> bool:
    """True when :func:`rms_norm` with these arguments computes through :func:`gptfast.ops.rms_norm`."""
    return (upcast and bias is None and x.dtype != torch.float64 and isinstance(eps, numbers.Real) and eps > 0
            and weight.shape == (x.shape[-1],))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, bias: torch.Tensor | None = None,
             upcast: bool = True) -> torch.Tensor:
    """Root-mean-square norm over the last axis, ``x / sqrt(mean(x^2) + eps) * weight (+ bias)``.

    With ``upcast`` the statistics and the scaling run in float32 (Qwen3's convention;
    the weight may stay float32 while ``x`` is bfloat16).  The result has ``x``'s dtype.
    """
    if rms_norm_takes_op(x, weight, eps, bias=bias, upcast=upcast):
        return ops.rms_norm(x, weight, eps=eps)  # the torch backend runs these same lines, op for op
    input_dtype = x.dtype
    if upcast:
        x = x.to(torch.float32)
    variance = x.pow(2).mean(dim=-1, keepdim=True)
    out = x * torch.rsqrt(variance + eps) * weight
    if bias is not None:
        out = out + bias
    return out.to(input_dtype)


def builtin_rms_norm_eps(x: torch.Tensor, weight: torch.Tensor | None, eps: float | None) -> float | None:
    """The eps :func:`rms_norm_builtin` normalises ``x``'s last axis with, or ``None`` when it leaves the call to
    ``F.rms_norm`` as given (no weight, a weight of another size, integer x).  For ``eps=None`` that is
    ``F.rms_norm``'s: the eps of the dtype it computes in (float32 for 16-bit x)."""
    if weight is None or weight.shape != (x.shape[-1],) or not x.dtype.is_floating_point:
        return None
    if eps is not None:
        return eps
    return torch.finfo(torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype).eps


def rms_norm_builtin(x: torch.Tensor, weight: torch.Tensor | None, eps: float | None) -> torch.Tensor:
    """``torch.nn.RMSNorm``'s computation over the last axis (Llama 3's norms use it).

    ``F.rms_norm`` computes in float32 and multiplies by the weight before rounding, the
    convention of :func:`gptfast.ops.rms_norm`; a fused backend runs that op, the torch
    backend keeps ``F.rms_norm`` itself (bitwise the reference, gradients included).
    """
    own_eps = builtin_rms_norm_eps(x, weight, eps)
    if own_eps is not None:
        eps = own_eps
        if eps > 0 and ops.selected_backend("rms_norm", x, weight) != "torch":
            return ops.rms_norm(x, weight, eps=eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


class BuiltinRMSNorm(nn.RMSNorm):
    """``torch.nn.RMSNorm`` (same parameters, same numbers) whose forward is :func:`rms_norm_builtin`.

    It stays an ``nn.RMSNorm`` instance, so code that checks the type still sees one.
    """

    def fused_args(self, x):
        """``(weight, eps)`` with which :meth:`forward` calls ``ops.rms_norm`` on ``x`` (unless the backend is
        ``"torch"``), or ``None`` when it computes otherwise."""
        if self.normalized_shape != (x.shape[-1],):
            return None
        eps = builtin_rms_norm_eps(x, self.weight, self.eps)
        return (self.weight, eps) if eps is not None and eps > 0 else None

    def forward(self, x):
        if self.normalized_shape != (x.shape[-1],):
            return super().forward(x)  # normalising over several axes: leave it to PyTorch
        return rms_norm_builtin(x, self.weight, self.eps)


# ----------------------------------------------------------------------------- rotary embedding


def rope_tables(head_dim, theta_base=10_000, context_length=4096, freq_config=None, dtype=torch.float32):
    """Cosine and sine tables ``(context_length, head_dim)`` for rotate-half RoPE.

    ``freq_config`` (keys ``factor``, ``low_freq_factor``, ``high_freq_factor``,
    ``original_context_length``) applies Llama 3's frequency scaling: long
    wavelengths are slowed down by ``factor``, short ones kept, the band between
    them interpolated smoothly.
    """
    head_dim = require_positive_int("head_dim", head_dim)
    if head_dim % 2 != 0:
        raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
    context_length = require_positive_int("context_length", context_length)
    # Operation order matters for bitwise agreement with the reference tables.
    exponents = torch.arange(0, head_dim, 2, dtype=dtype)[: (head_dim // 2)].float() / head_dim
    inv_freq = 1.0 / (theta_base ** exponents)
    if freq_config is not None:
        inv_freq = _llama3_scaled_inv_freq(inv_freq, freq_config)
    positions = torch.arange(context_length, dtype=dtype)
    angles = positions[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=1)
    return torch.cos(angles), torch.sin(angles)


def _llama3_scaled_inv_freq(inv_freq: torch.Tensor, freq_config) -> torch.Tensor:
    missing = {"factor", "low_freq_factor", "high_freq_factor", "original_context_length"} - set(freq_config)
    if missing:
        raise ValueError(f"freq_config lacks {sorted(missing)}")
    factor = freq_config["factor"]
    low, high = freq_config["low_freq_factor"], freq_config["high_freq_factor"]
    original = freq_config["original_context_length"]
    low_freq_wavelen = original / low
    high_freq_wavelen = original / high
    wavelen = 2 * torch.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    if high == low:
        # No band in between: a step at the one wavelength (the reference's 0/0 there would be NaN).
        return scaled
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * (inv_freq / factor) + smooth * inv_freq
    in_between = (wavelen <= low_freq_wavelen) & (wavelen >= high_freq_wavelen)
    return torch.where(in_between, smoothed, scaled)


def rope_takes_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """True when :func:`rotate_half_rope` computes through :func:`gptfast.ops.rope` (``(T, D)`` table rows)."""
    return (cos.dim() == 2 and x.dim() == 4 and cos.shape == sin.shape == (x.shape[2], x.shape[3])
            and x.shape[-1] % 2 == 0 and cos.dtype.is_floating_point and sin.dtype.is_floating_point)


def rotate_half_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: ``x * cos + cat(-x2, x1) * sin``, computed in the tables' dtype.

    ``cos``/``sin`` must broadcast against ``x`` ``(B, H, T, D)``: ``(T, D)`` rows for
    the positions of ``x``'s tokens, or ``(B, 1, T, D)`` for per-row positions.
    The result is cast back to ``x``'s dtype.
    """
    if rope_takes_op(x, cos, sin):
        return ops.rope(x, cos, sin)  # the torch backend runs these same lines, op for op
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return ((x * cos) + (rotated * sin)).to(dtype=x.dtype)


def check_rope_input(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offset: int = 0) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-D tensor (batch, heads, tokens, head_dim), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    head_dim, seq_len = x.shape[-1], x.shape[2]
    if head_dim % 2 != 0:
        raise ValueError(f"head_dim of x must be even, got {head_dim}")
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != head_dim:
        raise ValueError(f"cos and sin must both be (positions, {head_dim}), got {tuple(cos.shape)} and "
                         f"{tuple(sin.shape)}")
    if offset < 0 or offset + seq_len > cos.shape[0]:
        raise ValueError(f"positions {offset}..{offset + seq_len - 1} lie outside the RoPE tables' "
                         f"{cos.shape[0]} positions (context_length)")


def apply_rope_at(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """RoPE for ``x`` ``(B, H, T, D)`` whose tokens sit at positions ``offset ... offset + T - 1``."""
    check_rope_input(x, cos, sin, offset)
    return ops.rope(x, cos, sin, offset=offset)


# ----------------------------------------------------------------------------- feed-forward


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation ``silu(gate) * up`` (through :func:`gptfast.ops.swiglu`; its torch backend is this formula)."""
    return ops.swiglu(gate, up)


class FeedForward(nn.Module):
    """SwiGLU MLP: ``fc3(silu(fc1(x)) * fc2(x))``, no biases (Llama 3 and Qwen3)."""

    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg["emb_dim"], cfg["hidden_dim"], dtype=cfg["dtype"], bias=False)
        self.fc2 = nn.Linear(cfg["emb_dim"], cfg["hidden_dim"], dtype=cfg["dtype"], bias=False)
        self.fc3 = nn.Linear(cfg["hidden_dim"], cfg["emb_dim"], dtype=cfg["dtype"], bias=False)

    def forward(self, x):
        return apply_linear(self.fc3, swiglu(apply_linear(self.fc1, x), apply_linear(self.fc2, x)))


# ----------------------------------------------------------------------------- attention


def expand_kv_heads(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(B, H_kv, T, D)`` -> ``(B, H_kv * group_size, T, D)``: each kv head serves ``group_size`` query heads.

    Always a contiguous copy, even for ``group_size == 1``: the reference's matmuls see
    contiguous k/v, and the same memory layout is what keeps them bitwise equal.
    """
    return t.repeat_interleave(group_size, dim=1)


# The causal masks the models hand their blocks, recognised by identity (and an unchanged version counter),
# so the attention knows the fused op computes exactly what they express.  Held weakly: a mask lives as long
# as the forward that uses it, as the reference's does (at a long context one is large).
_CAUSAL_MASKS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_CAUSAL_MASK_VERSIONS: dict = {}


def causal_mask(num_queries: int, num_keys: int, device) -> torch.Tensor | None:
    """The boolean causal mask ``(num_queries, num_keys)`` (True = hidden) the reference builds for its blocks,
    the queries being the last ``num_queries`` key positions.

    The models pass it to their blocks as the reference does, so a block or attention module of the user's
    own (or a hook) gets a real mask; gptfast's attention recognises it (:func:`is_causal_mask`) and takes
    the fused op.  Inside ``torch.compile`` it is None (causal by convention), which keeps graphs free of
    this module-level state.
    """
    if torch.compiler.is_compiling():
        return None
    key = (num_queries, num_keys, torch.device(device))
    mask = _CAUSAL_MASKS.get(key)
    if mask is None or _version_of(mask) != _CAUSAL_MASK_VERSIONS.get(key):
        # Never an inference tensor: a normal one keeps counting in-place edits (a hook's) in inference mode too.
        with torch.inference_mode(False):
            mask = torch.ones(num_queries, num_keys, dtype=torch.bool, device=device).triu(
                num_keys - num_queries + 1)
        for gone in [k for k in _CAUSAL_MASK_VERSIONS if k not in _CAUSAL_MASKS]:
            del _CAUSAL_MASK_VERSIONS[gone]
        _CAUSAL_MASKS[key] = mask
        _CAUSAL_MASK_VERSIONS[key] = _version_of(mask)
    return mask


def _version_of(tensor: torch.Tensor):
    """The in-place version counter, or None for an inference tensor (which has none)."""
    return None if tensor.is_inference() else tensor._version


def is_causal_mask(mask, num_queries: int, num_keys: int) -> bool:
    """True for ``None`` (causal by convention) or a mask from :func:`causal_mask` of this shape, unchanged."""
    if mask is None:
        return True
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (num_queries, num_keys):
        return False
    key = (num_queries, num_keys, mask.device)
    return _CAUSAL_MASKS.get(key) is mask and _version_of(mask) == _CAUSAL_MASK_VERSIONS.get(key)


def grouped_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
    """Softmax attention of q ``(B, H, Tq, D)`` over grouped k/v ``(B, H_kv, Tk, D)``, ``H % H_kv == 0``.

    ``mask=None`` (or the models' own :func:`causal_mask`) means causal (queries are the
    last ``Tq`` key positions) and runs the fused :func:`gptfast.ops.causal_attention`;
    any other boolean ``mask`` (True = hidden, broadcastable to ``(B, H, Tq, Tk)``) is
    honoured exactly as the reference does, in plain PyTorch.  Returns ``(B, H, Tq, D)``.
    """
    if is_causal_mask(mask, q.shape[2], k.shape[2]):
        mask = None
    heads, kv_heads = q.shape[1], k.shape[1]
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads})")
    group_size = heads // kv_heads
    causal_op = mask is None and q.shape[2] > 0  # no query tokens (an empty input): the matmuls below, as the
    # reference's, give no rows and keep the graph (its projections get zero gradients, not none)
    # The fused kernels read the shared k/v heads in place.  The torch backend gets the
    # reference's contiguous repeat_interleave copies, so its matmuls stay bitwise equal.
    if causal_op and ops.selected_backend("causal_attention", q, k, v) != "torch":
        return ops.causal_attention(q, k, v)
    k, v = expand_kv_heads(k, group_size), expand_kv_heads(v, group_size)
    if causal_op:
        return ops.causal_attention(q, k, v)
    scores = q @ k.transpose(2, 3)
    if mask is not None:
        scores = scores.masked_fill(mask, -torch.inf)
    weights = torch.softmax(scores / k.shape[-1] ** 0.5, dim=-1)
    return weights @ v


def split_heads(x: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """``(B, T, heads * head_dim)`` -> ``(B, heads, T, head_dim)`` (a view)."""
    b, t, _ = x.shape
    return x.view(b, t, heads, head_dim).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``(B, heads, T, head_dim)`` -> ``(B, T, heads * head_dim)``."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


# ----------------------------------------------------------------------------- mixture of experts


def dense_expert_mixture(x, topk_probs, topk_indices, num_experts, expert_fn):
    """Every expert on every token, weighted by the routing probabilities (zero for unrouted experts).

    This is the reference's formulation, kept as the oracle: the sum over all
    experts runs in the same order, so results are bitwise the reference's.
    """
    outputs = torch.stack([expert_fn(e, x) for e in range(num_experts)], dim=-2)  # (..., E, emb)
    gating = torch.zeros(*topk_probs.shape[:-1], num_experts, dtype=topk_probs.dtype, device=topk_probs.device)
    gating.scatter_(-1, topk_indices, topk_probs)
    return (gating.unsqueeze(-1) * outputs).sum(dim=-2)


def routed_expert_mixture(x, topk_probs, topk_indices, num_experts, expert_fn):
    """Each expert only on the tokens routed to it; outputs summed with their weights in float32.

    Same result as :func:`dense_expert_mixture` up to rounding, at ``k / E`` of its work.  While
    gradients are recorded an expert without tokens still runs, on no rows: its weights then get
    zero gradients as in the dense mixture, not none (an optimizer skips a parameter without a
    gradient, so its weight decay and momentum would stop).
    """
    flat = x.reshape(-1, x.shape[-1])
    idx = topk_indices.reshape(flat.shape[0], topk_indices.shape[-1])  # (an explicit k: also for no tokens)
    probs = topk_probs.reshape(flat.shape[0], topk_probs.shape[-1])
    out = torch.zeros(flat.shape, dtype=torch.float32, device=x.device)
    # Sorting the (token, slot) pairs by expert gives each expert one contiguous slice.
    order = torch.argsort(idx.flatten(), stable=True)
    counts = torch.bincount(idx.flatten(), minlength=num_experts).tolist()
    tokens = order // idx.shape[1]
    weights = probs.flatten()[order]
    start = 0
    for e, count in enumerate(counts):
        if count or torch.is_grad_enabled():
            rows = tokens[start:start + count]
            y = expert_fn(e, flat[rows])
            out.index_add_(0, rows, y.float() * weights[start:start + count, None].float())
        start += count
    return out.to(x.dtype).view(x.shape)


class RotaryGroupedAttention(nn.Module):
    """The forward pass of Llama 3's and Qwen3's grouped-query attention, for a subclass that creates
    ``W_query``, ``W_key``, ``W_value``, ``out_proj`` and sets ``num_heads``, ``num_kv_groups``, ``head_dim``.

    Split into :meth:`project_rotary` and :meth:`attend_heads` so the KV-cache variants
    can put the cached keys/values between the two.
    """

    def normalize_qk(self, queries: torch.Tensor, keys: torch.Tensor):
        """Hook for per-head query/key normalisation before RoPE (none here)."""
        return queries, keys

    def project_rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offset: int = 0):
        """``(queries, keys, values)`` in heads layout, queries and keys rotated for positions ``offset ...``."""
        queries = split_heads(apply_linear(self.W_query, x), self.num_heads, self.head_dim)
        keys = split_heads(apply_linear(self.W_key, x), self.num_kv_groups, self.head_dim)
        values = split_heads(apply_linear(self.W_value, x), self.num_kv_groups, self.head_dim)
        queries, keys = self.normalize_qk(queries, keys)
        return apply_rope_at(queries, cos, sin, offset), apply_rope_at(keys, cos, sin, offset), values

    def attend_heads(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask=None):
        """Attention over heads-layout inputs (see :func:`grouped_query_attention`), merged and projected out."""
        return apply_linear(self.out_proj, merge_heads(grouped_query_attention(queries, keys, values, mask)))

    def _attend(self, x, mask, cos, sin):
        queries, keys, values = self.project_rotary(x, cos, sin)
        return self.attend_heads(queries, keys, values, mask)
