"""Text generation with a static KV cache.

* ``api``: the entry points: the book's ``generate`` / ``generate_text_simple``, ``generate_stream``,
  ``generate_batch`` (prompts of different lengths, per-row settings) and ``stream_text`` (decoded text);
* ``decoding``: the decoding loop (:class:`~gptfast.generation.decoding.Decoder`): arguments checked once per
  call, prefill, per-row decode, sliding windows, sampling through ``gptfast.ops``;
* ``runner``: the cached forward passes, one block loop (the model's own block formula) for prefill and decode;
* ``cache``: the preallocated :class:`KVCache`;
* ``cuda_graphs``: the decode step captured as a CUDA graph, and the store of captured steps.
"""

from .api import (GenerationResult, TextChunk, generate, generate_batch, generate_stream, generate_text_simple,
                  stream_text)
from .cache import KVCache, check_decodable, context_length, prepare_model
from .cuda_graphs import CUDAGraphDecoder, clear_cuda_graphs
from .runner import CachedRunner, masked_decode_attention

__all__ = ["generate", "generate_text_simple", "generate_stream", "generate_batch", "stream_text",
           "GenerationResult", "TextChunk", "clear_cuda_graphs", "KVCache", "CachedRunner", "CUDAGraphDecoder",
           "masked_decode_attention", "prepare_model", "check_decodable", "context_length"]
