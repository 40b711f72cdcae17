"""Drop-in for ``llms_from_scratch.kv_cache_batched.utils``: the per-row ``KVCache`` (see
:class:`gptfast.generation.layer_cache.RowKVCache`)."""

from ..generation.layer_cache import RowKVCache as KVCache

__all__ = ["KVCache"]
