"""The static key/value cache and the model checks the cached passes rely on."""

from __future__ import annotations

import copy

import torch

_BLOCK_PARTS = ("norm1", "att", "drop_resid", "ff", "norm2")
_ATTENTION_PARTS = ("W_query", "W_key", "W_value", "out_proj", "num_heads", "head_dim", "d_out")
_MODEL_PARTS = ("tok_emb", "pos_emb", "drop_emb", "trf_blocks", "final_norm", "out_head")


def check_decodable(model) -> None:
    """Raise ``TypeError`` unless ``model`` has the book's ``GPTModel`` layout the cache code walks."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    missing = [name for name in _MODEL_PARTS if not hasattr(model, name)]
    if not missing and len(model.trf_blocks) > 0:
        block = model.trf_blocks[0]
        missing = [f"trf_blocks[0].{n}" for n in _BLOCK_PARTS if not hasattr(block, n)]
        if not missing:
            missing = [f"trf_blocks[0].att.{n}" for n in _ATTENTION_PARTS if not hasattr(block.att, n)]
    if missing:
        raise TypeError(
            f"model must have the book's GPTModel layout (gptfast.GPTModel or llms_from_scratch.ch04.GPTModel); "
            f"{type(model).__name__} lacks {', '.join(missing)}")


def is_decodable(model) -> bool:
    """Whether the cached passes can walk ``model`` (other callables fall back to the uncached loop)."""
    try:
        check_decodable(model)
    except TypeError:
        if not isinstance(model, torch.nn.Module) and not callable(model):
            raise
        return False
    return True


def context_length(model) -> int:
    """The number of positions the model has embeddings for."""
    return model.pos_emb.weight.shape[0]


def prepare_model(model, dtype=None, device=None):
    """``model`` itself, or a converted copy when ``dtype``/``device`` differ from the model's.

    The copy drops the attention ``mask`` buffers: the cached path never reads
    them, and at context 1024 they are 4 MiB per layer.
    """
    check_decodable(model)
    weight = model.trf_blocks[0].att.W_key.weight
    dtype = weight.dtype if dtype is None else dtype
    device = weight.device if device is None else torch.device(device)
    if dtype == weight.dtype and device == weight.device:
        return model
    if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    converted = copy.deepcopy(model)
    for block in converted.trf_blocks:
        block.att._buffers.pop("mask", None)
    return converted.to(device=device, dtype=dtype)


class KVCache:
    """Preallocated keys and values of every layer, each ``(batch, heads, max_len, head_dim)``.

    ``keys[i][b, :, p]`` holds layer ``i``'s key of row ``b`` at position ``p``.
    Nothing grows during generation; :meth:`keep_rows` shrinks the batch when
    rows finish, so finished rows stop costing attention work.
    """

    def __init__(self, n_layers, batch, heads, max_len, head_dim, *, dtype=torch.float32, device="cpu"):
        for name, value in (("n_layers", n_layers), ("batch", batch), ("heads", heads), ("max_len", max_len),
                            ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        shape = (batch, heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]

    @classmethod
    def for_model(cls, model, batch, max_len):
        """A cache shaped for ``model``; ``max_len`` may not exceed its context length."""
        check_decodable(model)
        limit = context_length(model)
        if isinstance(max_len, int) and not isinstance(max_len, bool) and max_len > limit:
            raise ValueError(f"max_len {max_len} exceeds the model's context length {limit}")
        att = model.trf_blocks[0].att
        weight = att.W_key.weight
        return cls(len(model.trf_blocks), batch, att.num_heads, max_len, att.head_dim,
                   dtype=weight.dtype, device=weight.device)

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def nbytes(self) -> int:
        """Bytes held by all keys and values."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only cache rows ``rows`` (a 1-D index tensor), in that order."""
        rows = rows.to(self.keys[0].device)
        self.keys = [t.index_select(0, rows) for t in self.keys]
        self.values = [t.index_select(0, rows) for t in self.values]
