"""Drop-in for ``llms_from_scratch.kv_cache.qwen3``: Qwen3 (dense and mixture of experts) with a per-layer KV cache.

The code lives in :mod:`gptfast.models.qwen3_cached`; this module only re-exports it.
"""

from ..models.qwen3_cached import *  # noqa: F401,F403
from ..models.qwen3_cached import __all__  # noqa: F401
