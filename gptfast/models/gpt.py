"""The GPT model of the book (chapters 3 and 4), with attention routed through ``gptfast.ops``.

Parameter names, shapes, creation order (and so the initial values under a seed)
and buffers are those of ``llms_from_scratch``, so checkpoints load both ways.

:func:`residual_block` is the one formula of a transformer block: ``TransformerBlock.forward``
and the cached passes of :mod:`gptfast.generation` both run it, so the model and the KV-cache
decoding cannot drift apart.  :func:`split_heads`/:func:`merge_heads` work on any attention
module with the book's attributes (gptfast's or the reference's).
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torch.utils.weak import WeakIdKeyDictionary

from .. import ops
from ..ops._dispatch import constant_under_compile
from .blocks import PreNormBlock, apply_linear, runs_own_forward

def _causal_mask_buffer(context_length: int) -> torch.Tensor:
    """The reference's ``mask`` buffer: 1.0 above the diagonal.  The fused op is causal by itself; a
    changed mask sends the attention through :func:`attend_as_written`."""
    return torch.triu(torch.ones(context_length, context_length), diagonal=1)


# ----------------------------------------------------------------------------- shared pieces


def split_heads(att, x):
    """``(b, t, d_out)`` -> ``(b, heads, t, head_dim)`` for attention module ``att`` (a view, no copy)."""
    b, t, _ = x.shape
    return x.view(b, t, att.num_heads, att.head_dim).transpose(1, 2)


def merge_heads(att, x):
    """``(b, heads, t, head_dim)`` -> ``(b, t, d_out)`` for attention module ``att``."""
    b, _, t, _ = x.shape
    return x.transpose(1, 2).reshape(b, t, att.d_out)


# Verdicts of _mask_is_causal per mask tensor (held weakly, by identity) and the version they were made at.
_MASK_VERDICTS = WeakIdKeyDictionary()


def _mask_is_causal(att) -> bool:
    """True when ``att.mask`` (if any) is the book's causal mask: 1 above the diagonal, 0 elsewhere.

    Compared once per version of the buffer (an in-place change bumps it), so the check costs a lookup per
    call; an inference tensor (no version counter) is compared on every call.  Under ``torch.compile`` the
    verdict is a constant of the graph, made from the real buffer while tracing: a mask changed after
    compiling needs a recompile, as any change of a module's state does.  Writes through ``.data`` or numpy
    bypass the version counter and are not seen.
    """
    mask = getattr(att, "mask", None)
    if mask is None or mask.is_meta:
        return True
    if torch.compiler.is_compiling():
        return _traced_mask_verdict(att)
    if mask.is_inference():
        return _compare_with_causal(mask)
    entry = _MASK_VERDICTS.get(mask)
    if entry is not None and entry[0] == mask._version:
        return entry[1]
    verdict = _compare_with_causal(mask)
    _MASK_VERDICTS[mask] = (mask._version, verdict)
    return verdict


def _compare_with_causal(mask) -> bool:
    return bool(torch.equal(mask.bool(), torch.ones(mask.shape, dtype=torch.bool, device=mask.device).triu(1)))


@constant_under_compile
def _traced_mask_verdict(att) -> bool:
    """:func:`_compare_with_causal` of ``att.mask``, run eagerly on the real buffer while ``torch.compile`` traces."""
    mask = att.mask
    return True if mask.is_meta else _compare_with_causal(mask)


def runs_fused_core(att) -> bool:
    """True when ``att``'s core is what the fused causal attention computes: its ``mask`` the causal mask and
    its ``dropout`` an ``nn.Dropout`` (no hook, no forward of its own), so the op may stand in for both."""
    dropout = att.dropout
    return type(dropout) in (nn.Dropout, Dropout) and runs_own_forward(dropout) and _mask_is_causal(att)


def attend_as_written(att, queries, keys, values):
    """The book's attention core, step by step: scores masked by ``att.mask``, softmax, ``att.dropout`` called,
    times ``values``.  For a changed mask or dropout module, which the fused op cannot stand in for."""
    t_q, t_k = queries.shape[-2], keys.shape[-2]
    scores = queries @ keys.transpose(-2, -1)
    mask = getattr(att, "mask", None)  # the KV-cache attention, as the reference's, builds its mask per call
    if mask is None:
        mask = torch.ones(t_k, t_k, device=queries.device).triu(1)
    scores.masked_fill_(mask.bool()[t_k - t_q:t_k, :t_k], -torch.inf)
    weights = att.dropout(torch.softmax(scores / keys.shape[-1] ** 0.5, dim=-1))
    return weights @ values


def causal_core(att, queries, keys, values):
    """``att``'s attention core over ``(b, heads, t, head_dim)`` inputs (queries as the last positions of the
    keys): the fused op where :func:`runs_fused_core`, else :func:`attend_as_written` (also for an input of no
    tokens, which the reference's lines take and the op does not)."""
    _check_fits_mask(att, keys.shape[-2])
    if queries.shape[-2] > 0 and runs_fused_core(att):
        return ops.causal_attention(queries, keys, values, dropout_p=att.dropout.p, training=att.dropout.training)
    return attend_as_written(att, queries, keys, values)


def _check_fits_mask(att, tokens):
    """An attention module holding a causal mask covers ``context_length`` tokens; the reference's lines fail on
    a longer input (the mask does not broadcast), and the fused op must not quietly attend past it."""
    mask = getattr(att, "mask", None)
    if isinstance(mask, torch.Tensor) and tokens > mask.shape[-1]:
        raise ValueError(f"the input has {tokens} tokens, more than the attention's context_length "
                         f"({mask.shape[-1]}, the size of its causal mask)")


def residual_block(block, x, attention):
    """One pre-norm block: ``x + drop(attention(norm1(x)))``, then ``x + drop(ff(norm2(x)))``.

    ``attention`` maps the normed input ``(b, t, emb)`` to ``(b, t', emb)`` with ``t' <= t``;
    the cached prefill asks only for the last position at the last layer, and the residual
    stream then keeps those same last ``t'`` positions.
    """
    out = attention(block.norm1(x))
    if out.shape[1] != x.shape[1]:
        x = x[:, -out.shape[1]:]
    x = x + block.drop_resid(out)
    return x + block.drop_resid(block.ff(block.norm2(x)))


# ----------------------------------------------------------------------------- chapter 3


class SelfAttention_v1(nn.Module):
    """Un-masked self-attention with raw weight matrices (chapter 3, first version)."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.W_query = nn.Parameter(torch.rand(d_in, d_out))
        self.W_key = nn.Parameter(torch.rand(d_in, d_out))
        self.W_value = nn.Parameter(torch.rand(d_in, d_out))

    def forward(self, x):
        keys, queries, values = x @ self.W_key, x @ self.W_query, x @ self.W_value
        weights = torch.softmax((queries @ keys.T) / keys.shape[-1] ** 0.5, dim=-1)
        return weights @ values


class SelfAttention_v2(nn.Module):
    """Un-masked self-attention with ``nn.Linear`` projections (chapter 3, second version)."""

    def __init__(self, d_in, d_out, qkv_bias=False):
        super().__init__()
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)

    def forward(self, x):
        keys, queries, values = self.W_key(x), self.W_query(x), self.W_value(x)
        weights = torch.softmax((queries @ keys.T) / keys.shape[-1] ** 0.5, dim=-1)
        return weights @ values


class CausalAttention(nn.Module):
    """Single-head causal attention with dropout on the attention weights."""

    def __init__(self, d_in, d_out, context_length, dropout, qkv_bias=False):
        super().__init__()
        self.d_out = d_out
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", _causal_mask_buffer(context_length))

    def forward(self, x):
        keys, queries, values = self.W_key(x), self.W_query(x), self.W_value(x)
        # One head: add a heads axis of size 1 for the fused op and drop it again.
        return causal_core(self, queries.unsqueeze(1), keys.unsqueeze(1), values.unsqueeze(1)).squeeze(1)


class MultiHeadAttentionWrapper(nn.Module):
    """Several ``CausalAttention`` heads side by side, outputs concatenated."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        self.heads = nn.ModuleList(
            [CausalAttention(d_in, d_out, context_length, dropout, qkv_bias) for _ in range(num_heads)])

    def forward(self, x):
        return torch.cat([head(x) for head in self.heads], dim=-1)


