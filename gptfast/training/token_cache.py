"""Token data for the pretraining script: text tokenised once into a cached uint16 file, read memory-mapped.

GPT-2's 50,257 token ids fit in 16 bits, so a corpus costs two bytes per token on
disk and nothing in RAM beyond the pages the batches touch.  The cache file's name
is a hash of the source files' paths, sizes and modification times, so editing a
file re-tokenises it and nothing else does.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from ..data import read_utf8_text
from ..files import atomic_write, atomic_write_text
from ..models.gpt_config import GPT2_VOCAB_SIZE
from ..tokenizer import ENDOFTEXT, ENDOFTEXT_ID, get_tokenizer

TEXT_SUFFIXES = (".txt", ".md", ".text")


def find_text_files(path) -> list[Path]:
    """The text files behind ``--data``: the file itself, or every text file under a folder (sorted)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"--data folder {path} holds no text files ({', '.join(TEXT_SUFFIXES)})")
        return files
    raise FileNotFoundError(f"--data path not found: {path}")


def cache_key(files: list[Path]) -> str:
    """Hash of the files' absolute paths, sizes and mtimes: changes whenever a source changes."""
    h = hashlib.sha1(b"gpt2-uint16-v1")
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _tokenise(files: list[Path]) -> np.ndarray:
    """GPT-2 token ids of the files, an end-of-text token between consecutive files."""
    tokenizer = get_tokenizer()
    pieces = []
    for i, f in enumerate(files):
        ids = tokenizer.encode(read_utf8_text(f, name="--data: "), allowed_special={ENDOFTEXT})
        if i > 0:
            pieces.append(np.array([ENDOFTEXT_ID], dtype=np.uint16))
        pieces.append(np.asarray(ids, dtype=np.uint16))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint16)


def _complete(target: Path) -> bool:
    """True when ``target`` holds as many tokens as the ``.json`` record written after it says.  A cache cut
    short (a full disk, a copy stopped half-way) or one whose record is missing (the run stopped between the
    two files) is not reused; nor is a missing one."""
    try:
        recorded = json.loads(target.with_suffix(".json").read_text()).get("tokens")
        size = target.stat().st_size
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(recorded, int) and size == 2 * recorded


def build_token_cache(data_path, cache_dir) -> Path:
    """Tokenise ``data_path`` into ``cache_dir/<hash>.bin`` unless a complete one exists; return its path."""
    files = find_text_files(data_path)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"{cache_key(files)}.bin"
    if _complete(target):
        return target
    tokens = _tokenise(files)
    # Written to a temporary file and renamed: readers never see a half-written cache.
    with atomic_write(target, "wb") as handle:
        handle.write(tokens.tobytes())
    meta = {"files": [str(f) for f in files], "tokens": int(tokens.size), "dtype": "uint16"}
    atomic_write_text(target.with_suffix(".json"), json.dumps(meta, indent=1))
    return target


def load_tokens(cache_file, vocab_size: int = GPT2_VOCAB_SIZE) -> np.ndarray:
    """The cached token ids as a read-only uint16 memory map, checked to be whole ids below ``vocab_size``.

    A cache whose size is odd (truncated) or that holds an id outside the vocabulary (a foreign
    or damaged file) raises ``ValueError`` here, not an index error deep inside a training step.
    """
    cache_file = Path(cache_file)
    size = cache_file.stat().st_size
    if size % 2:
        raise ValueError(f"token cache {cache_file} has an odd size ({size} bytes): it is truncated or not a "
                         f"uint16 token file; delete it to re-tokenise")
    if size == 0:
        return np.zeros(0, dtype=np.uint16)
    tokens = np.memmap(cache_file, dtype=np.uint16, mode="r")
    high = int(tokens.max())
    if high >= vocab_size:
        raise ValueError(f"token cache {cache_file} holds token id {high}, outside the vocabulary [0, {vocab_size}):"
                         f" delete it to re-tokenise")
    return tokens


class TokenWindows:
    """Random ``(input, target)`` windows of ``context_length`` tokens drawn from a token array.

    The windows of a step depend only on ``(seed, step)``, so the data order is
    reproducible, resumable from any step, and identical however the global batch
    is split across processes (each rank takes its own slice of the same draw).
    """

    def __init__(self, tokens: np.ndarray, context_length: int, seed: int, name: str = "--data"):
        if len(tokens) < context_length + 1:
            raise ValueError(
                f"{name} is shorter than one training window: it has {len(tokens)} tokens, and "
                f"--context-length {context_length} needs at least {context_length + 1} "
                f"(use more text or a shorter --context-length)")
        self.tokens = tokens
        self.context_length = context_length
        self.seed = seed

    def step_offsets(self, step: int, count: int) -> torch.Tensor:
        """``count`` window start positions for optimizer step ``step``."""
        # Modulo 2**64, the range torch's generators take: a large --seed still has its own draws.
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + step) % 2**64)
        return torch.randint(0, len(self.tokens) - self.context_length, (count,), generator=generator)

    def gather(self, offsets) -> tuple[torch.Tensor, torch.Tensor]:
        """Input and target ``(len(offsets), context_length)`` int64 tensors for these start positions."""
        span = self.context_length + 1
        rows = np.stack([np.asarray(self.tokens[o:o + span], dtype=np.int64) for o in offsets.tolist()])
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]

    def fixed_windows(self, max_windows: int):
        """Non-overlapping windows from the start, in order: a fixed evaluation set."""
        count = min(max_windows, (len(self.tokens) - 1) // self.context_length)
        return self.gather(torch.arange(count) * self.context_length)


def split_tokens(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """First ``1 - val_fraction`` of the tokens for training, the rest for validation."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    cut = len(tokens) - int(len(tokens) * val_fraction)
    return tokens[:cut], tokens[cut:]
