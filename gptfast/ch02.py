"""Drop-in for ``llms_from_scratch.ch02``."""

from .data import GPTDatasetV1, create_dataloader_v1

__all__ = ["GPTDatasetV1", "create_dataloader_v1"]