class _HeadProjections(nn.Module):
    """The q/k/v and output projections of multi-head attention (the reference's creation order)
    and the fused attention core, shared by the plain and the KV-cache GPT-2 attention."""

    def __init__(self, d_in, d_out, dropout, num_heads, qkv_bias=False):
        super().__init__()
        assert d_out % num_heads == 0, "d_out must be divisible by num_heads"
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)

    # The order the reference runs the projections in: it fixes the order in which autograd
    # sums their gradients into the input, so training stays bitwise the reference's.
    projection_order = ("W_key", "W_query", "W_value")

    def project_heads(self, x):
        """``(queries, keys, values)`` of ``x``, each ``(b, heads, t, head_dim)``."""
        heads = {name: split_heads(self, apply_linear(getattr(self, name), x)) for name in self.projection_order}
        return heads["W_query"], heads["W_key"], heads["W_value"]

    def attend(self, queries, keys, values):
        """Causal attention (queries as the last positions of the keys), merged and projected out."""
        return apply_linear(self.out_proj, merge_heads(self, causal_core(self, queries, keys, values)))


class MultiHeadAttention(_HeadProjections):
    """Causal multi-head attention: separate q/k/v projections, fused attention core, output projection."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__(d_in, d_out, dropout, num_heads, qkv_bias)
        self.register_buffer("mask", _causal_mask_buffer(context_length))

    def forward(self, x):
        return self.attend(*self.project_heads(x))


class PyTorchMultiHeadAttention(nn.Module):
    """Multi-head attention with one fused qkv projection (the reference's "bonus" variant)."""

    def __init__(self, d_in, d_out, num_heads, dropout=0.0, qkv_bias=False):
        super().__init__()
        assert d_out % num_heads == 0, "d_out is indivisible by num_heads"
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.d_out = d_out
        self.qkv = nn.Linear(d_in, 3 * d_out, bias=qkv_bias)
        self.proj = nn.Linear(d_out, d_out)
        self.dropout = dropout

    def forward(self, x):
        b, t, _ = x.shape
        # (b, t, 3 * d_out) -> three (b, heads, t, head_dim) views
        qkv = apply_linear(self.qkv, x)
        queries, keys, values = qkv.view(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if ops.get_backend() == "torch" or t == 0:  # the reference's call: bitwise its numbers, empty inputs too
            context = torch.nn.functional.scaled_dot_product_attention(
                queries, keys, values, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        else:
            context = ops.causal_attention(queries, keys, values, dropout_p=self.dropout, training=self.training)
        return apply_linear(self.proj, context.transpose(1, 2).reshape(b, t, self.d_out))


# ----------------------------------------------------------------------------- chapter 4


class LayerNorm(nn.Module):
    """Layer normalisation over the last axis with learnable ``scale`` and ``shift``."""

    def __init__(self, emb_dim):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def takes_fused_op(self, x) -> bool:
        """True when :meth:`forward` hands ``x`` to a fused ``ops.layer_norm`` (unless the backend is ``"torch"``).

        The op keeps x's dtype, so only when the parameters share it (else the book's lines
        promote).  The conditions are ``ops.layer_norm``'s argument checks, so the resolved
        kernel is called directly: one backend resolution per call, which matters at decode
        size (one row).
        """
        scale, shift = self.scale, self.shift
        return (x.dtype == scale.dtype == shift.dtype and x.dtype.is_floating_point and x.dim() >= 1
                and scale.shape == shift.shape == (x.shape[-1],) and x.shape[-1] > 0 and self.eps >= 0
                and x.device == scale.device == shift.device)

    def forward(self, x):
        # A fused backend runs gptfast.ops.layer_norm (one pass each way, float32 statistics).
        # Backend "torch" keeps the book's lines: bitwise the reference, gradients included.
        scale, shift = self.scale, self.shift
        if self.takes_fused_op(x):
            name, layer_norm = ops.resolve("layer_norm", x.device, (x, scale, shift), {"eps": self.eps})
            if name != "torch":
                return layer_norm(x, scale, shift, eps=float(self.eps))
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * ((x - mean) / torch.sqrt(var + self.eps)) + self.shift


# The dtypes the fused elementwise ops take (ops.gelu's and ops.dropout's checks); others keep the
# modules' plain-torch forwards.
_FUSED_OP_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class GELU(nn.Module):
    """GELU, tanh approximation (as in GPT-2)."""

    def __init__(self):
        super().__init__()

    def forward(self, x):
        # A fused backend runs one pass each way (ops.gelu); backend "torch" keeps the book's
        # formula itself, bitwise the reference's numbers and gradients.  Its sqrt(2/pi) stays a
        # float32 0-dim tensor as there: a 16-bit x rounds it to its own dtype first, which a
        # Python float would not, so only the tensor gives the reference's bf16/fp16 bits.
        if x.dtype in _FUSED_OP_DTYPES:
            name, gelu = ops.resolve("gelu", x.device, (x,), {})
            if name != "torch":
                return gelu(x)
        return 0.5 * x * (1 + torch.tanh(torch.sqrt(torch.tensor(2.0 / torch.pi)) * (x + 0.044715 * torch.pow(x, 3))))


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same arguments, no state) whose training pass runs ``ops.dropout`` on a fused backend.

    The fused kernel derives its mask from one seed per call instead of a Bernoulli tensor drawn
    element by element (on a 2-core CPU 0.27 ms against 3.5 ms for a 2 x 256 x 768 activation),
    and its backward regenerates the mask.  Backend ``"torch"``, eval mode, ``p == 0`` and ``inplace`` keep
    ``nn.Dropout``'s own forward, so the reference's numbers (its torch.manual_seed masks) hold there.
    """

    def forward(self, x):
        if self.training and self.p > 0 and not self.inplace and x.dtype in _FUSED_OP_DTYPES:
            name, dropout = ops.resolve("dropout", x.device, (x,), {"training": True})
            if name != "torch":
                return dropout(x, self.p, training=True)
        return super().forward(x)


class FeedForward(nn.Module):
    """Position-wise MLP: expand 4x, GELU, project back."""

    new_activation = GELU  # a factory, so the fast variant can swap in PyTorch's GELU

    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg["emb_dim"], 4 * cfg["emb_dim"]),
            self.new_activation(),
            nn.Linear(4 * cfg["emb_dim"], cfg["emb_dim"]),
        )

    def forward(self, x):
        layers = self.layers
        if type(layers) is not nn.Sequential or len(layers) != 3 or not runs_own_forward(layers):
            return layers(x)  # changed by the user: run it as it now is
        expand, activation, project = layers
        return apply_linear(project, activation(apply_linear(expand, x)))


class TransformerBlock(PreNormBlock):
    """Pre-norm block: x + drop(attn(norm1(x))), then x + drop(ff(norm2(x)))."""

    attention_class = MultiHeadAttention

    def __init__(self, cfg):
        emb_dim = cfg["emb_dim"]
        super().__init__(
            self.attention_class(d_in=emb_dim, d_out=emb_dim, context_length=cfg["context_length"],
                                 num_heads=cfg["n_heads"], dropout=cfg["drop_rate"], qkv_bias=cfg["qkv_bias"]),
            FeedForward(cfg),
            lambda: LayerNorm(emb_dim))
        self.drop_resid = Dropout(cfg["drop_rate"])

    def forward(self, x):
        return residual_block(self, x, self.att)


class _GPTBackbone(nn.Module):
    """Token + position embeddings, ``n_layers`` blocks of ``block_class``, a final ``norm_class``, untied head."""

    block_class = TransformerBlock
    norm_class = LayerNorm

    def __init__(self, cfg):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[self.block_class(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = self.norm_class(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def embed(self, in_idx, start_pos: int = 0):
        """Token plus position embeddings for positions ``start_pos ...``, with embedding dropout."""
        if in_idx.dim() != 2:
            raise ValueError(f"in_idx must be (batch, tokens), got shape {tuple(in_idx.shape)}")
        positions = torch.arange(start_pos, start_pos + in_idx.shape[1], device=in_idx.device)
        return self.drop_emb(self.tok_emb(in_idx) + self.pos_emb(positions))

    def hidden_states(self, in_idx):
        """Final-norm hidden states ``(b, t, emb_dim)``: everything but the output head."""
        return self.final_norm(self.trf_blocks(self.embed(in_idx)))

    def forward(self, in_idx):
        return apply_linear(self.out_head, self.hidden_states(in_idx))


class GPTModel(_GPTBackbone):
    """GPT-2-style decoder: token + position embeddings, ``n_layers`` blocks, final norm, untied head."""


# The reference's speed-oriented variants, kept under the same names.


class FeedForwardFast(FeedForward):
    """``FeedForward`` with PyTorch's built-in tanh GELU."""

    new_activation = functools.partial(nn.GELU, approximate="tanh")


class TransformerBlockFast(nn.Module):
    """``TransformerBlock`` with built-in LayerNorm, fused qkv attention and built-in GELU."""

    def __init__(self, cfg):
        super().__init__()
        self.att = PyTorchMultiHeadAttention(
            d_in=cfg["emb_dim"], d_out=cfg["emb_dim"], num_heads=cfg["n_heads"],
            dropout=cfg["drop_rate"], qkv_bias=cfg["qkv_bias"])
        self.ff = FeedForwardFast(cfg)
        self.norm1 = nn.LayerNorm(cfg["emb_dim"])
        self.norm2 = nn.LayerNorm(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x):
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPTModelFast(_GPTBackbone):
    """``GPTModel`` built from the fast blocks (same embeddings and head) and PyTorch's LayerNorm."""

    block_class = TransformerBlockFast
    norm_class = nn.LayerNorm
