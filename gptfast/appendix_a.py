"""Drop-in for ``llms_from_scratch.appendix_a``."""

from .models.toy import NeuralNetwork, ToyDataset
from ._star import with_reference_imports

__all__ = ["NeuralNetwork", "ToyDataset"]


# The names a star import of the reference's module also gives (see gptfast/_star.py).
__all__, __getattr__, __dir__ = with_reference_imports(__name__, __all__, {
    "Dataset": "torch.utils.data:Dataset",
    "torch": "torch",
})
