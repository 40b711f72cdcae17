"""Qwen3 (0.6B ... 32B and the 30B-A3B mixture of experts) as a drop-in for ``llms_from_scratch.qwen3``.

Built from :mod:`gptfast.models.layers` under the drop-in contract stated there.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn as nn

from .. import ops
from . import layers
from .blocks import PreNormBlock, apply_linear
from .hub import download_from_huggingface, download_from_huggingface_from_snapshots, hf_blocks_to_fill, load_tensor_into
from .layers import FeedForward

__all__ = [
    "QWEN_CONFIG_06_B", "QWEN3_CONFIG_1_7B", "QWEN3_CONFIG_4B", "QWEN3_CONFIG_8B", "QWEN3_CONFIG_14B",
    "QWEN3_CONFIG_32B", "QWEN3_CONFIG_30B_A3B", "Qwen3Model", "TransformerBlock", "FeedForward", "MoEFeedForward",
    "GroupedQueryAttention", "compute_rope_params", "apply_rope", "RMSNorm", "load_weights_into_qwen",
    "Qwen3Tokenizer", "download_from_huggingface", "download_from_huggingface_from_snapshots",
]


def _dense_config(emb_dim, n_heads, n_layers, hidden_dim):
    return {
        "vocab_size": 151_936,
        "context_length": 40_960,
        "emb_dim": emb_dim,
        "n_heads": n_heads,
        "n_layers": n_layers,
        "hidden_dim": hidden_dim,
        "head_dim": 128,
        "qk_norm": True,
        "n_kv_groups": 8,
        "rope_base": 1_000_000.0,
        "dtype": torch.bfloat16,
    }


QWEN_CONFIG_06_B = _dense_config(emb_dim=1024, n_heads=16, n_layers=28, hidden_dim=3072)
QWEN3_CONFIG_1_7B = _dense_config(emb_dim=2048, n_heads=16, n_layers=28, hidden_dim=6144)
QWEN3_CONFIG_4B = _dense_config(emb_dim=2560, n_heads=32, n_layers=36, hidden_dim=9728)
QWEN3_CONFIG_8B = _dense_config(emb_dim=4096, n_heads=32, n_layers=36, hidden_dim=12288)
QWEN3_CONFIG_14B = _dense_config(emb_dim=5120, n_heads=40, n_layers=40, hidden_dim=17408)
QWEN3_CONFIG_32B = _dense_config(emb_dim=5120, n_heads=64, n_layers=64, hidden_dim=25600)

# Mixture of experts: 128 experts, 8 routed per token (about 3B of 30B parameters active).
QWEN3_CONFIG_30B_A3B = {
    "vocab_size": 151_936,
    "context_length": 262_144,
    "emb_dim": 2048,
    "n_heads": 32,
    "n_layers": 48,
    "head_dim": 128,
    "qk_norm": True,
    "n_kv_groups": 4,
    "rope_base": 10_000_000.0,
    "dtype": torch.bfloat16,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 768,
}

_NORM_EPS = 1e-6


def compute_rope_params(head_dim, theta_base=10_000, context_length=4096, dtype=torch.float32):
    """RoPE ``(cos, sin)`` tables, each ``(context_length, head_dim)`` (no frequency scaling)."""
    return layers.rope_tables(head_dim, theta_base, context_length, None, dtype)


def rope_tables_for(cfg):
    """The ``(cos, sin)`` tables a Qwen3 model of config ``cfg`` holds."""
    head_dim = cfg.get("head_dim")
    if head_dim is None:
        head_dim = cfg["emb_dim"] // cfg["n_heads"]
    return compute_rope_params(head_dim=head_dim, theta_base=cfg["rope_base"], context_length=cfg["context_length"])


def apply_rope(x, cos, sin):
    """Rotate ``x`` ``(batch, heads, tokens, head_dim)`` by the first ``tokens`` rows of the tables."""
    return layers.apply_rope_at(x, cos, sin, 0)


class RMSNorm(nn.Module):
    """RMSNorm with a float32 ``scale`` (and optional ``shift``), computed in float32 when ``qwen3_compatible``."""

    def __init__(self, emb_dim, eps=1e-6, bias=False, qwen3_compatible=True):
        super().__init__()
        self.eps = eps
        self.qwen3_compatible = qwen3_compatible
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim)) if bias else None

    def fused_args(self, x):
        """``(weight, eps)`` with which :meth:`forward` calls ``ops.rms_norm`` on ``x``, or ``None`` when it computes
        otherwise."""
        takes_op = layers.rms_norm_takes_op(x, self.scale, self.eps, bias=self.shift, upcast=self.qwen3_compatible)
        return (self.scale, self.eps) if takes_op else None

    def forward(self, x):
        return layers.rms_norm(x, self.scale, self.eps, bias=self.shift, upcast=self.qwen3_compatible)


class GroupedQueryAttention(layers.RotaryGroupedAttention):
    """Grouped-query attention with optional RMSNorm of queries and keys (Qwen3's ``qk_norm``).

    ``forward(x, mask, cos, sin)``: the causal mask :class:`Qwen3Model` passes (or None)
    runs the fused op; another boolean mask (True = hidden) is applied as given, as
    the reference does.
    """

    def __init__(self, d_in, num_heads, num_kv_groups, head_dim=None, qk_norm=False, dtype=None):
        super().__init__()
        num_heads = layers.require_positive_int("num_heads", num_heads)
        num_kv_groups = layers.require_positive_int("num_kv_groups", num_kv_groups)
        layers.require_divisible("num_heads", num_heads, "num_kv_groups", num_kv_groups)
        self.num_heads = num_heads
        self.num_kv_groups = num_kv_groups
        self.group_size = num_heads // num_kv_groups
        if head_dim is None:
            layers.require_divisible("d_in", d_in, "num_heads", num_heads)
            head_dim = d_in // num_heads
        self.head_dim = layers.require_positive_int("head_dim", head_dim)
        self.d_out = num_heads * head_dim
        self.W_query = nn.Linear(d_in, self.d_out, bias=False, dtype=dtype)
        self.W_key = nn.Linear(d_in, num_kv_groups * head_dim, bias=False, dtype=dtype)
        self.W_value = nn.Linear(d_in, num_kv_groups * head_dim, bias=False, dtype=dtype)
        self.out_proj = nn.Linear(self.d_out, d_in, bias=False, dtype=dtype)
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, eps=_NORM_EPS)
            self.k_norm = RMSNorm(head_dim, eps=_NORM_EPS)
        else:
            self.q_norm = self.k_norm = None

    def normalize_qk(self, queries, keys):
        """RMSNorm of each query and key head when built with ``qk_norm``."""
        if self.q_norm is not None:
            queries = self.q_norm(queries)
        if self.k_norm is not None:
            keys = self.k_norm(keys)
        return queries, keys

    def forward(self, x, mask, cos, sin):
        return self._attend(x, mask, cos, sin)


class MoEFeedForward(nn.Module):
    """Mixture of SwiGLU experts: a linear router picks ``num_experts_per_tok`` experts per token.

    As in the reference, the experts are created on the ``meta`` device (no memory,
    no initial values) and get real tensors from :func:`load_weights_into_qwen`;
    running them before that is an error (the reference silently computes with
    uninitialised memory).
    With the ``"torch"`` backend every expert runs on every token and the weighted
    sum is the reference's, bitwise; otherwise each expert runs only on the tokens
    routed to it (same result up to rounding, ``num_experts_per_tok / num_experts``
    of the work).
    """

    def __init__(self, cfg):
        super().__init__()
        self.num_experts_per_tok = layers.require_positive_int("num_experts_per_tok", cfg["num_experts_per_tok"])
        self.num_experts = layers.require_positive_int("num_experts", cfg["num_experts"])
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) must not exceed "
                             f"num_experts ({self.num_experts})")
        emb, hidden, dtype = cfg["emb_dim"], cfg["moe_intermediate_size"], cfg["dtype"]
        self.gate = nn.Linear(emb, self.num_experts, bias=False, dtype=dtype)
        meta = torch.device("meta")  # no memory until the checkpoint's tensors are loaded

        def experts(d_in, d_out):
            return nn.ModuleList(
                [nn.Linear(d_in, d_out, bias=False, dtype=dtype, device=meta) for _ in range(self.num_experts)])

        self.fc1 = experts(emb, hidden)
        self.fc2 = experts(emb, hidden)
        self.fc3 = experts(hidden, emb)

    def expert(self, e, x):
        """Expert ``e``'s SwiGLU MLP applied to ``x``."""
        fc1, fc2, fc3 = self.fc1[e], self.fc2[e], self.fc3[e]
        if not x.is_meta and any(_on_meta(m) for m in (fc1, fc2, fc3)):
            # A real input times a meta weight returns uninitialised memory, not an error.
            raise RuntimeError(
                f"expert {e} of MoEFeedForward has no weights yet (experts are created on the meta device); "
                "load a checkpoint with load_weights_into_qwen first")
        return fc3(layers.swiglu(fc1(x), fc2(x)))

    def forward(self, x):
        scores = self.gate(x)
        topk_scores, topk_indices = torch.topk(scores, self.num_experts_per_tok, dim=-1)
        topk_probs = torch.softmax(topk_scores, dim=-1)
        if ops.get_backend() == "torch" or x.is_meta:
            mix = layers.dense_expert_mixture
        else:
            mix = layers.routed_expert_mixture
        return mix(x, topk_probs, topk_indices, self.num_experts, self.expert)


def _on_meta(module) -> bool:
    """True when ``module`` holds meta-device weights: its ``weight``, or for a module without one (an expert
    the user wrapped, LoRA say) any parameter."""
    weight = module.__dict__.get("_parameters", {}).get("weight")
    if weight is not None:
        return weight.is_meta
    return any(p.is_meta for p in module.parameters())


class TransformerBlock(PreNormBlock):
    """Pre-norm block: ``x + att(norm1(x))``, then ``x + ff(norm2(x))`` (``ff`` a mixture when ``num_experts > 0``)."""

    attention_class = GroupedQueryAttention

    def __init__(self, cfg):
        emb_dim = cfg["emb_dim"]
        super().__init__(
            self.attention_class(d_in=emb_dim, num_heads=cfg["n_heads"], head_dim=cfg.get("head_dim"),
                                 num_kv_groups=cfg["n_kv_groups"], qk_norm=cfg["qk_norm"], dtype=cfg["dtype"]),
            MoEFeedForward(cfg) if cfg.get("num_experts", 0) > 0 else FeedForward(cfg),
            lambda: RMSNorm(emb_dim, eps=_NORM_EPS))

    def forward(self, x, mask, cos, sin):
        x = self.att(self.norm1(x), mask, cos, sin) + x
        return self.ff(self.norm2(x)) + x


class Qwen3Model(nn.Module):
    """Qwen3 decoder; ``forward(in_idx)`` returns logits ``(batch, tokens, vocab_size)``."""

    block_class = TransformerBlock

    def __init__(self, cfg):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"], dtype=cfg["dtype"])
        self.trf_blocks = nn.ModuleList([self.block_class(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = RMSNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False, dtype=cfg["dtype"])
        cos, sin = rope_tables_for(cfg)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.cfg = cfg

    def hidden_states(self, in_idx):
        """Final-norm hidden states ``(b, t, emb_dim)`` in the config's dtype: everything but the output head."""
        rows = layers.embedding_rows(self.tok_emb, self.cfg["vocab_size"])
        layers.check_token_ids(in_idx, rows, self.cos.shape[0])
        x = self.tok_emb(in_idx)
        # The reference's causal mask, which gptfast's attention recognises (the fused op stands in for it).
        mask = layers.causal_mask(x.shape[1], x.shape[1], x.device)
        for block in self.trf_blocks:
            x = block(x, mask, self.cos, self.sin)
        return self.final_norm(x).to(self.cfg["dtype"])

    def forward(self, in_idx):
        return apply_linear(self.out_head, self.hidden_states(in_idx))


# ----------------------------------------------------------------------------- weights


_SWIGLU_NAMES = (("fc1", "gate_proj"), ("fc2", "up_proj"), ("fc3", "down_proj"))


def load_weights_into_qwen(model, param_config, params):
    """Copy a Hugging Face Qwen3 state dict (``model.layers.N...`` names) into ``model``.

    ``params`` maps names to tensors (what ``safetensors.torch.load_file`` returns);
    ``param_config["n_layers"]`` says how many blocks to fill.  Mixture-of-experts
    blocks get their router and every expert (which leaves the meta device).
    Without ``lm_head.weight`` the output head gets a copy of the token embedding.
    """
    for block, prefix in hf_blocks_to_fill(model, param_config, params):
        att = block.att
        for module, name in ((att.W_query, "q_proj"), (att.W_key, "k_proj"), (att.W_value, "v_proj"),
                             (att.out_proj, "o_proj")):
            load_tensor_into(module, "weight", params, f"{prefix}.self_attn.{name}.weight")
        for norm, name in ((getattr(att, "q_norm", None), "q_norm"), (getattr(att, "k_norm", None), "k_norm")):
            if norm is not None:
                load_tensor_into(norm, "scale", params, f"{prefix}.self_attn.{name}.weight")
        load_tensor_into(block.norm1, "scale", params, f"{prefix}.input_layernorm.weight")
        if hasattr(block.ff, "gate"):  # mixture of experts: decided by the model, not param_config
            load_tensor_into(block.ff.gate, "weight", params, f"{prefix}.mlp.gate.weight")
            for e in range(len(block.ff.fc1)):
                for ours, theirs in _SWIGLU_NAMES:
                    load_tensor_into(getattr(block.ff, ours)[e], "weight", params,
                               f"{prefix}.mlp.experts.{e}.{theirs}.weight")
        else:
            for ours, theirs in _SWIGLU_NAMES:
                load_tensor_into(getattr(block.ff, ours), "weight", params, f"{prefix}.mlp.{theirs}.weight")
        load_tensor_into(block.norm2, "scale", params, f"{prefix}.post_attention_layernorm.weight")
    load_tensor_into(model.final_norm, "scale", params, "model.norm.weight")
    if "lm_head.weight" in params:
        load_tensor_into(model.out_head, "weight", params, "lm_head.weight")
    else:
        print("Model uses weight tying.")
        load_tensor_into(model.out_head, "weight", params, "model.embed_tokens.weight")


# ----------------------------------------------------------------------------- tokenizer


class Qwen3Tokenizer:
    """Qwen3's byte-level BPE from a Hugging Face ``tokenizer.json``, with its chat template.

    Special tokens (``<|im_start|>``, ``<think>`` ...) written in the text are always
    encoded as their single ids.  ``repo_id`` downloads the file when it is missing.
    """

    _SPECIALS = [
        "<|endoftext|>",
        "<|im_start|>", "<|im_end|>",
        "<|object_ref_start|>", "<|object_ref_end|>",
        "<|box_start|>", "<|box_end|>",
        "<|quad_start|>", "<|quad_end|>",
        "<|vision_start|>", "<|vision_end|>",
        "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
        "<think>", "</think>",
    ]
    _SPLIT_RE = re.compile(r"(<\|[^>]+?\|>|<think>|</think>)")

    def __init__(self, tokenizer_file_path="tokenizer.json", repo_id=None,
                 apply_chat_template=True, add_generation_prompt=False, add_thinking=False):
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise ImportError("Qwen3Tokenizer needs the 'tokenizers' package (pip install tokenizers)") from exc
        self.apply_chat_template = apply_chat_template
        self.add_generation_prompt = add_generation_prompt
        self.add_thinking = add_thinking

        tok_file = Path(tokenizer_file_path)
        if not tok_file.is_file() and repo_id:
            download_from_huggingface(repo_id=repo_id, filename=tok_file.name, local_dir=str(tok_file.parent))
        if not tok_file.is_file():
            raise FileNotFoundError(f"Qwen3 tokenizer file not found: {str(tok_file)!r} (a Hugging Face "
                                    "tokenizer.json; pass repo_id to download it)")
        try:
            self._tok = Tokenizer.from_file(str(tok_file))
        except Exception as exc:  # the tokenizers package raises a bare Exception for a file it cannot read
            raise ValueError(f"{str(tok_file)!r} is not a Hugging Face tokenizer.json: {exc}") from None
        self._special_to_id = {}
        for token in self._SPECIALS:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                self._special_to_id[token] = token_id
        if "<|endoftext|>" not in self._special_to_id:
            raise ValueError(f"{str(tok_file)!r} has no '<|endoftext|>' token: not a Qwen3 tokenizer.json")

        self.pad_token_id = self._special_to_id["<|endoftext|>"]
        self.eos_token_id = self.pad_token_id
        # Chat (non-"Base") checkpoints end a turn with <|im_end|>.
        eos_token = "<|im_end|>" if repo_id and "Base" not in repo_id else "<|endoftext|>"
        if eos_token in self._special_to_id:
            self.eos_token_id = self._special_to_id[eos_token]

    def encode(self, text, chat_wrapped=None):
        """Token ids of ``text`` (wrapped in the chat template unless ``chat_wrapped`` is false)."""
        if chat_wrapped is None:
            chat_wrapped = self.apply_chat_template
        stripped = text.strip()
        if stripped in self._special_to_id and "\n" not in stripped:
            return [self._special_to_id[stripped]]
        if chat_wrapped:
            text = self._wrap_chat(text)
        ids = []
        for part in self._SPLIT_RE.split(text):
            if not part:
                continue
            if part in self._special_to_id:
                ids.append(self._special_to_id[part])
            else:
                ids.extend(self._tok.encode(part).ids)
        return ids

    def decode(self, ids):
        return self._tok.decode(ids, skip_special_tokens=False)

    def _wrap_chat(self, user_msg):
        text = f"<|im_start|>user\n{user_msg}<|im_end|>\n"
        if self.add_generation_prompt:
            text += "<|im_start|>assistant"
            text += "\n" if self.add_thinking else "\n<think>\n\n</think>\n\n"
        return text
