"""GPT model configurations: the book's training config, the four GPT-2 sizes and a test-size model."""

from __future__ import annotations

# GPT-2's BPE vocabulary (the last id is <|endoftext|>).
GPT2_VOCAB_SIZE = 50257

# Chapter 5 trains this config (GPT-2 124M shape, shorter context) on the-verdict.
GPT_CONFIG_124M = {
    "vocab_size": 50257,
    "context_length": 256,
    "emb_dim": 768,
    "n_heads": 12,
    "n_layers": 12,
    "drop_rate": 0.1,
    "qkv_bias": False,
}

# OpenAI's released sizes; loading their weights needs context 1024, qkv_bias True.
GPT2_SIZES = {
    "gpt2-small (124M)": {"emb_dim": 768, "n_layers": 12, "n_heads": 12},
    "gpt2-medium (355M)": {"emb_dim": 1024, "n_layers": 24, "n_heads": 16},
    "gpt2-large (774M)": {"emb_dim": 1280, "n_layers": 36, "n_heads": 20},
    "gpt2-xl (1558M)": {"emb_dim": 1600, "n_layers": 48, "n_heads": 25},
}

# Short names used by the command line and the training script.
MODEL_NAMES = {
    "gpt2": "gpt2-small (124M)",
    "gpt2-medium": "gpt2-medium (355M)",
    "gpt2-large": "gpt2-large (774M)",
    "gpt2-xl": "gpt2-xl (1558M)",
}

# A test-size model: same architecture, small enough for CI.
TINY_CONFIG = {
    "vocab_size": 50257,
    "context_length": 64,
    "emb_dim": 64,
    "n_heads": 4,
    "n_layers": 2,
    "drop_rate": 0.0,
    "qkv_bias": False,
}


def gpt2_config(size: str, **overrides) -> dict:
    """Full config for a GPT-2 size (``"gpt2"``, ``"gpt2-medium"`` ... or the long names)."""
    if size == "tiny":
        return {**TINY_CONFIG, **overrides}
    long_name = MODEL_NAMES.get(size, size)
    if long_name not in GPT2_SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {['tiny', *MODEL_NAMES]}")
    cfg = {**GPT_CONFIG_124M, "context_length": 1024, "qkv_bias": True, **GPT2_SIZES[long_name]}
    return {**cfg, **overrides}
