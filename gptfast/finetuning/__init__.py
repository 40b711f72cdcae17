"""Fine-tuning the book's GPT: classification (chapter 6), instructions (chapter 7) and LoRA (appendix E).

The chapter modules ``gptfast.ch06``, ``gptfast.ch07`` and ``gptfast.appendix_e``
re-export these under the reference's names.
"""

from .instruction import generate_responses
from .lora import LinearWithLoRA, LoRALayer, replace_linear_with_lora

__all__ = ["generate_responses", "LoRALayer", "LinearWithLoRA", "replace_linear_with_lora"]
