"""The static key/value cache and the model checks the cached passes rely on."""

from __future__ import annotations

import copy

import torch

from ..models.blocks import from_library, has_global_call_hooks, has_own_call_hooks, runs_own_forward
from ..models.gpt import runs_fused_core

_BLOCK_PARTS = ("norm1", "att", "drop_resid", "ff", "norm2")
_ATTENTION_PARTS = ("W_query", "W_key", "W_value", "out_proj", "num_heads", "head_dim", "d_out")
_MODEL_PARTS = ("tok_emb", "pos_emb", "drop_emb", "trf_blocks", "final_norm", "out_head")
# Llama 3 / Qwen3 (gptfast's or the reference's, plain, KV-cache or batched variants): RoPE tables instead
# of position embeddings, grouped-query attention.
_ROTARY_BLOCK_PARTS = ("norm1", "att", "ff", "norm2")
_ROTARY_ATTENTION_PARTS = ("W_query", "W_key", "W_value", "out_proj", "num_heads", "num_kv_groups", "head_dim")
_ROTARY_MODEL_PARTS = ("tok_emb", "trf_blocks", "final_norm", "out_head", "cos", "sin")
# torch modules whose forward treats each position on its own.  The cached passes call a model's parts on fewer
# positions than its forward does (one token a step, only the last position at the prefill's last layer), which
# gives the same numbers only for such parts.
_POSITIONWISE_TORCH_MODULES = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Dropout, torch.nn.LayerNorm,
                               torch.nn.RMSNorm, torch.nn.GELU, torch.nn.SiLU, torch.nn.ReLU, torch.nn.Tanh,
                               torch.nn.Identity, torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)


def is_rotary(model) -> bool:
    """Whether ``model`` is a Llama 3 / Qwen3-style decoder (RoPE tables ``cos``/``sin``, no ``pos_emb``)."""
    return (isinstance(model, torch.nn.Module) and not hasattr(model, "pos_emb")
            and isinstance(getattr(model, "cos", None), torch.Tensor))


def _missing_parts(model, model_parts, block_parts, attention_parts):
    missing = [name for name in model_parts if not hasattr(model, name)]
    if not missing and len(model.trf_blocks) > 0:
        block = model.trf_blocks[0]
        missing = [f"trf_blocks[0].{n}" for n in block_parts if not hasattr(block, n)]
        if not missing:
            missing = [f"trf_blocks[0].att.{n}" for n in attention_parts if not hasattr(block.att, n)]
        if not missing:  # the cache takes its dtype and device from a projection's weight (a LoRA wrapper has none)
            missing = [f"trf_blocks[0].att.{n}.weight" for n in ("W_query", "W_key", "W_value")
                       if not isinstance(getattr(getattr(block.att, n), "weight", None), torch.Tensor)]
    return missing


def _blocks_like_the_first(model) -> bool:
    """Whether every block has the parts the walk reads, as the first block does, and the first block's head
    count and size: one cache, sized from the first block, serves every layer (a block replaced by another
    kind, or rebuilt with other heads, runs only through the model's forward)."""
    rotary = is_rotary(model)
    block_parts = _ROTARY_BLOCK_PARTS if rotary else _BLOCK_PARTS
    attention_parts = _ROTARY_ATTENTION_PARTS if rotary else _ATTENTION_PARTS
    first = model.trf_blocks[0].att

    def geometry(att):
        return tuple(getattr(att, name, None) for name in ("num_heads", "num_kv_groups", "head_dim")) + tuple(
            getattr(getattr(att, name), "weight", None).shape for name in ("W_query", "W_key", "W_value"))

    for block in model.trf_blocks:
        if not all(hasattr(block, name) for name in block_parts) or not all(
                hasattr(block.att, name) for name in attention_parts):
            return False
        if not all(isinstance(getattr(getattr(block.att, name), "weight", None), torch.Tensor)
                   for name in ("W_query", "W_key", "W_value")) or geometry(block.att) != geometry(first):
            return False
    return True


