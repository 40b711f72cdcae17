"""The book's per-layer KV cache API (``get`` / ``update`` / ``get_all`` / ``reset``) over the static cache.

``llms_from_scratch.kv_cache.utils.KVCache`` keeps one ``(keys, values)`` pair per
layer and the model grows it with ``torch.cat`` every call, copying the whole past
each token.  :class:`KVCache` keeps that API (an entry is ``None`` or a pair of
``(batch, heads, tokens, head_dim)`` tensors, ``update`` stores whatever it is
given, so any model written against the book's API can use it), and adds
:meth:`KVCache.append`, which writes only the new positions into a preallocated
:class:`gptfast.generation.cache.KVCache` and hands out views of it.  gptfast's
``kv_cache.gpt2.GPTModel`` uses ``append``; nothing grows during generation.
"""

from __future__ import annotations

import torch

from .cache import KVCache as StaticKVCache
from .cache import context_length


class KVCache:
    """One ``(keys, values)`` entry per layer, ``None`` until filled (the reference's API).

    ``if cache:`` is true for every instance, as with the reference (the model tests it).
    """

    def __init__(self, n_layers):
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")
        self.cache = [None] * n_layers
        # Which entries are views of ``_store`` (so ``append`` only writes the new positions).
        self._in_store = [False] * n_layers
        self._store: StaticKVCache | None = None

    # -- the reference's API --------------------------------------------------------------

    def get(self, layer_idx):
        """Layer ``layer_idx``'s ``(keys, values)``, or ``None`` when nothing is cached."""
        return self.cache[layer_idx]

    def update(self, layer_idx, value):
        """Replace layer ``layer_idx``'s entry with ``value`` (a ``(keys, values)`` pair or ``None``)."""
        self.cache[layer_idx] = value
        self._in_store[layer_idx] = False

    def get_all(self):
        """The list of every layer's entry."""
        return self.cache

    def reset(self):
        """Forget every entry (the preallocated buffers stay, for the next sequence)."""
        for i in range(len(self.cache)):
            self.cache[i] = None
            self._in_store[i] = False

    # -- gptfast's additions --------------------------------------------------------------

    def num_tokens(self, layer_idx=0) -> int:
        """Tokens cached for layer ``layer_idx`` (0 when its entry is empty)."""
        entry = self.cache[layer_idx]
        return 0 if entry is None else entry[0].shape[2]

    def batch_size(self) -> int | None:
        """Rows of the cached entries, or ``None`` when every entry is empty."""
        for entry in self.cache:
            if entry is not None:
                return entry[0].shape[0]
        return None

    def check_room(self, model, batch: int, new_tokens: int) -> None:
        """``ValueError`` unless ``new_tokens`` more tokens of ``batch`` rows fit ``model``'s cache.

        Called before any work, so a refused call leaves the cache as it was.
        """
        if len(self.cache) != len(model.trf_blocks):
            raise ValueError(f"cache has {len(self.cache)} layers but the model has {len(model.trf_blocks)}")
        held = self.batch_size()
        if held is not None and held != batch:
            raise ValueError(f"the cache holds {held} rows but the input has {batch}; call reset() first")
        limit = context_length(model)
        cached = max(self.num_tokens(i) for i in range(len(self.cache)))
        if cached + new_tokens > limit:
            raise ValueError(
                f"{new_tokens} new tokens after the {cached} cached ones would outgrow the cache "
                f"({limit} positions, the model's context length); reset the cache to start a new sequence")

    def append(self, layer_idx, keys, values, model):
        """Add ``keys``/``values`` ``(batch, heads, new, head_dim)`` after layer ``layer_idx``'s entry.

        Returns the layer's whole ``(keys, values)``, views of the preallocated buffers
        (sized for ``model``, allocated on first use).  With autograd recording, the
        pair is concatenated instead, as the reference does: writing into shared buffers
        would break the backward pass of earlier calls.
        """
        entry = self.cache[layer_idx]
        if torch.is_grad_enabled() and (keys.requires_grad or values.requires_grad):
            if entry is not None:
                keys, values = torch.cat([entry[0], keys], dim=2), torch.cat([entry[1], values], dim=2)
            self.update(layer_idx, (keys, values))
            return keys, values
        start, end = self.num_tokens(layer_idx), self.num_tokens(layer_idx) + keys.shape[2]
        store = self._store_for(model, keys)
        k_buf, v_buf = store.keys[layer_idx], store.values[layer_idx]
        if entry is not None and not self._in_store[layer_idx]:  # an entry set by update(): copy it in once
            k_buf[:, :, :start].copy_(entry[0])
            v_buf[:, :, :start].copy_(entry[1])
        k_buf[:, :, start:end].copy_(keys)
        v_buf[:, :, start:end].copy_(values)
        self.cache[layer_idx] = (k_buf[:, :, :end], v_buf[:, :, :end])
        self._in_store[layer_idx] = True
        return self.cache[layer_idx]

    def _store_for(self, model, keys):
        """The preallocated buffers, (re)allocated when the batch, dtype or device changed."""
        store = self._store
        batch = keys.shape[0]
        if store is None or store.batch != batch or store.keys[0].dtype != keys.dtype \
                or store.keys[0].device != keys.device:
            att = model.trf_blocks[0].att
            # Entries living in the old buffers are copied into the new ones by append().
            self._in_store = [False] * len(self.cache)
            store = StaticKVCache(len(self.cache), batch, att.num_heads, context_length(model), att.head_dim,
                                  dtype=keys.dtype, device=keys.device)
            self._store = store
        return store
