"""Drop-in for ``llms_from_scratch.kv_cache.llama3``: Llama 3.2 with a per-layer KV cache.

The code lives in :mod:`gptfast.models.llama3_cached`; this module only re-exports it.
"""

from ..models.llama3_cached import *  # noqa: F401,F403
from ..models.llama3_cached import __all__  # noqa: F401
from .._star import LLAMA3_IMPORTS, with_reference_imports


# The names a star import of the reference's module also gives (see gptfast/_star.py).
__all__, __getattr__, __dir__ = with_reference_imports(__name__, __all__, LLAMA3_IMPORTS)
