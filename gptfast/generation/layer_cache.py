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

import numbers

import torch

from .cache import KVCache as StaticKVCache
from .cache import context_length


def writable_here(buffer) -> bool:
    """Whether ``buffer`` may be written in place now: buffers made under ``torch.inference_mode`` may not be
    outside it, so a cache filled there and used again outside gets new buffers (its entries copied over)."""
    return not buffer.is_inference() or torch.is_inference_mode_enabled()


class KVCache:
    """One ``(keys, values)`` entry per layer, ``None`` until filled (the reference's API).

    ``if cache:`` is true for every instance, as with the reference (the model tests it).
    """

    def __init__(self, n_layers):
        if isinstance(n_layers, bool) or not isinstance(n_layers, numbers.Integral) or n_layers < 1:
            raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")
        n_layers = int(n_layers)  # a numpy integer too, as the reference's list takes it
        self._entries = [None] * n_layers
        # The entry ``append`` last made of ``_store``'s buffers, per layer: while the layer's entry is that very
        # pair, ``append`` only writes the new positions.  Compared by identity, so an entry replaced any way
        # (``update``, or an item of the list ``cache``/``get_all`` hands out) is copied in instead.
        self._store_views: list[tuple | None] = [None] * n_layers
        # Positions of each layer's buffers handed out as views since they were made: ``append`` moves a layer
        # to new buffers before writing any of them, so an entry handed out keeps its values (copy on write).
        self._lent = [0] * n_layers
        self._store: StaticKVCache | None = None

    # -- the reference's API --------------------------------------------------------------

    @property
    def cache(self):
        """The list of every layer's entry (the reference's attribute)."""
        return self.get_all()

    def get(self, layer_idx):
        """Layer ``layer_idx``'s ``(keys, values)``, or ``None`` when nothing is cached."""
        self._lend(layer_idx)
        return self._entries[layer_idx]

    def update(self, layer_idx, value):
        """Replace layer ``layer_idx``'s entry with ``value`` (a ``(keys, values)`` pair or ``None``)."""
        self._entries[layer_idx] = value

    def get_all(self):
        """The list of every layer's entry."""
        for i in range(len(self._entries)):
            self._lend(i)
        return self._entries

    def reset(self):
        """Forget every entry.  The next sequence gets new buffers: entries handed out before stay as they were
        (the reference's are tensors of their own), at the cost of one allocation per sequence."""
        for i in range(len(self._entries)):
            self._entries[i] = None
            self._store_views[i] = None
            self._lent[i] = 0
        self._store = None

    # -- gptfast's additions --------------------------------------------------------------

    def num_tokens(self, layer_idx=0) -> int:
        """Tokens cached for layer ``layer_idx`` (0 when its entry is empty)."""
        entry = self._entries[layer_idx]
        return 0 if entry is None else entry[0].shape[2]

    def batch_size(self) -> int | None:
        """Rows of the cached entries, or ``None`` when every entry is empty."""
        for entry in self._entries:
            if entry is not None:
                return entry[0].shape[0]
        return None

    def check_room(self, model, batch: int, new_tokens: int) -> None:
        """``ValueError`` unless ``new_tokens`` more tokens of ``batch`` rows fit ``model``'s cache.

        Called before any work, so a refused call leaves the cache as it was.
        """
        if len(self._entries) != len(model.trf_blocks):
            raise ValueError(f"cache has {len(self._entries)} layers but the model has {len(model.trf_blocks)}")
        held = self.batch_size()
        if held is not None and held != batch:
            raise ValueError(f"the cache holds {held} rows but the input has {batch}; call reset() first")
        limit = context_length(model)
        cached = max(self.num_tokens(i) for i in range(len(self._entries)))
        if cached + new_tokens > limit:
            raise ValueError(
                f"{new_tokens} new tokens after the {cached} cached ones would outgrow the cache "
                f"({limit} positions, the model's context length); reset the cache to start a new sequence")

    def append(self, layer_idx, keys, values, model):
        """Add ``keys``/``values`` ``(batch, heads, new, head_dim)`` after layer ``layer_idx``'s entry.

        Returns the layer's whole ``(keys, values)``, views of the preallocated buffers
        (sized for ``model``, allocated on first use).  With autograd recording for anything
        of the model, the pair is concatenated instead, as the reference does: an earlier
        call's backward may have saved the keys (for its queries' gradient, say), and writing
        into the shared buffers would break it.  Positions handed out before (``get``,
        ``get_all``) are never written over: the layer moves to new buffers first.
        """
        entry = self._entries[layer_idx]
        if torch.is_grad_enabled() and (keys.requires_grad or values.requires_grad
                                        or any(p.requires_grad for p in model.parameters())):
            if entry is not None:
                keys, values = torch.cat([entry[0], keys], dim=2), torch.cat([entry[1], values], dim=2)
            self.update(layer_idx, (keys, values))
            return keys, values
        start, end = self.num_tokens(layer_idx), self.num_tokens(layer_idx) + keys.shape[2]
        store = self._store_for(model, keys)
        copy_in = entry is not None and not self._in_store(layer_idx)  # an entry set from outside: copied in once
        if self._lent[layer_idx] > (0 if copy_in else start):
            self._unshare(store, layer_idx, keep=0 if copy_in else start)
        k_buf, v_buf = store.keys[layer_idx], store.values[layer_idx]
        if copy_in:
            k_buf[:, :, :start].copy_(entry[0])
            v_buf[:, :, :start].copy_(entry[1])
        k_buf[:, :, start:end].copy_(keys)
        v_buf[:, :, start:end].copy_(values)
        self._entries[layer_idx] = self._store_views[layer_idx] = (k_buf[:, :, :end], v_buf[:, :, :end])
        return self._entries[layer_idx]

    def _in_store(self, layer_idx) -> bool:
        """Whether layer ``layer_idx``'s entry is the view of the buffers ``append`` last made for it."""
        entry = self._entries[layer_idx]
        return entry is not None and entry is self._store_views[layer_idx]

    def _lend(self, layer_idx):
        """Note that layer ``layer_idx``'s entry leaves the cache: its buffer positions are not written again."""
        if self._in_store(layer_idx):
            self._lent[layer_idx] = max(self._lent[layer_idx], self.num_tokens(layer_idx))

    def _unshare(self, store, layer_idx, keep):
        """Give layer ``layer_idx`` new buffers holding the old ones' first ``keep`` positions; the old buffers
        stay with the entries handed out."""
        for buffers in (store.keys, store.values):
            old = buffers[layer_idx]
            new = torch.zeros_like(old)
            new[:, :, :keep].copy_(old[:, :, :keep])
            buffers[layer_idx] = new
        self._lent[layer_idx] = 0

    def _store_for(self, model, keys):
        """The preallocated buffers, (re)allocated when the batch, dtype or device changed."""
        store = self._store
        batch = keys.shape[0]
        if store is None or store.batch != batch or store.keys[0].dtype != keys.dtype \
                or store.keys[0].device != keys.device or not writable_here(store.keys[0]):
            att = model.trf_blocks[0].att
            # Entries living in the old buffers are copied into the new ones by append().
            self._store_views = [None] * len(self._entries)
            self._lent = [0] * len(self._entries)
            store = StaticKVCache(len(self._entries), batch, att.num_heads, context_length(model), att.head_dim,
                                  dtype=keys.dtype, device=keys.device)
            self._store = store
        return store


