"""Drop-in for ``llms_from_scratch.kv_cache_batched.qwen3``: Qwen3 at per-row positions with a per-row KV cache.

The code lives in :mod:`gptfast.models.qwen3_batched`; this module only re-exports it.
"""

from ..models.qwen3_batched import *  # noqa: F401,F403
from ..models.qwen3_batched import __all__  # noqa: F401
