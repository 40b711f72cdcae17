"""Drop-in for ``llms_from_scratch.appendix_e``."""

from .finetuning.lora import LinearWithLoRA, LoRALayer, replace_linear_with_lora

__all__ = ["LoRALayer", "LinearWithLoRA", "replace_linear_with_lora"]
