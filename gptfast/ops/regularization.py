"""Dropout above the kernels (the regularization op), for every fused backend (cpu, cuda, triton).

The kernel is a torch op with one schema in each namespace (csrc/schemas.h)::

    dropout_fwd(x, p, seed) -> out

``out = x * keep / (1 - p)`` where ``keep`` is a pure function of the seed and the element's
index in the contiguous tensor (csrc/dropout_hash.h; every backend draws the same mask).  The
seed is one int64 drawn from torch's generator on x's device per call (``torch.manual_seed``
reproduces it; a GPU needs no host synchronisation), and the backward is the same kernel on the
incoming gradient with the saved seed: no mask is stored, and no Bernoulli tensor is drawn.

Here, once for all backends: the fake (for the C++ ops; the Triton op's fake is its own
body) and the autograd formula.  The mask differs from ``torch.nn.functional.dropout``'s (which
draws from torch's generator element by element); backend ``"torch"`` keeps that one.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ._dispatch import kernels, register_fake, without_graph
from .attention import dropout_seed


def keep_mask(seed: int, n: int, p: float) -> torch.Tensor:
    """The kernels' mask for ``n`` elements as a bool CPU tensor, spelt in numpy from csrc/dropout_hash.h.

    Element ``i`` is kept iff the top 24 bits of splitmix64's finaliser of
    ``seed + i * 0x9E3779B97F4A7C15`` (wrapping uint64) are ``>= round(p * 2^24)``.  The oracle the
    kernels are checked against (tests, GPU smoke checks); no op calls it.
    """
    i = np.arange(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = np.uint64(seed) + i * np.uint64(0x9E3779B97F4A7C15)
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        h = h ^ (h >> np.uint64(31))
    return torch.from_numpy((h >> np.uint64(40)) >= np.uint64(math.floor(p * 2**24 + 0.5)))


def _fake_dropout_fwd(x, p, seed):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    _, p, seed = inputs
    ctx.save_for_backward(seed)
    ctx.p = p
    ctx.set_materialize_grads(False)


def _make_backward(namespace: str):
    def backward(ctx, grad_out):
        if grad_out is None:
            return None, None, None
        (seed,) = ctx.saved_tensors
        # The mask is a function of the element's index in the contiguous tensor, so the gradient
        # is laid out as the forward's input was.
        return kernels(namespace).dropout_fwd(grad_out.contiguous(), ctx.p, seed), None, None

    return backward


def register(namespace: str, *, fakes: bool = True) -> None:
    """Register the autograd formula (and, with ``fakes``, the fake impl) of ``namespace``'s dropout op."""
    if fakes:
        register_fake(f"{namespace}::dropout_fwd", _fake_dropout_fwd)
    torch.library.register_autograd(f"{namespace}::dropout_fwd", _make_backward(namespace),
                                    setup_context=_setup_context)


def fused_dropout(ops, x, p=0.5, *, training=True):
    """Dropout on ``ops``' kernels (inputs already validated); ``x`` itself when not training or ``p == 0``."""
    if not training or p == 0.0:
        return x
    seed = dropout_seed(x.device)
    with without_graph():
        return kernels(ops).dropout_fwd(x.contiguous(), float(p), seed)
