"""Drop-in for ``llms_from_scratch.kv_cache.qwen3``: Qwen3 (dense and mixture of experts) with a per-layer KV cache.

The code lives in :mod:`gptfast.models.qwen3_cached`; this module only re-exports it.
"""

from ..models.qwen3_cached import *  # noqa: F401,F403
from ..models.qwen3_cached import __all__  # noqa: F401
from .._star import with_reference_imports


# The names a star import of the reference's module also gives (see gptfast/_star.py).
__all__, __getattr__, __dir__ = with_reference_imports(__name__, __all__, {
    "nn": "torch.nn",
    "torch": "torch",
})
