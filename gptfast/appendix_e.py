"""Drop-in for ``llms_from_scratch.appendix_e``."""

from .finetuning.lora import LinearWithLoRA, LoRALayer, replace_linear_with_lora
from ._star import with_reference_imports

__all__ = ["LoRALayer", "LinearWithLoRA", "replace_linear_with_lora"]


# The names a star import of the reference's module also gives (see gptfast/_star.py).
__all__, __getattr__, __dir__ = with_reference_imports(__name__, __all__, {
    "math": "math",
    "torch": "torch",
})