def check_decodable(model) -> None:
    """Raise ``TypeError`` unless ``model`` has a layout the cache code walks: the book's ``GPTModel``,
    or a Llama 3 / Qwen3 decoder (gptfast's or the reference's)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if is_rotary(model):
        missing = _missing_parts(model, _ROTARY_MODEL_PARTS, _ROTARY_BLOCK_PARTS, _ROTARY_ATTENTION_PARTS)
        if missing:
            raise TypeError(f"model must have the Llama 3 / Qwen3 layout of gptfast.llama3 / gptfast.qwen3; "
                            f"{type(model).__name__} lacks {', '.join(missing)}")
        return
    missing = _missing_parts(model, _MODEL_PARTS, _BLOCK_PARTS, _ATTENTION_PARTS)
    if missing:
        raise TypeError(
            f"model must have the book's GPTModel layout (gptfast.GPTModel or llms_from_scratch.ch04.GPTModel) "
            f"or be a Llama 3 / Qwen3 model; {type(model).__name__} lacks {', '.join(missing)}")


def is_decodable(model) -> bool:
    """Whether the cached passes can walk ``model`` (other callables fall back to the uncached loop)."""
    try:
        check_decodable(model)
    except TypeError:
        if not isinstance(model, torch.nn.Module) and not callable(model):
            raise
        return False
    return True


def _active_dropout(module) -> bool:
    """True for a module in training mode that drops: an ``nn.Dropout`` with ``p > 0``, or an attention module
    holding its dropout rate as a float (gptfast's fused ``MultiHeadAttention``)."""
    if not module.training:
        return False
    if isinstance(module, torch.nn.modules.dropout._DropoutNd):
        return module.p > 0
    rate = getattr(module, "dropout", None)
    return isinstance(rate, float) and rate > 0


def walk_reproduces_forward(model) -> bool:
    """Whether the cached passes compute what ``model(idx)`` does, so generation may take them.

    They call the model's parts themselves, in place of the forward of the model, of its ``trf_blocks``,
    of its blocks and of their attention modules: those must run the library's own forward, unpatched,
    every entry of ``trf_blocks`` must be a block (and there must be one), and a GPT attention's mask and
    dropout module must be the book's (:func:`gptfast.models.gpt.runs_fused_core`).  They call the other
    parts on fewer positions than the forward does, so no module of the model may run a hook (a hook may
    look at every position, or record what it is given) or a ``forward`` set on the instance.
    And no dropout may be active: the cached passes see fewer positions per call, so their random
    draws would differ from the reference's (a model in training mode with dropout runs uncached).
    A ``torch.compile`` wrapper is looked through: the compiled forward computes the model's.
    """
    model = getattr(model, "_orig_mod", model)
    blocks = model.trf_blocks
    if type(blocks) not in (torch.nn.Sequential, torch.nn.ModuleList) or len(blocks) == 0 or not all(
            all(hasattr(block, name) for name in _ROTARY_BLOCK_PARTS) for block in blocks):
        # A container of its own, no block at all, or an entry that is not a block: only calling it is right.
        return False
    if not _blocks_like_the_first(model):
        return False
    bypassed = [model, blocks, *blocks, *(block.att for block in blocks)]
    if not all(runs_own_forward(module) for module in bypassed):
        return False
    if has_global_call_hooks() or any(has_own_call_hooks(module) or "forward" in module.__dict__
                                      or _active_dropout(module) for module in model.modules()):
        return False
    # A GPT attention's core is the fused op only with the causal mask and a plain dropout module.
    return all(runs_fused_core(block.att) for block in blocks
               if isinstance(getattr(block.att, "dropout", None), torch.nn.Module))


def _known_positionwise(module) -> bool:
    """True for a module of gptfast or the reference, or a torch module known to treat positions one by one."""
    return from_library(type(module)) or type(module) in _POSITIONWISE_TORCH_MODULES


def walk_needs_probe(model) -> bool:
    """True when the model, a block or an attention module is a class of the user's own (outside gptfast and
    the reference), say the book's code copied into a notebook, or when another part is neither a library
    module nor a position-wise torch module (a feed-forward of the user's, say): the layout matches the book's,
    but only the logits can show that the forward computes what the cached passes do."""
    model = getattr(model, "_orig_mod", model)
    bypassed = [model, *model.trf_blocks, *(block.att for block in model.trf_blocks)]
    return not (all(from_library(type(module)) for module in bypassed)
                and all(_known_positionwise(module) for module in model.modules()))


def context_length(model) -> int:
    """The number of positions the model has embeddings (or RoPE table rows) for."""
    if is_rotary(model):
        return model.cos.shape[0]
    return model.pos_emb.weight.shape[0]


def prepare_model(model, dtype=None, device=None):
    """``model`` itself, or a converted copy when ``dtype``/``device`` differ from the model's.

    The copy keeps every buffer, the attention ``mask`` included: a model whose forward the cached
    passes cannot stand in for runs that forward, which reads it.
    """
    check_decodable(model)
    weight = model.trf_blocks[0].att.W_key.weight
    dtype = weight.dtype if dtype is None else dtype
    device = weight.device if device is None else torch.device(device)
    if dtype == weight.dtype and device == weight.device:
        return model
    if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    converted = copy.deepcopy(model).to(device=device, dtype=dtype)
    if is_rotary(model):  # RoPE tables keep their precision (the models compute them in float32)
        converted.cos = model.cos.to(device)
        converted.sin = model.sin.to(device)
    return converted


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
        heads = att.num_kv_groups if is_rotary(model) else att.num_heads  # grouped-query: one per kv head
        return cls(len(model.trf_blocks), batch, heads, max_len, att.head_dim,
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