class RowKVCache:
    """The batched book API (``llms_from_scratch.kv_cache_batched.utils.KVCache``): one entry per layer and row.

    ``get(layer_idx, batch_idx)`` is ``None`` or that row's ``(keys, values)``, each
    ``(1, heads, tokens, head_dim)``; ``update`` stores whatever it is given, as the
    reference does.  gptfast's batched models call :meth:`extend` instead, which writes
    only the new positions of every row into per-layer buffers (grown by doubling, so
    a step copies nothing of the past) and returns the whole batch's keys and values
    as views; ``get`` then hands out views of those buffers, whose positions are never
    written again (a later write moves the layer to new buffers first).
    """

    def __init__(self, n_layers, batch_size):
        for name, value in (("n_layers", n_layers), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        n_layers, batch_size = int(n_layers), int(batch_size)
        self.batch_size = batch_size
        self._lengths = [[0] * batch_size for _ in range(n_layers)]  # tokens of each row held in the buffers
        self._given = [[None] * batch_size for _ in range(n_layers)]  # entries set through update()
        self._buffers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers
        # Positions of each row of the layer's buffers handed out by get() since the buffers were made.
        self._lent = [[0] * batch_size for _ in range(n_layers)]

    # -- the reference's API --------------------------------------------------------------

    @property
    def cache(self):
        """Every entry, ``cache[layer_idx][batch_idx]``, as the reference's list of lists: reads are :meth:`get`,
        item assignments (of an entry, or of a whole layer's list) are :meth:`update`."""
        return _CacheLayers(self)

    @property
    def n_layers(self) -> int:
        return len(self._lengths)

    def get(self, layer_idx, batch_idx):
        """Row ``batch_idx``'s ``(keys, values)`` of layer ``layer_idx``, or ``None`` when nothing is cached."""
        row = range(self.batch_size)[batch_idx]  # a negative index counts from the end, as in a list
        lent = self._lent[layer_idx]
        lent[row] = max(lent[row], self._lengths[layer_idx][row])
        return self._held(layer_idx, row)

    def _held(self, layer_idx, row):
        """Row ``row``'s entry: the one given to ``update``, a view of the buffers, or ``None``."""
        given = self._given[layer_idx][row]
        if given is not None:
            return given
        n = self._lengths[layer_idx][row]
        if n == 0:
            return None
        keys, values = self._buffers[layer_idx]
        return keys[row:row + 1, :, :n], values[row:row + 1, :, :n]

    def update(self, layer_idx, batch_idx, value):
        """Replace one entry with ``value`` (a ``(keys, values)`` pair or ``None``)."""
        self._given[layer_idx][batch_idx] = value
        self._lengths[layer_idx][batch_idx] = 0

    def get_layer(self, layer_idx):
        """The list of every row's entry of layer ``layer_idx``."""
        return [self.get(layer_idx, b) for b in range(self.batch_size)]

    def reset(self):
        """Forget every entry.  The next batch gets new buffers, so entries handed out before keep their values."""
        for i in range(len(self._lengths)):
            self._lengths[i] = [0] * self.batch_size
            self._given[i] = [None] * self.batch_size
            self._buffers[i] = None
            self._lent[i] = [0] * self.batch_size

    # -- gptfast's additions --------------------------------------------------------------

    def row_lengths(self, layer_idx=0) -> list[int]:
        """Tokens cached for each row of layer ``layer_idx``."""
        given = self._given[layer_idx]
        return [n if g is None else g[0].shape[2] for n, g in zip(self._lengths[layer_idx], given)]

    def extend(self, layer_idx, keys, values, starts):
        """Write ``keys``/``values`` ``(batch, heads, new, head_dim)`` of every row at its position ``starts[b]``.

        ``starts`` is a list of ints, each row's cached length (checked by the caller).
        Returns the batch's ``(keys, values)`` over positions ``0 .. max(starts) + new - 1``,
        views of the buffers; a row's positions past its own end hold stale values that
        the caller's mask hides.  With autograd recording, the pair is concatenated
        instead, as the reference does: an earlier call's backward may have saved the
        keys, and writing into the shared buffers would break it.
        """
        batch, _, new, _ = keys.shape
        if batch != self.batch_size:
            raise ValueError(f"the cache has {self.batch_size} rows but the input has {batch}")
        if torch.is_grad_enabled():
            # Whatever needs gradients (the keys, or only the queries attending over them) saves these keys.
            return self._extend_by_concatenation(layer_idx, keys, values, starts)
        ends = [s + new for s in starts]
        given = self._given[layer_idx]
        lent = self._lent[layer_idx]
        overwrites_lent = any(n > (0 if g is not None else s) for n, g, s in zip(lent, given, starts))
        k_buf, v_buf = self._buffers_for(layer_idx, keys, values, max(ends), remake=overwrites_lent)
        for b, entry in enumerate(given):
            if entry is not None:  # set by update(): copied into the buffers once
                n = entry[0].shape[2]
                k_buf[b:b + 1, :, :n].copy_(entry[0])
                v_buf[b:b + 1, :, :n].copy_(entry[1])
                given[b] = None
        if len(set(starts)) == 1:
            s = starts[0]
            k_buf[:, :, s:s + new].copy_(keys)
            v_buf[:, :, s:s + new].copy_(values)
        else:
            for b, s in enumerate(starts):
                k_buf[b, :, s:s + new].copy_(keys[b])
                v_buf[b, :, s:s + new].copy_(values[b])
        self._lengths[layer_idx] = ends
        end = max(ends)
        return k_buf[:, :, :end], v_buf[:, :, :end]

    def _extend_by_concatenation(self, layer_idx, keys, values, starts):
        """:meth:`extend` into new tensors: each row's entry followed by its new keys, rows shorter than the
        longest padded with zeros (masked by the caller); the rows become entries of their own."""
        new = keys.shape[2]
        end = max(starts) + new
        rows_k, rows_v = [], []
        for b in range(self.batch_size):
            k_row, v_row = keys[b:b + 1], values[b:b + 1]
            held = self._held(layer_idx, b)
            if held is not None:
                k_row, v_row = torch.cat([held[0], k_row], dim=2), torch.cat([held[1], v_row], dim=2)
            pad = (0, 0, 0, end - k_row.shape[2])
            rows_k.append(torch.nn.functional.pad(k_row, pad))
            rows_v.append(torch.nn.functional.pad(v_row, pad))
        k_all, v_all = torch.cat(rows_k, dim=0), torch.cat(rows_v, dim=0)
        for b, s in enumerate(starts):
            self._given[layer_idx][b] = (k_all[b:b + 1, :, :s + new], v_all[b:b + 1, :, :s + new])
            self._lengths[layer_idx][b] = 0
        return k_all, v_all

    def _buffers_for(self, layer_idx, keys, values, needed, remake=False):
        """Layer ``layer_idx``'s buffers with room for ``needed`` positions, reallocated (doubling) when short,
        or remade when ``remake`` (positions handed out are about to be written)."""
        current = self._buffers[layer_idx]
        capacity = max(needed, 64)
        if current is not None:
            k_old, v_old = current
            fits = (k_old.shape[1] == keys.shape[1] and k_old.shape[3] == keys.shape[3]
                    and v_old.shape[3] == values.shape[3] and k_old.dtype == keys.dtype
                    and v_old.dtype == values.dtype and k_old.device == keys.device)
            if fits and k_old.shape[2] >= needed and writable_here(k_old) and not remake:
                return current
            if not fits and any(self._lengths[layer_idx]):
                raise ValueError(f"cached keys {tuple(k_old.shape)} ({k_old.dtype}) do not fit the new keys "
                                 f"{tuple(keys.shape)} ({keys.dtype}); call reset() for a new batch")
            if fits:  # grown by doubling; only remade (same size) for inference-mode buffers or positions handed out
                capacity = max(capacity, k_old.shape[2] if k_old.shape[2] >= needed else 2 * k_old.shape[2])
        # Zeros, not empty memory: positions past a row's end are masked, and 0 * NaN would still be NaN.
        k_buf = keys.new_zeros(self.batch_size, keys.shape[1], capacity, keys.shape[3])
        v_buf = values.new_zeros(self.batch_size, values.shape[1], capacity, values.shape[3])
        if current is not None and any(self._lengths[layer_idx]):
            held = current[0].shape[2]
            k_buf[:, :, :held].copy_(current[0])
            v_buf[:, :, :held].copy_(current[1])
        self._buffers[layer_idx] = (k_buf, v_buf)
        self._lent[layer_idx] = [0] * self.batch_size
        return k_buf, v_buf


class _CacheLayer:
    """Live view of one layer of a :class:`RowKVCache` with the reference's list behaviour (index, assign,
    iterate, compare with a list)."""

    def __init__(self, owner: RowKVCache, layer_idx: int):
        self._owner, self._layer = owner, layer_idx

    def __len__(self) -> int:
        return self._owner.batch_size

    def __getitem__(self, batch_idx):
        if isinstance(batch_idx, slice):
            return [self._owner.get(self._layer, b) for b in range(self._owner.batch_size)[batch_idx]]
        return self._owner.get(self._layer, batch_idx)

    def __setitem__(self, batch_idx, value):
        if isinstance(batch_idx, slice):
            raise TypeError("assign the cache's entries one row at a time (cache[layer][row] = entry)")
        self._owner.update(self._layer, range(self._owner.batch_size)[batch_idx], value)

    def __iter__(self):
        return iter(self[:])

    def __eq__(self, other):
        return list(self) == list(other) if isinstance(other, (list, tuple, _CacheLayer)) else NotImplemented

    def __repr__(self) -> str:
        return repr(list(self))


class _CacheLayers:
    """Live view of every layer of a :class:`RowKVCache` (``cache.cache``), a list of :class:`_CacheLayer`."""

    def __init__(self, owner: RowKVCache):
        self._owner = owner

    def __len__(self) -> int:
        return self._owner.n_layers

    def __getitem__(self, layer_idx):
        layers = range(self._owner.n_layers)[layer_idx]
        if isinstance(layers, range):  # a slice
            return [_CacheLayer(self._owner, i) for i in layers]
        return _CacheLayer(self._owner, layers)

    def __setitem__(self, layer_idx, entries):
        """A whole layer's list of entries, one per row, as ``cache.cache[i] = [...]`` replaces it in the reference."""
        layer = range(self._owner.n_layers)[layer_idx]
        entries = list(entries)
        if len(entries) != self._owner.batch_size:
            raise ValueError(f"a layer holds {self._owner.batch_size} rows' entries, got {len(entries)}")
        for row, entry in enumerate(entries):
            self._owner.update(layer, row, entry)

    def __iter__(self):
        return iter(self[:])

    def __eq__(self, other):
        if not isinstance(other, (list, tuple, _CacheLayers)):
            return NotImplemented
        return [list(layer) for layer in self] == [list(layer) for layer in other]

    def __repr__(self) -> str:
        return repr([list(layer) for layer in self])
