"""Backend ``"torch"``: plain PyTorch, written to match the reference numerically.

This is the oracle every kernel is tested against.  Each function performs the
same operations, in the same order, as ``llms_from_scratch`` does, so results
(dropout masks and sampled tokens included) are bitwise equal under one seed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEVICES = ("cpu", "cuda", "mps", "xpu", "meta")
AUTO_OPS = frozenset({"causal_attention", "cross_entropy", "linear_cross_entropy", "sample_next_token", "rms_norm",
                      "layer_norm", "swiglu", "gelu", "dropout", "rope", "decode_linear"})


def unavailable_reason():
    return None


def causal_mask(tq: int, tk: int, device) -> torch.Tensor:
    """Boolean ``(tq, tk)`` mask, True where query ``i`` (position ``tk - tq + i``) must not see key ``j``."""
    return torch.ones(tq, tk, dtype=torch.bool, device=device).triu_(tk - tq + 1)


def causal_attention(q, k, v, *, dropout_p=0.0, training=False, scale=None):
    """Causal softmax attention, op for op as the reference's ``MultiHeadAttention.forward``.

    Grouped k/v ``(B, H_kv, Tk, D)`` are expanded to the query heads with ``repeat_interleave``,
    as the reference's ``GroupedQueryAttention`` does before its own matmuls.
    """
    group = q.shape[1] // k.shape[1] if k.shape[1] else 1  # no heads at all: nothing to expand
    if group != 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(2, 3)
    scores.masked_fill_(causal_mask(q.shape[2], k.shape[2], q.device), -torch.inf)
    # The reference divides by sqrt(head_dim) after masking; keep that order for bitwise parity.
    scores = scores / k.shape[-1] ** 0.5 if scale is None else scores * scale
    weights = torch.softmax(scores, dim=-1)
    weights = F.dropout(weights, dropout_p, training)
    return weights @ v


def cross_entropy(logits, targets, *, ignore_index=-100, reduction="mean"):
    """``F.cross_entropy`` over the last dimension; ``reduction="none"`` keeps the targets' shape."""
    loss = F.cross_entropy(logits.flatten(0, -2), targets.flatten().long(),
                           ignore_index=ignore_index, reduction=reduction)
    return loss.view(targets.shape) if reduction == "none" else loss


def linear_cross_entropy(hidden, weight, targets, *, bias=None, ignore_index=-100, reduction="mean"):
    """Cross-entropy of ``hidden @ weight.T (+ bias)``, materialising the full logits."""
    return cross_entropy(F.linear(hidden, weight, bias), targets, ignore_index=ignore_index, reduction=reduction)


def _keep_top_k(logits, top_k):
    if isinstance(top_k, int):
        top_logits, _ = torch.topk(logits, top_k)
        threshold = top_logits[:, -1:]
    else:  # one k per row: the k-th largest of each row
        ordered = torch.sort(logits, dim=-1, descending=True).values
        threshold = ordered.gather(1, (top_k - 1).unsqueeze(1))
    # Reference semantics: everything >= the k-th largest value survives, ties included.
    return torch.where(logits < threshold, torch.tensor(float("-inf"), device=logits.device), logits)


def sample_next_token(logits, *, temperature=0.0, top_k=None, generator=None):
    """Top-k filter, temperature, softmax and multinomial draw, as the reference's ``generate`` does it."""
    if top_k is not None:
        logits = _keep_top_k(logits, top_k)
    if isinstance(temperature, float):
        if temperature > 0.0:
            probs = torch.softmax(logits / temperature, dim=-1)
            return torch.multinomial(probs, num_samples=1, generator=generator)
        return torch.argmax(logits, dim=-1, keepdim=True)
    # Per-row temperatures: rows at 0 are greedy, the others sample.
    greedy = torch.argmax(logits, dim=-1, keepdim=True)
    sampling = temperature > 0
    safe_t = torch.where(sampling, temperature, torch.ones_like(temperature)).to(logits.dtype)
    probs = torch.softmax(logits / safe_t.unsqueeze(1), dim=-1)
    # Greedy rows never use their draw: keep their NaNs (from NaN/inf logits) out of multinomial.
    # The draws of the other rows do not depend on these values, so they are unchanged.
    probs = torch.where(sampling.unsqueeze(1), probs, torch.ones_like(probs))
    drawn = torch.multinomial(probs, num_samples=1, generator=generator)
    return torch.where(sampling.unsqueeze(1), drawn, greedy)


def rms_norm(x, weight, *, eps=1e-6):
    """RMSNorm over the last axis in float32, as the reference's Qwen3 ``RMSNorm`` (and ``F.rms_norm``) do it.

    ``x`` is upcast to float32 (float64 stays), normalised, multiplied by ``weight`` in that
    precision and cast back to ``x``'s dtype once.
    """
    input_dtype = x.dtype
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    variance = x.pow(2).mean(dim=-1, keepdim=True)
    return (x * torch.rsqrt(variance + eps) * weight).to(input_dtype)


def layer_norm(x, weight, bias, *, eps=1e-5):
    """The book's GPT ``LayerNorm.forward``, line for line (biased variance, in ``x``'s dtype)."""
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True, unbiased=False)
    norm_x = (x - mean) / torch.sqrt(var + eps)
    return weight * norm_x + bias


def swiglu(gate, up):
    """SwiGLU ``silu(gate) * up``, as the reference's Llama 3 and Qwen3 ``FeedForward`` compute it."""
    return F.silu(gate) * up


def gelu(x):
    """GPT-2's tanh GELU, op for op as the book's ``GELU`` module (ch04).

    ``sqrt(2/pi)`` is the book's float32 0-dim tensor, computed by torch on the machine at hand (its last
    bit differs between CPUs; the fused kernels take theirs from torch the same way); a 16-bit ``x``
    rounds it to its own dtype, as the reference does.
    """
    return 0.5 * x * (1 + torch.tanh(torch.sqrt(torch.tensor(2.0 / torch.pi)) * (x + 0.044715 * torch.pow(x, 3))))


def dropout(x, p=0.5, *, training=True):
    """``F.dropout`` itself, as the book's ``nn.Dropout`` modules run it (the same Bernoulli draws)."""
    return F.dropout(x, p, training)


def rope(x, cos, sin, *, offset=0, positions=None):
    """Rotate-half RoPE of ``x`` ``(B, H, T, D)``, op for op as the reference's ``apply_rope``.

    Token ``t`` of batch row ``b`` sits at position ``offset + t``, or ``positions[b, t]``
    when ``positions`` ``(B, T)`` is given.  The products run in the tables' dtype
    (float32 in the models) and the result is cast to ``x``'s dtype.
    """
    if positions is None:
        cos, sin = cos[offset:offset + x.shape[2]], sin[offset:offset + x.shape[2]]
    else:
        cos, sin = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return ((x * cos) + (rotated * sin)).to(dtype=x.dtype)


def decode_linear(x, weight, bias=None):
    """``F.linear(x, weight, bias)``: what ``nn.Linear`` computes."""
    return F.linear(x, weight, bias)
