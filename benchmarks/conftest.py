"""Benchmark-wide setup: offline tokenizer files, and ``benchmarks/`` importable for ``bench_utils``.

Unlike ``tests/conftest.py`` this does not turn on Triton's interpreter: interpreted Triton is
never benchmarked (``bench_utils.bench_backends`` leaves it out).
"""

import os
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
SHARED_DATA = HERE.parents[1] / "shared" / "data"
if (SHARED_DATA / "tiktoken-cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_DATA / "tiktoken-cache"))
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
