"""The generation entry points: the book's ``generate`` API, batches, streaming.

``generate`` / ``generate_text_simple`` / ``generate_stream`` keep the reference's
signatures and results; underneath, every step after the prompt runs one token
per row against a :class:`~gptfast.generation.cache.KVCache` and the output head
sees only the last position.  How the steps follow the reference exactly (windows
longer than the context, sampling on every row each step) is told once, in
:mod:`gptfast.generation.decoding`.

The cached logits differ from the uncached ones only by float rounding (other
matmul shapes), so greedy tokens agree except at exact near-ties.

:func:`generate_batch` takes prompts of different lengths with per-row
temperature, top-k and end-of-sequence ids and returns a :class:`GenerationResult`
(how prompts are prefilled and finished rows leave the cache: see the decoding
module).  :func:`stream_text` yields token ids with decoded text for the command line.

On CUDA (``cuda_graph=None`` means "on CUDA"), the decode step of the whole batch
is captured once as a CUDA graph with static shapes and replayed per token;
``dtype=torch.bfloat16`` decodes with a bf16 copy of the weights.  On CPU the steps
after the prompt run with torch's thread count or with one thread, whichever the
first steps time faster (see :class:`~gptfast.generation.decoding.DecodeThreads`).  Models without the book's
``GPTModel`` layout or a Llama 3 / Qwen3 decoder's fall back to the uncached loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from .cache import check_decodable, context_length, is_decodable
from .decoding import (INTEGER_DTYPES, Decoder, check_prompt_tokens, decoder_for_idx, model_device, require_int,
                       vocab_size)

__all__ = ["generate", "generate_text_simple", "generate_stream", "generate_batch", "stream_text",
           "GenerationResult", "TextChunk"]


# ----------------------------------------------------------------------------- the reference's API


def generate_stream(model, idx, max_new_tokens, context_size, temperature=0.0, top_k=None, eos_id=None,
                    generator=None, *, dtype=None, cuda_graph=None):
    """Yield the next token of every row, ``(B, 1)`` at a time, as ``generate`` produces them.

    Rows that have produced ``eos_id`` yield ``eos_id`` from then on (padding); the
    stream ends when every row has finished or after ``max_new_tokens`` steps.
    Arguments are checked when this is called, before the first token.
    """
    decoder = decoder_for_idx(model, idx, max_new_tokens, context_size, temperature, top_k, eos_id, generator,
                               dtype=dtype, cuda_graph=cuda_graph)
    return _iterate(decoder)


def _iterate(decoder):
    while (token := decoder.step()) is not None:
        yield token


def generate(model, idx, max_new_tokens, context_size, temperature=0.0, top_k=None, eos_id=None):
    """Generate up to ``max_new_tokens`` tokens after ``idx`` ``(B, T)``; returns ``(B, T + n)``.

    ``top_k`` keeps the k largest logits (ties included), ``temperature > 0`` samples
    from the softmax of the logits divided by it, ``temperature == 0`` is greedy.
    With ``eos_id`` a row stops at that token (which is not appended); in a batch the
    finished rows are padded with ``eos_id`` while the others go on, and generation
    ends once every row is done.  For one row this is exactly the reference.
    """
    decoder = decoder_for_idx(model, idx, max_new_tokens, context_size, temperature, top_k, eos_id, None)
    steps = sum(1 for _ in _iterate(decoder))
    if steps == 0:  # the reference's loop then returns its input itself, whatever its integer dtype
        return idx
    return torch.cat([idx, decoder.seq[:, idx.shape[1]:idx.shape[1] + steps]], dim=1)


def generate_text_simple(model, idx, max_new_tokens, context_size):
    """Greedy decoding: append the argmax token ``max_new_tokens`` times to ``idx`` ``(B, T)``."""
    return generate(model, idx, max_new_tokens, context_size)


# ----------------------------------------------------------------------------- batches and streaming


@dataclass
class GenerationResult:
    """Output of :func:`generate_batch`.

    ``tokens`` ``(B, L)``: each row's prompt followed by its new tokens, right-padded
    with ``pad_id``; ``lengths`` ``(B,)``: valid tokens per row; ``prompt_lengths``
    ``(B,)``; ``stopped_at_eos`` ``(B,)``: the row ended at its end-of-sequence id
    (which is not included) rather than at ``max_new_tokens``.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    prompt_lengths: torch.Tensor
    stopped_at_eos: torch.Tensor

    def row(self, i: int) -> torch.Tensor:
        """Prompt plus new tokens of row ``i``, without padding."""
        return self.tokens[i, :int(self.lengths[i])]

    def new_tokens(self, i: int) -> torch.Tensor:
        """Only the generated tokens of row ``i``."""
        return self.tokens[i, int(self.prompt_lengths[i]):int(self.lengths[i])]


