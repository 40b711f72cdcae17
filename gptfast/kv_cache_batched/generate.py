"""Drop-in for ``llms_from_scratch.kv_cache_batched.generate``: greedy generation for a batch, with a KV cache.

For a Llama 3 / Qwen3 decoder (:mod:`gptfast.kv_cache_batched.qwen3`'s, the other
gptfast variants, or the reference's) the cached path is gptfast's decoder
(:mod:`gptfast.generation`): a static cache holding one key/value head per group,
the prompt's head on its last position only, one token per row per step.  The cache
holds what the reference's cached loop holds: each row's last ``context_size`` prompt
tokens, then every new token, past ``context_size`` too.  Only past the model's
context length (where the reference's loop silently reuses its last RoPE position) is
the window the uncached loop would see recomputed each step.  Rows are the caller's:
prompts of different lengths are left-padded by the caller, as with the reference, and
the pad tokens are attended like any other.  Afterwards ``model.current_pos`` is where
the reference leaves it.

Any other model is driven through the reference's protocol:
``model.reset_kv_cache(batch_size)``, then ``model(ids, cache=cache, start_pos=...)``
with a :class:`gptfast.kv_cache_batched.utils.KVCache`.  So is a batched Qwen3 model
with 16-bit weights under backend ``"torch"``: its RoPE keeps queries and keys in
float32 (the reference's), which the decoder's cache, in the weights' dtype, would
round; the protocol gives the reference's tokens bitwise.
"""

from __future__ import annotations

import torch

from .. import ops
from ..generate import trim_input_tensor  # noqa: F401  (the reference re-exports it here)
from ..generation import api
from ..generation.cache import context_length, is_decodable, is_rotary
from ..generation.decoding import check_idx, require_int
from ..kv_cache.generate import reference_cached_generation
from ..models.qwen3_batched import rotates_in_float32
from .utils import KVCache
from .._star import with_reference_imports

__all__ = ["generate_text_simple", "trim_input_tensor", "KVCache"]


def generate_text_simple(model, idx, max_new_tokens, context_size=None, use_cache=True):
    """Append the argmax token of every row ``max_new_tokens`` times to ``idx`` ``(b, t)``; returns ``(b, t + n)``.

    The model sees at most the last ``context_size`` tokens of a row (default:
    ``model.cfg["context_length"]``).  ``use_cache=False`` runs the whole window each step.
    """
    model.eval()
    ctx_len = context_size or model.cfg["context_length"]
    check_idx(idx, model)
    max_new_tokens = require_int("max_new_tokens", max_new_tokens, 0)
    if not use_cache:
        return _uncached(model, idx, max_new_tokens, ctx_len)
    if is_decodable(model) and not (ops.get_backend() == "torch" and rotates_in_float32(model)):
        if not is_rotary(model):
            return api.generate_text_simple(model, idx, max_new_tokens, ctx_len)
        out, position = reference_cached_generation(model, idx, max_new_tokens, ctx_len)
        _leave_positions(model, idx, position)
        return out
    return _protocol_cached(model, idx, max_new_tokens, ctx_len)


def _leave_positions(model, idx, position):
    """Set ``model.current_pos`` (when the model tracks it per row) to where the reference's loop leaves it."""
    reset = getattr(model, "reset_kv_cache", None)
    if callable(reset) and hasattr(model, "current_pos"):
        try:
            reset(batch_size=idx.shape[0], device=idx.device)
        except TypeError:  # a model whose reset takes no batch size (the unbatched KV-cache variants)
            return
        model.current_pos += position


def _uncached(model, idx, max_new_tokens, ctx_len):
    """The reference's uncached loop: each row's last ``ctx_len`` tokens through the model each step."""
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(idx[:, -ctx_len:], cache=None, start_pos=None)
            idx = torch.cat([idx, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    return idx


def _protocol_cached(model, idx, max_new_tokens, ctx_len):
    """The reference's cached loop for models gptfast's decoder cannot walk (no unused last step).

    Past the model's positions, where the reference's RoPE reuses its last angle, the window slides as in
    :func:`reference_cache_window`: each step runs the last ``context_length`` tokens without the cache.
    """
    batch = idx.shape[0]
    limit = context_length(model)
    cache = KVCache(n_layers=model.cfg["n_layers"], batch_size=batch)
    model.reset_kv_cache(batch_size=batch, device=idx.device)
    with torch.no_grad():
        input_ids = idx[:, -ctx_len:]
        logits = model(input_ids, cache=cache, start_pos=model.current_pos.clone())
        model.current_pos += input_ids.shape[1]
        for step in range(max_new_tokens):
            next_token = logits[:, -1].argmax(dim=-1, keepdim=True)
            idx = torch.cat([idx, next_token], dim=1)
            if step + 1 < max_new_tokens:
                if int(model.current_pos.max()) < limit:
                    logits = model(next_token, cache=cache, start_pos=model.current_pos.clone())
                else:  # no position left for the new token: the window slides
                    logits = model(idx[:, -limit:], cache=None, start_pos=None)
            model.current_pos += 1
    return idx


# The names a star import of the reference's module also gives (see gptfast/_star.py).
__all__, __getattr__, __dir__ = with_reference_imports(__name__, __all__, {
    "torch": "torch",
})
