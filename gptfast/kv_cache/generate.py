"""Drop-in for ``llms_from_scratch.kv_cache.generate``: greedy generation with a KV cache.

For a model with the book's GPT layout (``gptfast.kv_cache.gpt2.GPTModel``, the
chapter-4 ``GPTModel`` of gptfast or of the reference) or a Llama 3 / Qwen3 decoder
(``kv_cache.llama3``, ``kv_cache.qwen3``, gptfast's or the reference's) the cached path is gptfast's
decoder (:mod:`gptfast.generation`): a static cache and the prompt's head on its last
position only.

Which tokens the cache holds follows the reference's cached loop wherever that loop
works.  Llama 3 / Qwen3: the prompt's last ``context_size`` tokens, then every new one
(the reference's stream: the whole prompt), even past ``context_size``, as long as the
model has positions; past the model's context length, where the reference's loop
fails, the window the uncached loop would see is recomputed each step.  GPT layout: the
reference's cached decode step fails, so once a sequence is longer than ``context_size``
the window is recomputed each step, and cached and uncached greedy output agree token
for token.

Any other model is driven through the book's protocol, as the reference does:
``model.reset_kv_cache()``, then ``model(ids, cache=cache)`` with a
:class:`gptfast.kv_cache.utils.KVCache`.
"""

from __future__ import annotations

import inspect

import torch

from ..generate import trim_input_tensor  # noqa: F401  (the reference re-exports it here)
from ..generation import api
from ..generation.cache import context_length, is_decodable, is_rotary
from ..generation.decoding import require_int
from .utils import KVCache
from .._star import with_reference_imports

__all__ = ["generate_text_simple", "generate_text_simple_stream", "trim_input_tensor", "KVCache"]


def generate_text_simple(model, idx, max_new_tokens, context_size=None, use_cache=True):
    """Append the argmax token ``max_new_tokens`` times to ``idx`` ``(b, t)``; returns ``(b, t + n)``.

    The model sees at most the last ``context_size`` tokens (default: its context
    length).  ``use_cache=False`` runs the whole window through the model each step.
    """
    model.eval()
    ctx_len = context_size or _default_context(model)
    max_new_tokens = require_int("max_new_tokens", max_new_tokens, 0)
    if not use_cache:
        return _uncached(model, idx, max_new_tokens, ctx_len)
    if is_decodable(model):
        _reset(model)
        if not is_rotary(model):
            return api.generate_text_simple(model, idx, max_new_tokens, ctx_len)
        out, position = reference_cached_generation(model, idx, max_new_tokens, ctx_len)
        _leave_position(model, position)
        return out
    return _protocol_cached(model, idx, max_new_tokens, ctx_len)


def generate_text_simple_stream(model, token_ids, max_new_tokens, eos_token_id=None, context_size=None):
    """Yield the argmax token ``(b, 1)`` of every row, one step at a time, with a KV cache.

    Stops after ``max_new_tokens`` tokens, or before yielding a step at which every
    row's token is ``eos_token_id``.  A Llama 3 / Qwen3 model starts from the whole
    prompt, as the reference's stream does (which takes ``context_size`` but does not
    use it), and slides a window only past the model's context length; a GPT-layout
    model slides it past ``context_size`` (default: the model's context length), as in
    :func:`generate_text_simple`.  ``max_new_tokens`` is checked when this is called;
    everything else, the model's evaluation mode and cache reset included, happens at
    the first ``next()``, as in the reference's generator, so a stream never started
    leaves the model as it was.
    """
    max_new_tokens = require_int("max_new_tokens", max_new_tokens, 0)
    return _until_eos(_stream(model, token_ids, max_new_tokens, context_size), eos_token_id)


def _stream(model, token_ids, max_new_tokens, context_size):
    """The stream's tokens; its body (model.eval(), the reset, the decoder) runs from the first next()."""
    model.eval()
    if is_decodable(model) and is_rotary(model):
        _reset(model)
        prompt, window = reference_cache_window(model, token_ids, max_new_tokens, None)
        tokens = _tracking_position(model, api.generate_stream(model, prompt, max_new_tokens, window), prompt.shape[1])
    elif is_decodable(model):
        _reset(model)
        tokens = api.generate_stream(model, token_ids, max_new_tokens, context_size or context_length(model))
    else:
        tokens = _protocol_stream(model, token_ids, max_new_tokens)
    yield from tokens


# ----------------------------------------------------------------------------- helpers


