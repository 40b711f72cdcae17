"""Sliding-window next-token datasets (chapter 2) and text loading helpers."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from .resources import default_text
from .tokenizer import ENDOFTEXT, get_tokenizer


def _token_id_tensor(ids):
    """``ids`` (the tokenizer's output) as an int64 tensor; ids that are not integers are a ``TypeError``.

    Converting with ``dtype=torch.long`` straight away would cut 1.5 to 1, a valid-looking id.
    """
    values = torch.as_tensor(ids)
    if values.numel() and (values.is_floating_point() or values.is_complex() or values.dtype == torch.bool):
        raise TypeError(f"tokenizer.encode must return integer token ids, got {values.dtype} values")
    return values.to(torch.long)


class GPTDatasetV1(Dataset):
    """Overlapping ``(input, target)`` windows of ``max_length`` tokens, ``stride`` apart.

    The target window is the input window shifted by one token.  ``input_ids`` and
    ``target_ids`` are 2-D tensors (one row per window) rather than lists of tensors,
    which gives the same items without one Python object per window.
    """

    def __init__(self, txt, tokenizer, max_length, stride):
        if max_length < 1 or stride < 1:
            raise ValueError(f"max_length and stride must be >= 1, got {max_length} and {stride}")
        self.tokenizer = tokenizer
        token_ids = _token_id_tensor(tokenizer.encode(txt, allowed_special={ENDOFTEXT}))
        # Windows start at 0, stride, ... while a full input plus its shifted target fits.
        windows = token_ids.unfold(0, max_length + 1, stride) if len(token_ids) > max_length else \
            token_ids.new_empty((0, max_length + 1))
        # Copies, not views of the overlapping windows: as in the reference, each window owns its tokens, so a
        # change to one item (in place) leaves the neighbouring windows and the targets as they were.
        self.input_ids = windows[:, :-1].clone()
        self.target_ids = windows[:, 1:].clone()

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, idx):
        return self.input_ids[idx], self.target_ids[idx]


def create_dataloader_v1(txt, batch_size=4, max_length=256, stride=128, shuffle=True, drop_last=True,
                         num_workers=0):
    """DataLoader over ``GPTDatasetV1`` windows of ``txt``, tokenized with GPT-2's BPE.

    A text too short for one window gives an empty loader when ``shuffle`` is False, as the reference's does
    (chapter 5's validation split with a long context; its loss loader then reports nan); a shuffled one
    cannot sample from nothing, so it raises, naming the sizes.
    """
    dataset = GPTDatasetV1(txt, get_tokenizer(), max_length, stride)
    if len(dataset) == 0 and shuffle:
        raise ValueError(_too_short_for_one_window(txt, dataset.tokenizer, max_length))
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=num_workers)


def _too_short_for_one_window(txt, tokenizer, max_length) -> str:
    tokens = len(tokenizer.encode(txt, allowed_special={ENDOFTEXT}))
    return f"txt is too short for one window: it has {tokens} tokens and max_length={max_length} needs at least " \
           f"{max_length + 1}"


def load_text(path=None) -> str:
    """Read a UTF-8 text file, or the embedded the-verdict when ``path`` is None.

    A missing file is a ``FileNotFoundError``; a folder, or a file that is not UTF-8, a ``ValueError`` naming it.
    """
    if path is None:
        return default_text()
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"data file {path} is a folder, not a text file")
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    return read_utf8_text(path, name="data file ")


def read_utf8_text(path: Path, name: str = "") -> str:
    """The text of ``path``; a file that is not UTF-8 is a ``ValueError`` saying ``{name}{path}`` and its first
    bad byte, a failed read an ``OSError`` saying the same."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{name}{path} is not UTF-8 text: byte {exc.object[exc.start]:#04x} at offset "
                         f"{exc.start} ({exc.reason})") from None
    except OSError as exc:
        if exc.filename is not None:
            raise
        # A read that fails after the open (an I/O error) carries no file name: the message would not say which.
        error = OSError(f"could not read {name}{path}: {exc.strerror or exc}")
        error.errno = exc.errno
        raise error from exc


def train_val_loaders(text, cfg, batch_size=2, train_ratio=0.90, seed=123):
    """The chapter-5 split: first ``train_ratio`` of the characters for training, the rest for validation.

    ``train_ratio`` must lie strictly between 0 and 1 (Python's slicing would read a negative one from the end);
    a split too short for one window raises a ``ValueError`` saying which split.
    """
    if not 0 < train_ratio < 1:
        raise ValueError(f"train_ratio must lie strictly between 0 and 1, got {train_ratio}")
    split = int(train_ratio * len(text))
    ctx = cfg["context_length"]
    torch.manual_seed(seed)
    share = f"{100 * train_ratio:.3g}%"
    train_loader = _split_loader(text[:split], f"the training split (the first {share} of the text)",
                                 batch_size=batch_size, max_length=ctx, stride=ctx, drop_last=True, shuffle=True,
                                 num_workers=0)
    val_loader = _split_loader(text[split:], f"the validation split (the text after the first {share})",
                               batch_size=batch_size, max_length=ctx, stride=ctx, drop_last=False, shuffle=False,
                               num_workers=0)
    return train_loader, val_loader


def _split_loader(text, split_name, **loader_kwargs):
    """``create_dataloader_v1(text, **loader_kwargs)``; a split too short for one window is named in the error
    (an empty training split would train on nothing, an empty validation split report nan losses)."""
    try:
        loader = create_dataloader_v1(text, **loader_kwargs)
    except ValueError as exc:
        raise ValueError(f"{split_name}: {exc}") from None
    if len(loader.dataset) == 0:
        message = _too_short_for_one_window(text, loader.dataset.tokenizer, loader_kwargs["max_length"])
        raise ValueError(f"{split_name}: {message}")
    return loader
