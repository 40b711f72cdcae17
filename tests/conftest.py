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

# Markers (gpu, triton) and skipping tests whose reference package is missing: tests/collection_rules.py.
from collection_rules import (  # noqa: E402,F401  (hooks are found by name in this module)
    pytest_collection_modifyitems,
    pytest_make_collect_report,
    pytest_runtest_makereport,
)
