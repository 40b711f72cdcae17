"""The ``--device`` flag of every command: parsed and probed once, before any file is read or made."""

from __future__ import annotations


def usable_device(name: str, flag: str = "--device"):
    """``torch.device(name)`` when a tensor can be made there now; else a ``ValueError`` naming ``flag``.

    Training and generation need a device that holds data, so ``meta`` is refused. CUDA is checked by its
    device count (an allocation would make a context on that GPU in every process torchrun starts); other
    devices (an absent MPS, say) by one small allocation, before the model is built.
    """
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ValueError(f"{flag} {name!r} is not a device: {' '.join(str(exc).split())}") from None
    if device.type == "meta":
        raise ValueError(f"{flag} meta holds no data; give a device that computes, such as cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{flag} {name}: CUDA is not available here (this torch: {torch.__version__})")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{flag} {name}: only {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "cuda":
        return device
    try:
        torch.empty(1, device=device)
    except (RuntimeError, NotImplementedError) as exc:
        raise ValueError(f"{flag} {name} cannot hold a tensor here: {' '.join(str(exc).split())}") from None
    return device
