"""gptfast: the GPT of *Build a Large Language Model (From Scratch)*, with fused kernels underneath.

Swap ``from llms_from_scratch.ch05 import ...`` for ``from gptfast.ch05 import ...``.
The hot spots (causal attention, cross-entropy, next-token sampling) go through
``gptfast.ops``, which picks a backend (torch, cpu, triton, cuda).
"""

from . import ops
from .generation import GenerationResult, generate_batch, generate_stream, stream_text
from .models import GPT_CONFIG_124M, GPTModel, gpt2_config
from .tokenizer import get_tokenizer

__version__ = "0.1.0"

# No function ``generate`` here: ``gptfast.generate`` is the drop-in for the reference's top-level
# ``generate`` module.  The book's ``generate`` function is ``gptfast.ch05.generate``.
__all__ = ["ops", "GPTModel", "GPT_CONFIG_124M", "gpt2_config", "generate_stream", "generate_batch",
           "stream_text", "GenerationResult", "get_tokenizer", "__version__"]
