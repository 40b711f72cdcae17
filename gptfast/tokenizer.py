"""GPT-2 byte-pair tokenizer that works offline.

gptfast ships the GPT-2 ranks file (the ``.tiktoken`` file tiktoken itself
downloads for ``get_encoding("gpt2")``), so building the encoding needs no network.
"""

from __future__ import annotations

import base64
import functools

import tiktoken

from .resources import resource_path

ENDOFTEXT = "<|endoftext|>"
ENDOFTEXT_ID = 50256

# The r50k/gpt2 split pattern, as tiktoken defines it for this encoding.
try:
    from tiktoken_ext.openai_public import r50k_pat_str as _GPT2_PATTERN
except ImportError:  # older tiktoken without the constant
    _GPT2_PATTERN = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def read_tiktoken_ranks(path) -> dict[bytes, int]:
    """Parse a tiktoken BPE file (one ``base64-token rank`` pair per line).

    Read directly rather than through ``tiktoken.load``, which copies a local file into its
    download cache (a shared temporary folder by default) and later reads that copy unchecked.
    """
    ranks = {}
    with open(path, "rb") as handle:
        contents = handle.read()
    # Any line ending and a leading byte-order mark are accepted: tiktoken's reader (the reference's) takes both.
    contents = contents.removeprefix(b"\xef\xbb\xbf")
    for number, line in enumerate(contents.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as exc:
            raise ValueError(f"{path} line {number} is not 'base64-token rank': {line[:80]!r}") from exc
    if not ranks:
        raise ValueError(f"{path} holds no BPE ranks")
    return ranks


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 encoding (50,257 tokens), equal to ``tiktoken.get_encoding("gpt2")``."""
    ranks = read_tiktoken_ranks(resource_path("gpt2.tiktoken"))
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=_GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: ENDOFTEXT_ID},
        explicit_n_vocab=50257,
    )
