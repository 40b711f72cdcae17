"""Benchmark-wide setup: the offline tokenizer files, and ``benchmarks/`` importable for ``bench_utils``.

Unlike ``tests/conftest.py`` this does not turn on Triton's interpreter: interpreted Triton is
never benchmarked (``bench_utils.bench_backends`` leaves it out).
"""

import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
for folder in (HERE, HERE.parent / "tests"):  # bench_utils; the tests' offline-data helper
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from offline_data import use_private_tiktoken_cache  # noqa: E402

use_private_tiktoken_cache()  # the GPT-2 BPE files shipped for the tests: no network needed
