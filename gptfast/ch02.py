"""Drop-in for ``llms_from_scratch.ch02``."""

from .data import GPTDatasetV1, create_dataloader_v1
from ._star import with_reference_imports

__all__ = ["GPTDatasetV1", "create_dataloader_v1"]


# The names a star import of the reference's module also gives (see gptfast/_star.py).
__all__, __getattr__, __dir__ = with_reference_imports(__name__, __all__, {
    "DataLoader": "torch.utils.data:DataLoader",
    "Dataset": "torch.utils.data:Dataset",
    "tiktoken": "tiktoken",
    "torch": "torch",
})
