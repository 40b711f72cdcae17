"""Drop-in for ``llms_from_scratch.generate``: helpers for text generation outside the chapters."""

from __future__ import annotations

import numbers

__all__ = ["trim_input_tensor"]


def trim_input_tensor(input_ids_tensor, context_len, max_new_tokens):
    """The last tokens of ``input_ids_tensor`` ``(b, t)`` that leave room for ``max_new_tokens`` in ``context_len``.

    Keeps at most ``context_len - max_new_tokens`` (at least 1) tokens per row; a
    shorter input is returned as it is.  ``max_new_tokens`` must be smaller than
    ``context_len`` (the reference asserts it; here it is a ``ValueError``).
    """
    for name, value in (("context_len", context_len), ("max_new_tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if max_new_tokens >= context_len:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) must be smaller than context_len ({context_len})")
    if input_ids_tensor.dim() != 2:
        raise ValueError(f"input_ids_tensor must be (batch, tokens), got shape {tuple(input_ids_tensor.shape)}")
    keep = max(1, context_len - max_new_tokens)
    return input_ids_tensor[:, -keep:] if input_ids_tensor.shape[1] > keep else input_ids_tensor
