"""Llama 3.2 (1B and 3B) as a drop-in for ``llms_from_scratch.llama3``.

The drop-in contract (names, signatures, creation order, bitwise logits with the
``"torch"`` backend) is the one stated in :mod:`gptfast.models.layers`, whose pieces
this model is built from.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from .. import ops
from ..tokenizer import read_tiktoken_ranks
from . import layers
from .blocks import PreNormBlock, apply_linear
from .hub import assign, hf_blocks_to_fill, load_tensor_into
from .layers import FeedForward, BuiltinRMSNorm

__all__ = [
    "LLAMA32_CONFIG_1B", "LLAMA32_CONFIG_3B", "Llama3Model", "TransformerBlock", "FeedForward",
    "GroupedQueryAttention", "compute_rope_params", "apply_rope", "Llama3Tokenizer", "ChatFormat", "clean_text",
    "GroupedQueryAttentionFast", "TransformerBlockFast", "Llama3ModelFast", "assign", "load_weights_into_llama",
]

_LLAMA3_ROPE_SCALING = {
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_context_length": 8192,
}

LLAMA32_CONFIG_1B = {
    "vocab_size": 128_256,
    "context_length": 131_072,
    "emb_dim": 2048,
    "n_heads": 32,
    "n_layers": 16,
    "hidden_dim": 8192,
    "n_kv_groups": 8,
    "rope_base": 500_000.0,
    "dtype": torch.bfloat16,
    "rope_freq": dict(_LLAMA3_ROPE_SCALING),
}

LLAMA32_CONFIG_3B = {
    "vocab_size": 128_256,
    "context_length": 131_072,
    "emb_dim": 3072,
    "n_heads": 24,
    "n_layers": 28,
    "hidden_dim": 8192,
    "n_kv_groups": 8,
    "rope_base": 500_000.0,
    "dtype": torch.bfloat16,
    "rope_freq": dict(_LLAMA3_ROPE_SCALING),
}

_NORM_EPS = 1e-5


def compute_rope_params(head_dim, theta_base=10_000, context_length=4096, freq_config=None, dtype=torch.float32):
    """RoPE ``(cos, sin)`` tables, each ``(context_length, head_dim)``, with optional Llama 3 frequency scaling."""
    return layers.rope_tables(head_dim, theta_base, context_length, freq_config, dtype)


def rope_tables_for(cfg):
    """The ``(cos, sin)`` tables a Llama 3 model of config ``cfg`` holds."""
    return compute_rope_params(head_dim=cfg["emb_dim"] // cfg["n_heads"], theta_base=cfg["rope_base"],
                               context_length=cfg["context_length"], freq_config=cfg["rope_freq"])


def apply_rope(x, cos, sin):
    """Rotate ``x`` ``(batch, heads, tokens, head_dim)`` by the first ``tokens`` rows of the tables."""
    return layers.apply_rope_at(x, cos, sin, 0)


# ----------------------------------------------------------------------------- attention


def _check_heads(d_out, num_heads, num_kv_groups):
    num_heads = layers.require_positive_int("num_heads", num_heads)
    num_kv_groups = layers.require_positive_int("num_kv_groups", num_kv_groups)
    layers.require_divisible("d_out", d_out, "num_heads", num_heads)
    layers.require_divisible("num_heads", num_heads, "num_kv_groups", num_kv_groups)
    return num_heads, num_kv_groups


class _LlamaAttentionBase(layers.RotaryGroupedAttention):
    """Projections shared by both attention variants (created in the reference's order)."""

    def __init__(self, d_in, d_out, num_heads, num_kv_groups, dtype=None):
        super().__init__()
        num_heads, num_kv_groups = _check_heads(d_out, num_heads, num_kv_groups)
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.W_key = nn.Linear(d_in, num_kv_groups * self.head_dim, bias=False, dtype=dtype)
        self.W_value = nn.Linear(d_in, num_kv_groups * self.head_dim, bias=False, dtype=dtype)
        self.num_kv_groups = num_kv_groups
        self.group_size = num_heads // num_kv_groups
        self.W_query = nn.Linear(d_in, d_out, bias=False, dtype=dtype)
        self.out_proj = nn.Linear(d_out, d_out, bias=False, dtype=dtype)


class GroupedQueryAttention(_LlamaAttentionBase):
    """Grouped-query attention: ``num_kv_groups`` key/value heads shared by ``num_heads`` query heads.

    ``forward(x, mask, cos, sin)``: the causal mask :class:`Llama3Model` passes (or None)
    runs the fused op; another boolean mask (True = hidden) is applied as given, cut to
    the number of tokens, as the reference does.
    """

    def forward(self, x, mask, cos, sin):
        num_tokens = x.shape[1]
        if not layers.is_causal_mask(mask, num_tokens, num_tokens):
            mask = mask[:num_tokens, :num_tokens]
        return self._attend(x, mask, cos, sin)


class GroupedQueryAttentionFast(_LlamaAttentionBase):
    """Causal grouped-query attention without a mask argument: ``forward(x, cos, sin)``.

    The reference runs PyTorch's ``scaled_dot_product_attention`` over k/v expanded to every
    query head; so does this under backend ``"torch"`` (bitwise the reference).  Otherwise it
    runs the same fused op as :class:`GroupedQueryAttention`, over the grouped k/v.
    """

    def forward(self, x, cos, sin):
        if ops.get_backend() != "torch":
            return self._attend(x, None, cos, sin)
        queries, keys, values = self.project_rotary(x, cos, sin)
        group = queries.shape[1] // keys.shape[1]
        out = torch.nn.functional.scaled_dot_product_attention(
            queries, layers.expand_kv_heads(keys, group), layers.expand_kv_heads(values, group), is_causal=True)
        return self.out_proj(layers.merge_heads(out))


# ----------------------------------------------------------------------------- blocks and models


class TransformerBlock(PreNormBlock):
    """Pre-norm block: ``x + att(norm1(x))``, then ``x + ff(norm2(x))``."""

    attention_class = GroupedQueryAttention

    def __init__(self, cfg):
        emb_dim, dtype = cfg["emb_dim"], cfg["dtype"]
        super().__init__(
            self.attention_class(d_in=emb_dim, d_out=emb_dim, num_heads=cfg["n_heads"],
                                 num_kv_groups=cfg["n_kv_groups"], dtype=dtype),
            FeedForward(cfg),
            lambda: BuiltinRMSNorm(emb_dim, eps=_NORM_EPS, dtype=dtype))

    def forward(self, x, mask, cos, sin):
        x = self.att(self.norm1(x), mask, cos, sin) + x
        return self.ff(self.norm2(x)) + x


class TransformerBlockFast(TransformerBlock):
    """:class:`TransformerBlock` with :class:`GroupedQueryAttentionFast`: ``forward(x, cos, sin)``."""

    attention_class = GroupedQueryAttentionFast

    def forward(self, x, cos, sin):
        x = self.att(self.norm1(x), cos, sin) + x
        return self.ff(self.norm2(x)) + x


class _Llama3Base(nn.Module):
    """Embedding, ``n_layers`` blocks, final RMSNorm, untied output head and the RoPE tables."""

    block_class = TransformerBlock

    def __init__(self, cfg):
        super().__init__()
        layers.require_divisible("emb_dim", cfg["emb_dim"], "n_heads", cfg["n_heads"])
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"], dtype=cfg["dtype"])
        self.trf_blocks = nn.ModuleList([self.block_class(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = BuiltinRMSNorm(cfg["emb_dim"], eps=_NORM_EPS, dtype=cfg["dtype"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False, dtype=cfg["dtype"])
        cos, sin = rope_tables_for(cfg)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.cfg = cfg

    def _run_blocks(self, x):
        raise NotImplementedError

    def hidden_states(self, in_idx):
        """Final-norm hidden states ``(b, t, emb_dim)`` in the config's dtype: everything but the output head."""
        rows = layers.embedding_rows(self.tok_emb, self.cfg["vocab_size"])
        layers.check_token_ids(in_idx, rows, self.cos.shape[0])
        x = self._run_blocks(self.tok_emb(in_idx))
        return self.final_norm(x).to(self.cfg["dtype"])

    def forward(self, in_idx):
        return apply_linear(self.out_head, self.hidden_states(in_idx))


class Llama3Model(_Llama3Base):
    """Llama 3 decoder; ``forward(in_idx)`` returns logits ``(batch, tokens, vocab_size)``."""

    block_class = TransformerBlock

    def _run_blocks(self, x):
        # The reference's causal mask, which gptfast's attention recognises (the fused op stands in for it).
        mask = layers.causal_mask(x.shape[1], x.shape[1], x.device)
        for block in self.trf_blocks:
            x = block(x, mask, self.cos, self.sin)
        return x


class Llama3ModelFast(_Llama3Base):
    """:class:`Llama3Model` built from :class:`TransformerBlockFast` (no mask argument anywhere)."""

    block_class = TransformerBlockFast

    def _run_blocks(self, x):
        for block in self.trf_blocks:
            x = block(x, self.cos, self.sin)
        return x


# ----------------------------------------------------------------------------- tokenizer


# Llama 3's pre-tokenizer split pattern (from Meta's tokenizer.json).
_LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)
_NAMED_SPECIALS = {
    "<|begin_of_text|>": 128000,
    "<|end_of_text|>": 128001,
    "<|start_header_id|>": 128006,
    "<|end_header_id|>": 128007,
    "<|eot_id|>": 128009,
}
_RESERVED_BASE, _RESERVED_COUNT = 128002, 256


def _llama3_special_tokens():
    special = dict(_NAMED_SPECIALS)
    taken = set(special.values())
    for i in range(_RESERVED_COUNT):
        if _RESERVED_BASE + i not in taken:
            special[f"<|reserved_{i}|>"] = _RESERVED_BASE + i
    return special


class Llama3Tokenizer:
    """Llama 3's tiktoken BPE (Meta's ``tokenizer.model``) plus its special-token ids."""

    def __init__(self, model_path):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"Llama 3 tokenizer file not found: {model_path!r} (Meta's 'tokenizer.model', a tiktoken BPE file)")
        import tiktoken

        self.special = _llama3_special_tokens()
        self.model = tiktoken.Encoding(
            name=Path(model_path).name,
            pat_str=_LLAMA3_SPLIT_PATTERN,
            mergeable_ranks=read_tiktoken_ranks(model_path),
            special_tokens=self.special,
        )

    def encode(self, text, bos=False, eos=False, **kwargs):
        """Token ids of ``text``, optionally framed by BOS/EOS ids.

        As in the reference, text spelling a special token raises tiktoken's ValueError;
        extra keyword arguments are accepted and ignored.
        """
        ids = [self.special["<|begin_of_text|>"]] if bos else []
        ids += self.model.encode(text)
        if eos:
            ids.append(self.special["<|end_of_text|>"])
        return ids

    def decode(self, ids):
        return self.model.decode(ids)


class ChatFormat:
    """Llama 3 instruct prompt: system and user turns, then an open assistant header."""

    def __init__(self, tokenizer: Llama3Tokenizer, *, default_system="You are a helpful assistant."):
        self.tok = tokenizer
        self.default_system = default_system

    def _header(self, role):
        """``<|start_header_id|>role<|end_header_id|>\\n\\n`` as ids."""
        special = self.tok.special
        return [special["<|start_header_id|>"], *self.tok.encode(role), special["<|end_header_id|>"],
                *self.tok.encode("\n\n")]

    def encode(self, user_message, system_message=None, allowed_special=None):
        system = system_message if system_message is not None else self.default_system
        eot = self.tok.special["<|eot_id|>"]
        ids = [self.tok.special["<|begin_of_text|>"]]
        ids += self._header("system") + self.tok.encode(system, allowed_special=allowed_special) + [eot]
        ids += self._header("user") + self.tok.encode(user_message) + [eot]
        ids += self._header("assistant")
        return ids

    def decode(self, ids):
        return self.tok.decode(ids)


def clean_text(text, header_end="assistant<|end_header_id|>\n\n"):
    """The text after the first ``header_end`` (stripped), or ``text`` unchanged if it has none."""
    index = text.find(header_end)
    if index == -1:
        return text
    return text[index + len(header_end):].strip()


# ----------------------------------------------------------------------------- weights


def load_weights_into_llama(model, param_config, params):
    """Copy a Hugging Face Llama 3 state dict (``model.layers.N...`` names) into ``model``.

    ``params`` maps names to tensors (what ``safetensors.torch.load_file`` returns);
    ``param_config["n_layers"]`` says how many blocks to fill.  Without
    ``lm_head.weight`` the output head gets a copy of the token embedding.
    """
    for block, prefix in hf_blocks_to_fill(model, param_config, params):
        for module, attr, name in (
            (block.att.W_query, "weight", "self_attn.q_proj.weight"),
            (block.att.W_key, "weight", "self_attn.k_proj.weight"),
            (block.att.W_value, "weight", "self_attn.v_proj.weight"),
            (block.att.out_proj, "weight", "self_attn.o_proj.weight"),
            (block.norm1, "weight", "input_layernorm.weight"),
            (block.ff.fc1, "weight", "mlp.gate_proj.weight"),
            (block.ff.fc2, "weight", "mlp.up_proj.weight"),
            (block.ff.fc3, "weight", "mlp.down_proj.weight"),
            (block.norm2, "weight", "post_attention_layernorm.weight"),
        ):
            load_tensor_into(module, attr, params, f"{prefix}.{name}")
    load_tensor_into(model.final_norm, "weight", params, "model.norm.weight")
    if "lm_head.weight" in params.keys():
        load_tensor_into(model.out_head, "weight", params, "lm_head.weight")
    else:
        load_tensor_into(model.out_head, "weight", params, "model.embed_tokens.weight")
        print("Model uses weight tying.")
