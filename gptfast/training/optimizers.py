"""The optimizer the book's loops step: its AdamW, and torch's fused implementation of the same update.

The book builds ``torch.optim.AdamW(model.parameters(), ...)`` and leaves ``foreach``/``fused`` unset.  On a
CPU that means torch's single-tensor implementation: one pass over memory per elementwise op, per parameter
(on GPT-2 124M, about 0.6 s of a 2-core CPU's fine-tuning step).  Torch's fused implementation does the same
update in one pass over each parameter, its gradient and its two moments, with the same state layout.  It
groups the sums differently, so the weights agree with the book's to rounding, not bitwise; with backend
``"torch"`` nothing here changes the optimizer, so such a run stays bitwise the book's.
"""

from __future__ import annotations

import contextlib

import torch

from .. import ops

# Exact types: a subclass may override ``step`` and need the implementation its author chose.
_ADAM_TYPES = (torch.optim.Adam, torch.optim.AdamW)


def chapter_adamw(params, lr, weight_decay):
    """The chapter's optimizer, ``torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)``.

    On a fused ops backend it is torch's fused AdamW (see the module docstring); with backend ``"torch"`` it
    is the book's own optimizer.
    """
    params = list(params)
    fused = ops.get_backend() != "torch" and bool(params) and all(_fusable_parameter(p) for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **({"fused": True} if fused else {}))


def _fusable_parameter(p) -> bool:
    """A dense float32/float64 parameter on a device this torch has fused Adam kernels for.

    16-bit parameters keep the book's implementation: it computes in their dtype (float16 even rounds eps=1e-8
    to 0, so a parameter without gradient turns NaN), the fused one in float32, a difference beyond rounding.
    """
    on_fused_device = p.device.type == "cuda" or (p.device.type == "cpu" and _torch_fuses_adam_on_cpu())
    return on_fused_device and p.dtype in (torch.float32, torch.float64) and not p.is_sparse


def _torch_fuses_adam_on_cpu() -> bool:
    """Whether this torch has fused Adam kernels for CPU tensors."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # a torch without the registry: do not guess
        return False
    return "cpu" in _get_fused_kernels_supported_devices()


def _fusable_group(group) -> bool:
    """A CPU param group whose owner chose no implementation and needs nothing the fused one lacks.

    CPU only: there the single-tensor path is the default and the state's ``step`` lives on the
    parameter's device either way; CUDA already defaults to the multi-tensor path.
    """
    return (group.get("fused") is None and group.get("foreach") is None
            and not group.get("differentiable", False) and not group.get("capturable", False)
            and all(p.device.type == "cpu" and _fusable_parameter(p) for p in group["params"]))


@contextlib.contextmanager
def fused_optimizer_steps(optimizer):
    """Within the block, ``optimizer.step()`` of a plain ``torch.optim.Adam``/``AdamW`` runs torch's fused
    implementation on the param groups that can take it; the groups are restored on exit, even on error.

    The book's training loops step inside this block, so a user's ``torch.optim.AdamW(model.parameters())``
    trains faster without being rebuilt.  It changes nothing for backend ``"torch"``, for other optimizers
    and for groups whose owner chose ``foreach`` or ``fused``, or that hold non-CPU parameters.
    """
    groups = []
    if ops.get_backend() != "torch" and type(optimizer) in _ADAM_TYPES:
        groups = [group for group in optimizer.param_groups if _fusable_group(group)]
    for group in groups:
        group["fused"] = True
    try:
        yield optimizer
    finally:
        for group in groups:
            group["fused"] = None
