"""Test-wide setup: offline tokenizer files, Triton's interpreter where no GPU exists."""

import os
import pathlib

import pytest
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

# The backend selection the run started with: $GPTFAST_BACKEND and no ops.use_backend choice.
_STARTING_BACKEND_ENV = os.environ.get("GPTFAST_BACKEND")


@pytest.fixture(autouse=True)
def _backend_selection_reset():
    """Each test ends with the run's starting backend selection.

    The commands' ``main`` functions select their ``--backend`` for the whole process (a plain
    ``ops.use_backend`` call, or ``$GPTFAST_BACKEND`` for a training run), as a command should;
    run in-process by a test (a module fixture included), that choice would otherwise carry into
    whichever tests the same worker runs next.
    """
    yield
    from gptfast.ops import _dispatch

    _dispatch._selection.set(None)
    if _STARTING_BACKEND_ENV is None:
        os.environ.pop("GPTFAST_BACKEND", None)
    else:
        os.environ["GPTFAST_BACKEND"] = _STARTING_BACKEND_ENV
