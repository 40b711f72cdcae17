"""Drop-in for ``llms_from_scratch.kv_cache.llama3``: Llama 3.2 with a per-layer KV cache.

The code lives in :mod:`gptfast.models.llama3_cached`; this module only re-exports it.
"""

from ..models.llama3_cached import *  # noqa: F401,F403
from ..models.llama3_cached import __all__  # noqa: F401
