"""Collection rules shared by the whole suite (hooks imported by tests/conftest.py).

* ``gpu`` marker: every test that needs a CUDA device carries it, so ``-m gpu`` selects the GPU
  parity tests wherever their files live.  A test gets it explicitly (``@pytest.mark.gpu``, which
  also skips it where no CUDA device exists), or automatically when a ``skipif`` says it "needs a
  CUDA device"/"needs a GPU", or when one of its parameters is the device ``"cuda"``.
* ``triton`` marker: added to every test whose id names Triton, so a GPU run can take the CUDA and
  the Triton tests as separate steps (``-m "gpu and not triton"``, ``-m "gpu and triton"``).
* The reference package (``llms_from_scratch``) is the oracle of the parity tests but absent on
  some machines (the GPU image): a test module, or a test, that fails only because it cannot
  import it is reported as skipped with that reason instead of as an error.
"""

from __future__ import annotations

import re

import pytest
import torch

REFERENCE = "llms_from_scratch"
REFERENCE_MISSING = f"needs the reference package {REFERENCE} (pip install llms-from-scratch), not installed here"
_NEEDS_GPU = re.compile(r"needs? (a |an )?(CUDA|GPU)", re.IGNORECASE)


def require_reference():
    """``import llms_from_scratch``, or skip the calling test/module with the reason."""
    return pytest.importorskip(REFERENCE, reason=REFERENCE_MISSING)


def _is_cuda(value) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, str):
        return value == "cuda" or value.startswith("cuda:")
    if isinstance(value, (tuple, list)):
        return any(_is_cuda(v) for v in value)
    return False


def needs_gpu(item) -> bool:
    """Whether a collected test needs a CUDA device (see the module docstring)."""
    if item.get_closest_marker("gpu") is not None:
        return True
    for mark in item.iter_markers("skipif"):
        if _NEEDS_GPU.search(str(mark.kwargs.get("reason", ""))):
            return True
    callspec = getattr(item, "callspec", None)
    return callspec is not None and any(_is_cuda(v) for v in callspec.params.values())


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    for item in items:
        if needs_gpu(item):
            if item.get_closest_marker("gpu") is None:
                item.add_marker(pytest.mark.gpu)
            elif not has_cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "triton" in item.nodeid.lower() and item.get_closest_marker("triton") is None:
            item.add_marker(pytest.mark.triton)


def _missing_reference(text: str) -> bool:
    return f"No module named '{REFERENCE}'" in text


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if report.failed and _missing_reference(str(report.longrepr)):
        report.outcome = "skipped"
        report.longrepr = (str(getattr(collector, "path", collector.nodeid)), 0, f"Skipped: {REFERENCE_MISSING}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    excinfo = call.excinfo
    if (report.failed and excinfo is not None and isinstance(excinfo.value, ModuleNotFoundError)
            and excinfo.value.name == REFERENCE):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {REFERENCE_MISSING}")
