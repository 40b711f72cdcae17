"""The offline files the tests and benchmarks need, laid out where the libraries look for them."""

import atexit
import os
import pathlib
import shutil
import tempfile

SHIPPED_TIKTOKEN_FILES = pathlib.Path(__file__).resolve().parent / "data" / "tiktoken-cache"


def use_private_tiktoken_cache() -> str:
    """Point ``$TIKTOKEN_CACHE_DIR`` at a temporary copy of the shipped GPT-2 BPE files (removed at exit).

    ``tiktoken.get_encoding("gpt2")`` (used by the reference package and the tokenizer tests) then
    needs no network and nothing beside the clone.  A copy, because tiktoken also writes a derived
    cache file into that folder, which must not land in the checkout.
    """
    folder = tempfile.mkdtemp(prefix="gptfast-tiktoken-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    for source in SHIPPED_TIKTOKEN_FILES.iterdir():
        shutil.copyfile(source, os.path.join(folder, source.name))
    os.environ["TIKTOKEN_CACHE_DIR"] = folder
    return folder
