"""Test-wide setup: offline tokenizer files, Triton's interpreter where no GPU exists."""

import os
import pathlib

import torch

from offline_data import use_private_tiktoken_cache

REPO = pathlib.Path(__file__).resolve().parents[1]

use_private_tiktoken_cache()

# Without a GPU, Triton kernels run in its interpreter on CPU tensors; it must be set before
# triton is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()
