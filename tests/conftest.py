"""Test-wide setup: offline tokenizer files, Triton's interpreter where no GPU exists."""

import os
import pathlib

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
TIKTOKEN_CACHE = REPO / "tests" / "data" / "tiktoken-cache"

# tiktoken.get_encoding("gpt2") (used by the reference package and the tokenizer test) reads the
# GPT-2 BPE files the repository ships, so the suite needs no network and nothing beside the clone.
os.environ["TIKTOKEN_CACHE_DIR"] = str(TIKTOKEN_CACHE)

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