def _id_tensor(name, values):
    """``values`` (a tensor or a sequence of ints) as a tensor, refusing non-integers instead of rounding them."""
    tensor = values if isinstance(values, torch.Tensor) else torch.as_tensor(list(values))
    if tensor.numel() == 0 and not isinstance(values, torch.Tensor):
        tensor = tensor.to(torch.long)  # an empty list is an empty prompt, reported as such below
    if tensor.dtype not in INTEGER_DTYPES:
        raise TypeError(f"{name} must hold integer token ids, got {tensor.dtype}")
    return tensor


def _as_prompts(prompts, device):
    """Prompts as a list of 1-D int64 tensors on ``device``: from a (B, T) tensor or a list of sequences."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise ValueError(f"prompts as a tensor must be (batch, tokens), got shape {tuple(prompts.shape)}")
        _id_tensor("prompts", prompts)
        rows = list(prompts)
    elif isinstance(prompts, (list, tuple)):
        rows = [_id_tensor(f"prompt {i}", p) for i, p in enumerate(prompts)]
    else:
        raise TypeError(f"prompts must be a (batch, tokens) tensor or a list of token-id sequences, "
                        f"got {type(prompts).__name__}")
    if not rows:
        raise ValueError("prompts must hold at least one prompt")
    for i, row in enumerate(rows):
        if row.dim() != 1 or row.shape[0] == 0:
            raise ValueError(f"prompt {i} must be a non-empty 1-D sequence of token ids, got shape "
                             f"{tuple(row.shape)}")
    return [row.to(device=device, dtype=torch.long) for row in rows]


def generate_batch(model, prompts, max_new_tokens, *, context_size=None, temperature=0.0, top_k=None, eos_id=None,
                   generator=None, pad_id=0, dtype=None, cuda_graph=None) -> GenerationResult:
    """Generate after prompts of different lengths, with per-row sampling settings.

    ``prompts``: a ``(B, T)`` tensor or a list of B token-id sequences of any lengths.
    ``temperature``, ``top_k`` and ``eos_id`` are each one value for all rows or one
    per row (``eos_id`` -1/None for a row without one).  A row stops at its eos id
    or after ``max_new_tokens``; ``context_size`` defaults to the model's context
    length.  ``dtype`` (e.g. ``torch.bfloat16``) decodes with converted weights;
    convert once with :func:`gptfast.generation.prepare_model` when calling often.
    Each row's tokens equal what running it alone gives, up to float rounding.
    """
    pad_id = _check_pad_id(pad_id)
    if not is_decodable(model) and context_size is None:
        raise TypeError("context_size is required for a model without the book's GPTModel layout or a Llama 3 / Qwen3 "
                        "decoder's")
    prompts = _as_prompts(prompts, model_device(model))
    for i, row in enumerate(prompts):
        check_prompt_tokens(f"prompt {i}", row, vocab_size(model))
    context_size = context_length(model) if context_size is None else context_size
    decoder = Decoder(model, prompts, max_new_tokens, context_size, temperature, top_k, eos_id, generator,
                       dtype=dtype, cuda_graph=cuda_graph)
    while decoder.step() is not None:
        pass
    return _result(decoder, pad_id)


def _check_pad_id(pad_id) -> int:
    """``pad_id`` as an int (a 0-d integer tensor too) that fits the int64 token tensor."""
    value = require_int("pad_id", pad_id, -2**63)
    if value >= 2**63:
        raise ValueError(f"pad_id must fit in int64, got {value}")
    return value


def _result(decoder, pad_id):
    counts = decoder.new_token_counts()
    lengths = [p + n for p, n in zip(decoder.prompt_lens, counts)]
    tokens = torch.full((decoder.batch, max(lengths)), pad_id, dtype=torch.long, device=decoder.device)
    for r, n in enumerate(lengths):
        tokens[r, :n] = decoder.seq[r, :n]
    return GenerationResult(tokens, torch.tensor(lengths), torch.tensor(decoder.prompt_lens),
                            torch.tensor(decoder.finished, dtype=torch.bool))


@dataclass(frozen=True)
class TextChunk:
    """One streamed token: its id and the text it completes ("" while a multi-byte character is split).

    If the stream ends inside a character, a last chunk with ``token_id=None``
    carries the remaining bytes as the tokenizer decodes them.
    """

    token_id: int | None
    text: str


def stream_text(model, prompt_ids, max_new_tokens, tokenizer, *, context_size=None, temperature=0.0, top_k=None,
                eos_id=None, generator=None, dtype=None) -> Iterator[TextChunk]:
    """Yield a :class:`TextChunk` per generated token of one prompt, as soon as it is sampled.

    ``prompt_ids``: a ``(1, T)`` tensor or a sequence of token ids; ``tokenizer``
    needs ``decode(list[int]) -> str`` (tiktoken's GPT-2 encoding).  Joining the
    chunks' text gives ``tokenizer.decode`` of all the new tokens: a chunk whose
    bytes end inside a UTF-8 character is held back and released with the next.
    """
    prompt_ids = _id_tensor("prompt_ids", prompt_ids)
    if prompt_ids.dim() == 1:
        prompt_ids = prompt_ids.unsqueeze(0)
    if prompt_ids.dim() != 2 or prompt_ids.shape[0] != 1:
        raise ValueError(f"prompt_ids must hold one prompt, got shape {tuple(prompt_ids.shape)}")
    if context_size is None:
        check_decodable(model)
        context_size = context_length(model)
    device = model_device(model) or prompt_ids.device
    stream = generate_stream(model, prompt_ids.to(device), max_new_tokens, context_size, temperature, top_k, eos_id,
                             generator, dtype=dtype)
    return _text_chunks(stream, tokenizer)


def _text_chunks(stream, tokenizer):
    pending: list[int] = []
    for token in stream:
        token_id = int(token[0, 0])
        pending.append(token_id)
        if _ends_inside_a_character(tokenizer, pending):  # wait for the rest of the character
            yield TextChunk(token_id, "")
            continue
        text = tokenizer.decode(pending)
        pending.clear()
        yield TextChunk(token_id, text)
    if pending:  # whatever never completed is shown as the tokenizer decodes it
        yield TextChunk(None, tokenizer.decode(pending))


def _ends_inside_a_character(tokenizer, ids) -> bool:
    """True when the bytes of ``ids`` end inside a UTF-8 character (a later token completes it).

    From the bytes where the tokenizer gives them (tiktoken's ``decode_bytes``): a decoded text ending
    in U+FFFD may be a real U+FFFD.  Other tokenizers are judged by that ending.
    """
    decode_bytes = getattr(tokenizer, "decode_bytes", None)
    if decode_bytes is None:
        return tokenizer.decode(ids).endswith("\ufffd")
    data = decode_bytes(ids)
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # the lead byte of the last character: does it need more bytes than follow?
            needed = 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4 if byte >> 3 == 0b11110 else 1
            return needed > back
    return False
