"""Importing the reference's fine-tuning modules and building twin GPTs for the parity tests.

``llms_from_scratch.ch07`` imports ``psutil`` at module level but uses it only in
``check_if_running``; where psutil is not installed a placeholder stands in while the
reference module is imported (and is removed again), so every other ch07 function can
still be compared.  Tests of ``check_if_running`` itself skip without psutil.
"""

from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch

TINY = {"vocab_size": 50257, "context_length": 48, "emb_dim": 32, "n_heads": 4, "n_layers": 2, "drop_rate": 0.1,
        "qkv_bias": True}


def reference(name: str):
    """``llms_from_scratch.<name>``, skipping the test when the reference package is missing."""
    pytest.importorskip("llms_from_scratch", reason="llms-from-scratch is a test dependency")
    if name == "ch07" and "llms_from_scratch.ch07" not in sys.modules:
        try:
            import psutil  # noqa: F401
        except ImportError:
            sys.modules["psutil"] = types.ModuleType("psutil")
            try:
                return importlib.import_module("llms_from_scratch.ch07")
            finally:
                del sys.modules["psutil"]
    if name == "ch06":
        pytest.importorskip("pandas", reason="the reference's ch06 reads its data with pandas")
    return importlib.import_module(f"llms_from_scratch.{name}")


def twin_models(cfg=TINY, seed=123):
    """The reference's GPTModel and gptfast's, built under the same seed (identical weights)."""
    from gptfast import ch04

    ref_ch04 = reference("ch04")
    torch.manual_seed(seed)
    ref = ref_ch04.GPTModel(cfg)
    torch.manual_seed(seed)
    ours = ch04.GPTModel(cfg)
    return ref, ours


def assert_same_state(a, b, exact=True, **tolerance):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        if exact:
            assert torch.equal(sa[key], sb[key]), f"{key} differs"
        else:
            torch.testing.assert_close(sa[key], sb[key], **tolerance, msg=lambda m, k=key: f"{k}: {m}")
