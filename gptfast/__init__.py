"""gptfast: the GPT of *Build a Large Language Model (From Scratch)*, with fused kernels underneath.

Swap ``from llms_from_scratch.ch05 import ...`` for ``from gptfast.ch05 import ...``.
The hot spots (causal attention, cross-entropy, next-token sampling) go through
``gptfast.ops``, which picks a backend (torch, cpu, triton, cuda).
"""

import importlib

__version__ = "0.1.0"

# No function ``generate`` here: ``gptfast.generate`` is the drop-in for the reference's top-level
# ``generate`` module.  The book's ``generate`` function is ``gptfast.ch05.generate``.
__all__ = ["ops", "GPTModel", "GPT_CONFIG_124M", "gpt2_config", "generate_stream", "generate_batch",
           "stream_text", "GenerationResult", "get_tokenizer", "__version__"]

# The names above, by the module that defines them.  They are imported on first use, not with the
# package: `import gptfast` (which the `gptfast` command runs first) then costs no torch import, so
# a Ctrl-C during the command's start is caught by the command like one at any later moment.
_LAZY = {"ops": ".ops",
         **dict.fromkeys(("GenerationResult", "generate_batch", "generate_stream", "stream_text"), ".generation"),
         **dict.fromkeys(("GPT_CONFIG_124M", "GPTModel", "gpt2_config"), ".models"),
         "get_tokenizer": ".tokenizer"}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name], __name__)
    value = module if name == "ops" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
