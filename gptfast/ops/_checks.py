"""Input validation shared by every backend.

Everything here runs in Python before a kernel is launched, so bad input gets a
``TypeError``/``ValueError`` naming the argument instead of a crash inside C++,
CUDA or Triton.  Checks that would need a device-to-host copy (the values of
targets or per-row parameters on a GPU) are only done for CPU tensors; the GPU
kernels bounds-check those values themselves.
"""

from __future__ import annotations

import numbers

import torch


class TargetOutOfRange(ValueError, IndexError):
    """A class id outside the logits' classes: a ``ValueError`` as every bad argument here, and the
    ``IndexError`` torch's ``F.cross_entropy`` (the reference's loss) raises for it."""

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)
INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)
TARGET_DTYPES = (torch.int64, torch.int32, torch.uint8)  # class indices: torch's cross-entropy also takes uint8
REDUCTIONS = ("mean", "sum", "none")


def as_int(value):
    """``value`` as an int when it is a 0-d integer tensor (the reference indexes with either), else unchanged."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype in INTEGER_DTYPES:
        return int(value)
    return value


def require_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _type_name(value) -> str:
    """``value``'s type as a user would write it: ``bool``, ``numpy.bool``, ``str``."""
    cls = type(value)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def require_bool(name: str, value) -> bool:
    """``value`` as a bool: a Python bool or a numpy one, nothing merely truthy (``"no"`` would switch it on)."""
    if isinstance(value, bool):
        return value
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {_type_name(value)}")


def require_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32/float16/bfloat16/float64), got {t.dtype}")


def require_same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    for name, device in devices.items():
        if device != first:
            listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
            raise ValueError(f"all inputs must be on one device, got {listing}")
    return first


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type``; False for a device autocast does not know (meta)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def autocast_unifies(*tensors) -> bool:
    """True when these floating tensors differ in dtype and autocast will cast them to its one dtype before the
    product, as it casts the inputs of ``F.linear`` or ``matmul``: it is on for their device and none is float64
    (which it leaves alone).  Mixed dtypes are then no error, as they are not for those functions."""
    present = [t for t in tensors if isinstance(t, torch.Tensor)]  # a non-tensor is refused by its own check
    return (len({t.dtype for t in present}) > 1 and autocast_enabled(present[0].device.type)
            and all(t.dtype != torch.float64 for t in present))


def check_linear_dtypes(input_name: str, x, weight, bias) -> None:
    """A product's ``x`` (named ``input_name``), ``weight`` and ``bias`` (or None) share one dtype, unless autocast
    casts them to its own (:func:`autocast_unifies`); the bias is also checked for its shape."""
    cast = autocast_unifies(x, weight, bias)
    if weight.dtype != x.dtype and not cast:
        raise TypeError(f"{input_name} and weight must share one dtype, got {x.dtype} and {weight.dtype}")
    if bias is not None:
        check_bias(bias, weight.shape[0], None if cast else x.dtype, input_name)


def check_attention(q, k, v, dropout_p, scale, training=False) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        require_tensor(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, tokens, head_dim), got shape {tuple(t.shape)}")
        require_float(name, t)
    require_same_device(q=q, k=k, v=v)
    if not (q.dtype == k.dtype == v.dtype) and not autocast_unifies(q, k, v):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    (b, h, tq, d), (h_kv, tk) = q.shape, k.shape[1:3]
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch and head_dim")
    # At least one query head per key/value head: a group of none (q with 0 heads, k with some) has no meaning,
    # and the kernels would divide by it.
    if (h_kv == 0) != (h == 0) or (h_kv != 0 and h % h_kv != 0):
        raise ValueError(
            f"k has {h_kv} heads but q has {h}: the query heads must be a whole multiple of the key/value heads "
            f"(grouped-query attention), got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if tq == 0 or d == 0:
        raise ValueError(f"q must have at least one token and a non-empty head_dim, got shape {tuple(q.shape)}")
    if tq > tk:
        raise ValueError(
            f"q has {tq} tokens but k/v only {tk}: queries are the last positions of the keys, so Tq <= Tk")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1], got {dropout_p!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not scale > 0):
        raise ValueError(f"scale must be None or a positive number, got {scale!r}")
    require_bool("training", training)


