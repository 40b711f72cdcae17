"""Drop-in for ``llms_from_scratch.kv_cache.utils``: the per-layer ``KVCache`` over gptfast's static cache."""

from ..generation.layer_cache import KVCache

__all__ = ["KVCache"]
