"""Test-wide setup: offline tokenizer files, Triton's interpreter where no GPU exists."""

import os
import pathlib

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# tiktoken.get_encoding("gpt2") (used by the reference package) reads these offline.
if (SHARED_DATA / "tiktoken-cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_DATA / "tiktoken-cache"))

# Without a GPU, Triton kernels run in its interpreter on CPU tensors; it must be set before
# triton is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()