def check_reduction(reduction) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_targets(targets: torch.Tensor, expected_shape, num_classes: int, ignore_index: int) -> None:
    require_tensor("targets", targets)
    if targets.dtype not in TARGET_DTYPES:
        raise TypeError(f"targets must be an int64, int32 or uint8 tensor of class indices, got {targets.dtype}")
    if tuple(targets.shape) != tuple(expected_shape):
        raise ValueError(f"targets must have shape {tuple(expected_shape)}, got {tuple(targets.shape)}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not -2**63 <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    # Values are read on CPU only (a GPU read would wait for the device) and not while torch.compile traces
    # (a read breaks the graph); the kernels bounds-check every target themselves.
    if targets.device.type == "cpu" and targets.numel() > 0 and not torch.compiler.is_compiling():
        targets = comparable_targets(targets, ignore_index)
        bad = ((targets < 0) | (targets >= num_classes)) & (targets != ignore_index)
        if bool(bad.any()):
            value = int(targets[bad][0])
            raise TargetOutOfRange(f"targets contains {value}, outside [0, {num_classes}) and not "
                                   f"ignore_index={ignore_index}")


def check_bias(bias, rows: int, dtype: torch.dtype | None, input_name: str) -> None:
    """A linear layer's ``bias``: a ``(rows,)`` tensor of its input's ``dtype`` (``input_name`` says which input;
    ``dtype`` None: any floating dtype, autocast casting them all)."""
    require_tensor("bias", bias)
    if bias.shape != (rows,):
        raise ValueError(f"bias must have shape ({rows},), got {tuple(bias.shape)}")
    if dtype is None:
        require_float("bias", bias)
    elif bias.dtype != dtype:
        raise TypeError(f"bias must have {input_name}'s dtype {dtype}, got {bias.dtype}")


def comparable_targets(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``targets`` as they may be compared with ``ignore_index``: int32 targets widened to int64 when
    ``ignore_index`` lies outside int32 (torch compares a Python int with an int32 tensor in int32, where
    it wraps: 2**32 + 1 would match 1, which the kernels, comparing in int64, do not ignore); uint8 targets
    (which torch's cross-entropy takes) widened to int64, the kernels' index type."""
    if targets.dtype == torch.uint8 or (targets.dtype == torch.int32 and not -2**31 <= ignore_index < 2**31):
        return targets.long()
    return targets


def check_cross_entropy(logits, targets, ignore_index, reduction) -> None:
    require_tensor("logits", logits)
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be (N, V) or (B, T, V), got shape {tuple(logits.shape)}")
    require_float("logits", logits)
    if logits.shape[-1] == 0:
        raise ValueError("logits must have at least one class")
    check_targets(targets, logits.shape[:-1], logits.shape[-1], ignore_index)
    require_same_device(logits=logits, targets=targets)
    check_reduction(reduction)


def check_linear_cross_entropy(hidden, weight, targets, bias, ignore_index, reduction) -> None:
    require_tensor("hidden", hidden)
    require_tensor("weight", weight)
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be (N, H) or (B, T, H), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be (V, H) with H={hidden.shape[-1]} to match hidden, got shape {tuple(weight.shape)}")
    require_float("hidden", hidden)
    require_float("weight", weight)
    check_linear_dtypes("hidden", hidden, weight, bias)
    if bias is not None:
        require_same_device(hidden=hidden, bias=bias)
    check_targets(targets, hidden.shape[:-1], weight.shape[0], ignore_index)
    require_same_device(hidden=hidden, weight=weight, targets=targets)
    check_reduction(reduction)


def _check_per_row(name, value, batch, device, integer):
    if value.dim() == 0:
        value = value.expand(batch)
    if value.shape != (batch,):
        raise ValueError(f"{name} as a tensor must have one value per row, shape ({batch},), got {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} must be on the logits' device {device}, got {value.device}")
    if integer and value.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} as a tensor must be int64 or int32, got {value.dtype}")
    if not integer and value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} as a tensor must be floating, got {value.dtype}")
    return value


def normalize_sampling_args(logits, temperature, top_k, generator):
    """Validate the sampling arguments; return ``(temperature, top_k)`` as python numbers or per-row tensors.

    Per-row tensors come back as float32 temperatures and int64 top_k of shape ``(B,)``.
    """
    require_tensor("logits", logits)
    if logits.dim() != 2:
        raise ValueError(f"logits must be (batch, vocab), got shape {tuple(logits.shape)}")
    require_float("logits", logits)
    batch, vocab = logits.shape
    if vocab == 0:
        raise ValueError("logits must have at least one column")

    if isinstance(temperature, torch.Tensor):
        temperature = _check_per_row("temperature", temperature, batch, logits.device, integer=False)
        temperature = temperature.to(torch.float32).contiguous()
        if temperature.device.type == "cpu" and bool(((temperature < 0) | temperature.isnan()).any()):
            raise ValueError("temperature must be >= 0 in every row")
    elif isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a number or a tensor, got {type(temperature).__name__}")
    elif not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    else:
        temperature = float(temperature)

    if isinstance(top_k, torch.Tensor):
        top_k = _check_per_row("top_k", top_k, batch, logits.device, integer=True)
        top_k = top_k.to(torch.int64).contiguous()
        if top_k.device.type == "cpu" and bool(((top_k < 1) | (top_k > vocab)).any()):
            raise ValueError(f"top_k must be in [1, {vocab}] in every row")
    elif top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
            raise TypeError(f"top_k must be None, an int or a tensor, got {type(top_k).__name__}")
        if not 1 <= top_k <= vocab:
            raise ValueError(f"top_k must be in [1, vocab size {vocab}], got {top_k}")
        top_k = int(top_k)

    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != logits.device.type:
            raise ValueError(f"generator is on {generator.device} but logits on {logits.device}")
    return temperature, top_k


def require_positive_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _check_row_norm(x, **params) -> None:
    """x ``(..., D)`` with a non-empty last axis and each of ``params`` a ``(D,)`` float tensor on x's device."""
    for name, t in (("x", x), *params.items()):
        require_tensor(name, t)
        require_float(name, t)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last axis (..., D), got shape {tuple(x.shape)}")
    for name, t in params.items():
        if t.shape != (x.shape[-1],):
            raise ValueError(f"{name} must have shape ({x.shape[-1]},) to match x's last axis, got {tuple(t.shape)}")
    require_same_device(x=x, **params)


def check_rms_norm(x, weight, eps) -> None:
    _check_row_norm(x, weight=weight)
    require_positive_number("eps", eps)


def require_non_negative_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0 or value == float("inf"):
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")
    return float(value)


def check_layer_norm(x, weight, bias, eps) -> None:
    _check_row_norm(x, weight=weight, bias=bias)
    require_non_negative_number("eps", eps)


def check_swiglu(gate, up) -> None:
    require_tensor("gate", gate)
    require_tensor("up", up)
    require_float("gate", gate)
    require_float("up", up)
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have one shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.dtype != up.dtype:
        raise TypeError(f"gate and up must share one dtype, got {gate.dtype} and {up.dtype}")
    require_same_device(gate=gate, up=up)


def check_gelu(x) -> None:
    require_tensor("x", x)
    require_float("x", x)


def check_dropout(x, p, training) -> None:
    require_tensor("x", x)
    require_float("x", x)
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be a number in [0, 1], got {p!r}")
    require_bool("training", training)


def check_rope(x, cos, sin, offset, positions) -> None:
    require_tensor("x", x)
    require_tensor("cos", cos)
    require_tensor("sin", sin)
    require_float("x", x)
    require_float("cos", cos)
    require_float("sin", sin)
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (batch, heads, tokens, head_dim), got shape {tuple(x.shape)}")
    batch, _, tokens, head_dim = x.shape
    if head_dim == 0 or head_dim % 2 != 0:
        raise ValueError(f"x's head_dim must be even and non-zero for rotary embeddings, got {head_dim}")
    if cos.dim() != 2 or cos.shape[1] != head_dim or sin.shape != cos.shape:
        raise ValueError(f"cos and sin must both be (positions, {head_dim}), got {tuple(cos.shape)} and "
                         f"{tuple(sin.shape)}")
    require_same_device(x=x, cos=cos, sin=sin)
    if isinstance(offset, bool) or not isinstance(offset, numbers.Integral):
        raise TypeError(f"offset must be an int, got {offset!r}")
    offset = int(offset)  # a numpy integer would wrap in the sum below, letting a far offset through
    table = cos.shape[0]
    if positions is None:
        if offset < 0 or offset + tokens > table:
            raise ValueError(f"positions {offset}..{offset + tokens - 1} lie outside the RoPE tables' {table} "
                             "positions (context_length)")
        return
    require_tensor("positions", positions)
    if positions.dtype not in INDEX_DTYPES:
        raise TypeError(f"positions must be an int64 or int32 tensor, got {positions.dtype}")
    if positions.shape != (batch, tokens):
        raise ValueError(f"positions must have shape ({batch}, {tokens}), one per batch row and token, got "
                         f"{tuple(positions.shape)}")
    if offset != 0:
        raise ValueError(f"offset must be 0 when positions are given, got {offset}")
    require_same_device(x=x, positions=positions)
    # Under torch.compile the values are not known while tracing: the kernels' own bounds checks stand then.
    if positions.device.type == "cpu" and positions.numel() > 0 and not torch.compiler.is_compiling():
        low, high = int(positions.min()), int(positions.max())
        if low < 0 or high >= table:
            raise ValueError(f"positions contains {low if low < 0 else high}, outside the RoPE tables' "
                             f"[0, {table}) (context_length)")
def check_decode_linear(x, weight, bias) -> None:
    require_tensor("x", x)
    require_tensor("weight", weight)
    require_float("x", x)
    require_float("weight", weight)
    if x.dim() < 1:
        raise ValueError(f"x must be (..., K), got a 0-d tensor")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must be (N, K) with K={x.shape[-1]} to match x's last axis, got shape "
                         f"{tuple(weight.shape)}")
    check_linear_dtypes("x", x, weight, bias)
    if bias is not None:
        require_same_device(x=x, weight=weight, bias=bias)
    else:
        require_same_device(x=x, weight=weight)
