"""An autouse fixture for the generation tests: the ``"torch"`` oracle backend on one CPU thread.

A test module takes it with ``from oracle_backend import torch_backend_one_thread  # noqa: F401``
(pytest finds fixtures among a module's names).
"""

from __future__ import annotations

import pytest
import torch

from gptfast import ops


@pytest.fixture(autouse=True)
def torch_backend_one_thread():
    """Run the test with ``ops.use_backend("torch")`` and one torch thread, restoring the thread count after."""
    # The oracle backend: sampled tokens are compared with the reference's torch calls.  The models of these
    # tests are tiny: one thread avoids OpenMP barriers, which stall for milliseconds on a shared, busy CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ops.use_backend("torch"):
            yield
    finally:
        torch.set_num_threads(threads)
