"""What the install built: ``_build.json``, written by setup.py next to the extensions.

Per extension (``"cpu"``, ``"cuda"``): whether it was built, with which options (OpenMP, SIMD,
C++ standard, CUDA toolkit) or why not.  The backends quote it when their extension is missing.
``$GPTFAST_BUILD_REPORT`` points to another report (tests).
"""

from __future__ import annotations

import json
import os

REPORT_NAME = "_build.json"


def build_report() -> dict:
    """The report found first along ``gptfast.__path__`` (where the extensions load from), or {}."""
    import gptfast

    override = os.environ.get("GPTFAST_BUILD_REPORT")
    paths = [override] if override else [os.path.join(folder, REPORT_NAME) for folder in gptfast.__path__]
    for path in paths:
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            continue
    return {}


def extension_entry(name: str) -> dict:
    """The report's entry for extension ``name`` ("cpu" or "cuda"), or {}."""
    entry = build_report().get(name)
    return entry if isinstance(entry, dict) else {}


def why_not_built(name: str) -> str | None:
    """The recorded reason extension ``name`` was not built, or None."""
    entry = extension_entry(name)
    return None if entry.get("built", True) else entry.get("reason")


def cpu_needs_avx2() -> bool:
    """Whether the CPU extension was compiled for AVX2 (assumed when no report says otherwise)."""
    simd = extension_entry("cpu").get("simd")
    return simd is None or simd == "avx2"
