"""Drop-in for ``llms_from_scratch.appendix_a``."""

from .models.toy import NeuralNetwork, ToyDataset

__all__ = ["NeuralNetwork", "ToyDataset"]
