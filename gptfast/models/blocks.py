"""Parts shared by the GPT, Llama 3 and Qwen3 models: the pre-norm block's holder and the output head's call."""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

from .. import ops
from ..ops.linear import dense_linear


class PreNormBlock(nn.Module):
    """Holds ``att``, ``ff``, ``norm1`` and ``norm2``; subclasses define ``forward``.

    The caller builds ``att`` and ``ff`` (in that order, as arguments are evaluated) and this
    builds the two norms after them: the reference creates its parameters in exactly this
    order, so the same seed gives the same initial weights and the same state_dict order.
    """

    def __init__(self, att: nn.Module, ff: nn.Module, make_norm: Callable[[], nn.Module]):
        super().__init__()
        self.att = att
        self.ff = ff
        self.norm1 = make_norm()
        self.norm2 = make_norm()


# Module-level registries of hooks that torch runs on every module call.
_GLOBAL_CALL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_forward_hooks_always_called",
                      "_global_backward_hooks", "_global_backward_pre_hooks")


def has_call_hooks(module: nn.Module) -> bool:
    """True when calling ``module`` would run a hook: a forward or forward-pre hook, or a backward hook (torch
    attaches those to the call's outputs), the module's own or a global one."""
    return has_own_call_hooks(module) or has_global_call_hooks()


def has_own_call_hooks(module: nn.Module) -> bool:
    """True when ``module`` itself holds a forward, forward-pre or backward hook."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def has_global_call_hooks() -> bool:
    """True when a hook is registered for every module call (``register_module_forward_hook`` and the like)."""
    registry = nn.modules.module
    return any(getattr(registry, name, None) for name in _GLOBAL_CALL_HOOKS)


# Packages whose modules' forward gptfast reproduces when it computes a model's parts itself.
_LIBRARY_PACKAGES = ("gptfast", "llms_from_scratch")


def from_library(cls) -> bool:
    """True for a class defined in gptfast or in the reference package."""
    return cls.__module__.split(".")[0] in _LIBRARY_PACKAGES


def overrides_library_forward(cls) -> bool:
    """True when ``cls`` subclasses a gptfast or reference module and replaces its forward with one of its own,
    or is such a module whose ``forward`` was replaced on the class (``Class.forward = ...``).

    A class outside both packages that is not such a subclass (the book's code copied into a notebook,
    with the same layout) is not one: generation checks such classes against their logits instead
    (:func:`gptfast.generation.cache.walk_needs_probe`).
    """
    owner = next((c for c in cls.__mro__ if "forward" in c.__dict__), None)
    if owner is None:
        return False
    if from_library(owner):
        return not _defined_in(owner.__dict__["forward"], owner)  # a forward patched onto the class
    return any(from_library(c) and "forward" in c.__dict__ for c in cls.__mro__)


def _defined_in(function, cls) -> bool:
    """True when ``function`` was written in ``cls``'s body (not assigned to the class afterwards; a wrapper
    made with ``functools.wraps`` copies the names but also records what it wraps)."""
    return (getattr(function, "__module__", None) == cls.__module__
            and getattr(function, "__qualname__", None) == f"{cls.__qualname__}.forward"
            and not hasattr(function, "__wrapped__"))


def runs_own_forward(module: nn.Module) -> bool:
    """True when calling ``module`` runs the forward its layout stands for: no hook, no instance-level
    ``forward``, and no subclass forward over a gptfast or reference module's.  Only then may code that
    computes the module's parts itself stand in for calling it."""
    return ("forward" not in module.__dict__ and not has_call_hooks(module)
            and not overrides_library_forward(type(module)))


def is_plain_linear(module: nn.Module) -> bool:
    """True when calling ``module`` computes exactly ``F.linear(x, weight, bias)``: an ``nn.Linear`` whose class
    keeps ``nn.Linear``'s forward, with no hook and no ``forward`` set on the instance (a wrapper's patch).
    Only such a layer may be computed from its weight without calling it."""
    return (isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
            and "forward" not in module.__dict__ and not has_call_hooks(module))


def apply_linear(layer: nn.Module, x):
    """``layer(x)`` for a model's own linear layers and output head.

    A plain ``nn.Linear`` (:func:`is_plain_linear`) computes through
    :func:`gptfast.ops.linear.dense_linear` (on an x86 CPU a large float32 layer's forward
    product runs through oneDNN); with backend ``"torch"``, and for any other module (a
    hooked layer, a LoRA wrapper), the module is called as the reference calls it, so its
    numbers stay bitwise the reference's.
    """
    if is_plain_linear(layer) and ops.get_backend() != "torch":
        return dense_linear(x, layer.weight, layer.bias)
    return layer(x)
