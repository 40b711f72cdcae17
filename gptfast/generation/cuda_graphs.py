"""CUDA graphs for decoding: the decode step of a fixed batch captured once and replayed per token.

Capturing costs a few steps' time, so captured steps are kept and reused by later
calls on the same model, batch and cache length.  A replay reads the parameters'
memory, so an entry is reused only while the model's parameters are the same
tensors (in-place updates are fine).  Entries keep their model and cache alive: at
most ``MAX_GRAPHS`` of them; :func:`clear_cuda_graphs` drops them all.
"""

from __future__ import annotations

import torch

from .. import ops
from .cache import KVCache
from .runner import CachedRunner

MAX_GRAPHS = 4
_GRAPHS: dict[tuple, tuple] = {}


class CUDAGraphDecoder:
    """The decode step of a fixed batch captured once as a CUDA graph and replayed per token.

    Static buffers: ``tokens`` ``(B, 1)``, ``positions`` ``(B,)`` and the cache;
    :meth:`step` copies the new tokens/positions in, replays and returns the
    logits buffer (overwritten by the next step).  CUDA only.
    """

    busy = False  # set while one generation run uses the cache

    def __init__(self, runner: CachedRunner, cache: KVCache, warmup: int = 2):
        device = cache.keys[0].device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA cache, got {device}")
        self.runner, self.cache = runner, cache
        self.tokens = torch.zeros(cache.batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(cache.batch, dtype=torch.long, device=device)
        # Warm up on a side stream (lazy inits, autotuning) before capturing, as CUDA graphs require.
        # Warm-up and capture write keys/values at the last position, which a later step writes before
        # reading it; build the decoder before prefilling all the same.
        self.positions.fill_(cache.max_len - 1)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                runner.decode_static(self.tokens, cache, self.positions)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = runner.decode_static(self.tokens, cache, self.positions)

    def step(self, tokens, positions):
        """Replay the step for ``tokens`` ``(B, 1)`` at ``positions`` ``(B,)`` (device tensors)."""
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.graph.replay()
        return self.logits


def graph_capturable(model) -> bool:
    """Whether ``model``'s decode step can be captured: every shape static and no host reads inside.

    A mixture-of-experts feed-forward (Qwen3's ``MoEFeedForward``) is not: outside the
    ``"torch"`` backend it runs each expert on the tokens routed to it, counted on the host.
    """
    return not any(hasattr(block.ff, "gate") and hasattr(block.ff, "num_experts") for block in model.trf_blocks)


def clear_cuda_graphs() -> None:
    """Forget every captured decode step (and the model and cache memory each holds)."""
    _GRAPHS.clear()


def _captured_state(model) -> tuple:
    """What a captured step bakes in besides its cache: the addresses of the model's parameters and buffers, its
    module objects (an activation or norm swapped for another, weightless, is other kernels) and whether the
    cache was made under ``torch.inference_mode`` (such tensors cannot be written outside it)."""
    return (tuple(p.data_ptr() for p in model.parameters()), tuple(b.data_ptr() for b in model.buffers()),
            tuple(id(module) for module in model.modules()), torch.is_inference_mode_enabled())


def captured_decoder(runner: CachedRunner, batch: int, max_len: int) -> CUDAGraphDecoder:
    """A captured step for ``runner``'s model with a fresh-to-use cache, reused when one is free.

    The returned decoder is marked busy; the run that got it sets ``busy = False`` when done.
    """
    model = runner.model
    # The captured kernels are the ones the backend selection chose at capture time.
    key = (id(model), batch, max_len, ops.get_backend())
    pointers = _captured_state(model)
    entry = _GRAPHS.get(key)
    if entry is not None and entry[0].runner.model is model and entry[1] == pointers and not entry[0].busy:
        entry[0].busy = True
        return entry[0]
    decoder = CUDAGraphDecoder(runner, KVCache.for_model(model, batch, max_len))
    decoder.busy = True  # its cache belongs to one run until that run ends
    if entry is not None and entry[0].busy:  # another run (an unfinished stream) holds the cached one
        return decoder
    _GRAPHS.pop(key, None)
    while len(_GRAPHS) >= MAX_GRAPHS:
        _GRAPHS.pop(next(iter(_GRAPHS)))
    _GRAPHS[key] = (decoder, pointers)
    return decoder
