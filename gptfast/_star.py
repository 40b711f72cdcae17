"""What ``from llms_from_scratch.<module> import *`` hands on beyond the module's own names.

The reference's modules have no ``__all__``, so a star import of one also brings the
modules and classes it imports at its top (``torch``, ``nn``, ``plt``, ``Dataset`` ...);
notebook code written against it may use them.  gptfast's drop-in modules list those
names in their ``__all__`` too and import each one only when it is asked for (a star
import, or attribute access), so a plain ``import gptfast.ch05`` pays for none of them.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys


# What the reference's llama3 module imports (its KV-cache variant the same).
LLAMA3_IMPORTS = {"Path": "pathlib:Path", "load_tiktoken_bpe": "tiktoken.load:load_tiktoken_bpe", "nn": "torch.nn",
                  "os": "os", "tiktoken": "tiktoken", "torch": "torch"}


def with_reference_imports(module_name: str, own: list[str], imports: dict[str, str]):
    """``(__all__, __getattr__, __dir__)`` for drop-in module ``module_name``: its ``own`` names and the
    reference's ``imports`` (attribute name -> ``"module"`` or ``"module:attribute"``).

    An import whose package is not installed is left out (of ``__all__``, so the star import still works, and
    of the attributes: ``hasattr`` says False).  A dotted module bound under its top package's name (``urllib``
    for ``import urllib.request``) is that package, with the submodule loaded, as the reference's ``import``
    statement binds it.
    """
    available = [name for name, target in imports.items()
                 if importlib.util.find_spec(target.split(":")[0].split(".")[0]) is not None]

    def __getattr__(name):
        target = imports.get(name) if name in available else None
        if target is None:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        module_path, _, attribute = target.partition(":")
        try:
            module = importlib.import_module(module_path)
        except ImportError as exc:  # installed but not importable: still only a missing attribute
            raise AttributeError(f"module {module_name!r} has no attribute {name!r} ({exc})") from exc
        if attribute:
            value = getattr(module, attribute)
        elif module_path.split(".")[0] == name:
            value = sys.modules[name]
        else:
            value = module
        vars(sys.modules[module_name])[name] = value  # later lookups find it without this hook
        return value

    def __dir__():
        return sorted({*vars(sys.modules[module_name]), *available})

    return [*own, *available], __getattr__, __dir__
