"""Appendix A's toy classifier and dataset (the PyTorch primer).

Same layers, creation order (so the same initial weights under a seed) and
state_dict keys (``layers.0``, ``layers.2``, ``layers.4``) as ``llms_from_scratch.appendix_a``.
"""

from __future__ import annotations

import numbers

import torch
from torch.utils.data import Dataset


class NeuralNetwork(torch.nn.Module):
    """A multilayer perceptron: ``num_inputs`` -> 30 -> ReLU -> 20 -> ReLU -> ``num_outputs`` logits."""

    def __init__(self, num_inputs, num_outputs):
        super().__init__()
        for name, value in (("num_inputs", num_inputs), ("num_outputs", num_outputs)):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(num_inputs, 30),
            torch.nn.ReLU(),
            torch.nn.Linear(30, 20),
            torch.nn.ReLU(),
            torch.nn.Linear(20, num_outputs),
        )

    def forward(self, x):
        return self.layers(x)


class ToyDataset(Dataset):
    """Pairs ``(X[i], y[i])`` of a feature tensor and a label tensor of the same length."""

    def __init__(self, X, y):
        if len(X) != len(y):
            raise ValueError(f"X and y must hold as many rows, got {len(X)} and {len(y)}")
        self.features = X
        self.labels = y

    def __getitem__(self, index):
        return self.features[index], self.labels[index]

    def __len__(self):
        return self.labels.shape[0]
