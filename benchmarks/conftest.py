"""Benchmark-wide setup: the offline tokenizer files, and ``benchmarks/`` importable for ``bench_utils``.

Unlike ``tests/conftest.py`` this does not turn on Triton's interpreter: interpreted Triton is
never benchmarked (``bench_utils.bench_backends`` leaves it out).
"""

import os
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
# The GPT-2 BPE files shipped for the tests: tiktoken.get_encoding("gpt2") then needs no network.
os.environ["TIKTOKEN_CACHE_DIR"] = str(HERE.parent / "tests" / "data" / "tiktoken-cache")
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
