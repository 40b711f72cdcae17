"""Drop-in for ``llms_from_scratch.qwen3`` (Qwen3, dense and mixture of experts).

The code lives in ``gptfast.models.qwen3``.
"""

from .models.qwen3 import (QWEN3_CONFIG_1_7B, QWEN3_CONFIG_4B, QWEN3_CONFIG_8B, QWEN3_CONFIG_14B,
                           QWEN3_CONFIG_30B_A3B, QWEN3_CONFIG_32B, QWEN_CONFIG_06_B, FeedForward,
                           GroupedQueryAttention, MoEFeedForward, Qwen3Model, Qwen3Tokenizer, RMSNorm,
                           TransformerBlock, apply_rope, compute_rope_params, download_from_huggingface,
                           download_from_huggingface_from_snapshots, load_weights_into_qwen)
from ._star import with_reference_imports

__all__ = ["QWEN_CONFIG_06_B", "QWEN3_CONFIG_1_7B", "QWEN3_CONFIG_4B", "QWEN3_CONFIG_8B", "QWEN3_CONFIG_14B",
           "QWEN3_CONFIG_32B", "QWEN3_CONFIG_30B_A3B", "Qwen3Model", "TransformerBlock", "FeedForward",
           "MoEFeedForward", "GroupedQueryAttention", "compute_rope_params", "apply_rope", "RMSNorm",
           "load_weights_into_qwen", "Qwen3Tokenizer", "download_from_huggingface",
           "download_from_huggingface_from_snapshots"]


# The names a star import of the reference's module also gives (see gptfast/_star.py).
__all__, __getattr__, __dir__ = with_reference_imports(__name__, __all__, {
    "Path": "pathlib:Path",
    "json": "json",
    "nn": "torch.nn",
    "os": "os",
    "re": "re",
    "torch": "torch",
    "urllib": "urllib.request",
})
