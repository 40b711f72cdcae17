"""Top-k / temperature sampling above the kernels, for every fused backend (cpu, cuda, triton).

The kernel is one torch op with one schema in each namespace (csrc/schemas.h)::

    sample_next_token(logits, temperature, temperature_value, top_k, top_k_value, generator) -> (B, 1) int64

The one convention for scalar versus per-row arguments lives here: a per-row tensor goes
in ``temperature`` / ``top_k`` (its scalar slot then unused), a number goes in the
``*_value`` slot with the tensor ``None``; "no top-k" is ``top_k_value = V`` (keep all).
The random numbers come from ``generator`` (or torch's default generator on the
logits' device); greedy calls leave the generator untouched on cpu and triton.
"""

from __future__ import annotations

import torch

from ._dispatch import kernels, register_fake


def _fake_sample_next_token(logits, temperature, temperature_value, top_k, top_k_value, generator):
    return logits.new_empty((logits.shape[0], 1), dtype=torch.int64)


def register(namespace: str) -> None:
    """Register the fake impl of ``namespace::sample_next_token`` (C++ ops; a Triton op's fake is its body)."""
    register_fake(f"{namespace}::sample_next_token", _fake_sample_next_token)


def kernel_arguments(logits, temperature, top_k):
    """``(temperature, temperature_value, top_k, top_k_value)`` as the kernels take them."""
    if isinstance(temperature, torch.Tensor):
        temperature, temperature_value = temperature, 0.0
    else:
        temperature, temperature_value = None, float(temperature)
    vocab = logits.shape[-1]
    if isinstance(top_k, torch.Tensor):
        top_k, top_k_value = top_k, vocab
    else:
        top_k, top_k_value = None, vocab if top_k is None else int(top_k)
    return temperature, temperature_value, top_k, top_k_value


def fused_sample_next_token(ops, logits, *, temperature=0.0, top_k=None, generator=None):
    """One token per row of ``logits`` on ``ops``' kernel (a namespace name such as ``"gptfast_cpu"``).

    Same contract as ``gptfast.ops.sample_next_token``; arguments already validated and
    normalised (per-row tensors float32 / int64 of shape ``(B,)``).
    """
    return kernels(ops).sample_next_token(logits, *kernel_arguments(logits, temperature, top_k), generator)
