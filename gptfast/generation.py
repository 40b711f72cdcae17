"""Text generation: greedy (chapter 4) and top-k / temperature sampling (chapter 5)."""

from __future__ import annotations

import torch

from . import ops


def generate_text_simple(model, idx, max_new_tokens, context_size):
    """Greedy decoding: append the argmax token ``max_new_tokens`` times to ``idx`` ``(B, T)``."""
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(idx[:, -context_size:])[:, -1, :]
        idx = torch.cat((idx, torch.argmax(logits, dim=-1, keepdim=True)), dim=1)
    return idx


def generate_stream(model, idx, max_new_tokens, context_size, temperature=0.0, top_k=None, eos_id=None,
                    generator=None):
    """Yield the next token of every row, ``(B, 1)`` at a time, as ``generate`` produces them.

    Rows that have produced ``eos_id`` yield ``eos_id`` from then on (padding); the
    stream ends when every row has finished or after ``max_new_tokens`` steps.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(f"idx must be a non-empty (batch, tokens) tensor, got shape {tuple(idx.shape)}")
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(idx[:, -context_size:])[:, -1, :]
        next_token = ops.sample_next_token(logits, temperature=temperature, top_k=top_k, generator=generator)
        if eos_id is not None:
            finished |= next_token.squeeze(1) == eos_id
            if bool(finished.all()):
                return
            next_token = next_token.masked_fill(finished.unsqueeze(1), eos_id)
        idx = torch.cat((idx, next_token), dim=1)
        yield next_token


def generate(model, idx, max_new_tokens, context_size, temperature=0.0, top_k=None, eos_id=None):
    """Generate up to ``max_new_tokens`` tokens after ``idx`` ``(B, T)``; returns ``(B, T + n)``.

    ``top_k`` keeps the k largest logits (ties included), ``temperature > 0`` samples
    from the softmax of the logits divided by it, ``temperature == 0`` is greedy.
    With ``eos_id`` a row stops at that token (which is not appended); in a batch the
    finished rows are padded with ``eos_id`` while the others go on, and generation
    ends once every row is done.  For one row this is exactly the reference.
    """
    new_tokens = list(generate_stream(model, idx, max_new_tokens, context_size, temperature, top_k, eos_id))
    return torch.cat([idx, *new_tokens], dim=1) if new_tokens else idx