def reference_cache_window(model, idx, max_new_tokens, ctx_len):
    """``(prompt, context_size)`` for gptfast's decoder to run the reference's cached loop on a Llama 3 / Qwen3
    ``model``: the last ``ctx_len`` tokens of ``idx`` (``None``: all of them) go into the cache, and every new
    token joins them, past ``ctx_len`` too, while the model has positions.  Only past the model's context length
    (where the reference's loop fails, or reuses its last RoPE position) does the window slide, at that length.
    A ``ctx_len`` beyond the model's positions is passed on as it is: the decoder refuses it if the sequences
    would outgrow the model."""
    if ctx_len is not None:
        ctx_len = require_int("context_size", ctx_len, 1)
    prompt = idx if ctx_len is None else idx[:, -ctx_len:]
    limit = context_length(model)
    if ctx_len is not None and ctx_len > limit:
        return prompt, ctx_len
    return prompt, max(1, min(limit, prompt.shape[1] + max_new_tokens))


def reference_cached_generation(model, idx, max_new_tokens, ctx_len):
    """Greedy tokens ``(b, t + n)`` of gptfast's decoder caching what the reference's cached loop caches
    (:func:`reference_cache_window`), and the position that loop ends at (its ``current_pos``)."""
    prompt, window = reference_cache_window(model, idx, max_new_tokens, ctx_len)
    out = api.generate_text_simple(model, prompt, max_new_tokens, window)
    cut = idx[:, :idx.shape[1] - prompt.shape[1]].to(out.device)  # the tokens the cache never saw
    return torch.cat([cut, out], dim=1), prompt.shape[1] + max_new_tokens


def _until_eos(tokens, eos_token_id):
    for next_token in tokens:
        if eos_token_id is not None and torch.all(next_token == eos_token_id):
            return
        yield next_token


def _default_context(model) -> int:
    """``model.cfg["context_length"]`` as the reference reads it, else the position-embedding rows."""
    cfg = getattr(model, "cfg", None)
    if isinstance(cfg, dict) and "context_length" in cfg:
        return cfg["context_length"]
    if isinstance(getattr(model, "pos_emb", None), torch.nn.Embedding):
        return context_length(model)
    raise TypeError(f"context_size is required: {type(model).__name__} has neither cfg['context_length'] "
                    "nor a pos_emb")


def _reset(model):
    """Start a new sequence on models that track their position (the reference's GPT-2 lacks reset_kv_cache)."""
    reset = getattr(model, "reset_kv_cache", None)
    if callable(reset):
        reset()
    elif isinstance(getattr(model, "current_pos", None), int):
        model.current_pos = 0


def _leave_position(model, position):
    """Set an integer ``model.current_pos`` to where the reference's loop leaves it (the prompt's window, then one
    call per new token).  Only for Llama 3 / Qwen3 models: their cache is an object of the call, gone afterwards
    in the reference too, while the GPT-2 cache model keeps its cache in its blocks, which gptfast's decoder
    does not fill (its position stays at the start, consistent with its empty cache)."""
    if isinstance(getattr(model, "current_pos", None), int):
        model.current_pos = position


def _tracking_position(model, tokens, start):
    """``tokens``, with ``model.current_pos`` kept where the reference's stream keeps it: ``start`` once the prompt
    ran, one more each time the stream resumes after a token (its cached call for that token)."""
    _leave_position(model, start)  # (the body runs from the first next(), when the reference runs the prompt)
    for token in tokens:
        yield token
        start += 1
        _leave_position(model, start)


def _uncached(model, idx, max_new_tokens, ctx_len):
    """The reference's uncached loop: the last ``ctx_len`` tokens through the model each step."""
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(idx[:, -ctx_len:])
            idx = torch.cat([idx, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    return idx


def _cached_call(model):
    """``model(ids, cache=...)``, adding ``use_cache=True`` for models whose forward needs it (GPT-2's)."""
    if "use_cache" in inspect.signature(model.forward).parameters:
        return lambda ids, cache: model(ids, use_cache=True, cache=cache)
    return lambda ids, cache: model(ids, cache=cache)


def _protocol_stream(model, token_ids, max_new_tokens, ctx_len=None):
    """The book's cached loop for models outside the book's GPT layout: one token per step after the prompt."""
    cfg = getattr(model, "cfg", None)
    cache = KVCache(n_layers=cfg["n_layers"] if isinstance(cfg, dict) else len(model.trf_blocks))
    _reset(model)
    call = _cached_call(model)
    # no_grad around each call only: a ``with`` spanning a ``yield`` would leak into the caller's code.
    with torch.no_grad():
        logits = call(token_ids if ctx_len is None else token_ids[:, -ctx_len:], cache)
    for step in range(max_new_tokens):
        next_token = logits[:, -1].argmax(dim=-1, keepdim=True)
        yield next_token
        if step + 1 < max_new_tokens:  # the reference runs one more, unused, step here
            with torch.no_grad():
                logits = call(next_token, cache)


def _protocol_cached(model, idx, max_new_tokens, ctx_len):
    new = list(_protocol_stream(model, idx, max_new_tokens, ctx_len))
    return torch.cat([idx, *new], dim=1)


# The names a star import of the reference's module also gives (see gptfast/_star.py).
__all__, __getattr__, __dir__ = with_reference_imports(__name__, __all__, {
    "torch": "torch",
})
