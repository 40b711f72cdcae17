"""Drop-in for ``llms_from_scratch.kv_cache``: the book's KV-cache chapter code, module for module.

gptfast's own static KV cache and decoding loop live in :mod:`gptfast.generation`.
"""
