"""Files shipped inside the package (the-verdict, the GPT-2 ranks file)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DEFAULT_TEXT = "the-verdict.txt"
# In a source checkout the installed package ``gptfast.embedded`` is this folder.
_CHECKOUT_DATA = Path(__file__).resolve().parent.parent / "data"


def _embedded_folder() -> Path:
    """Folder of ``gptfast.embedded``; the checkout's ``data/`` when the package runs uninstalled."""
    try:
        return Path(str(resources.files("gptfast.embedded")))
    except ModuleNotFoundError:
        # Only an install maps data/ to gptfast.embedded; from a checkout on sys.path it does not exist.
        return _CHECKOUT_DATA


def resource_path(name: str) -> Path:
    """Path of a file shipped in ``gptfast.embedded`` (the repo's top-level ``data/``)."""
    path = _embedded_folder() / name
    if not path.is_file():
        raise FileNotFoundError(f"gptfast data file {name!r} is missing from the installation ({path})")
    return path


def default_text() -> str:
    """The embedded default training text, Edith Wharton's "The Verdict" (public domain)."""
    return resource_path(DEFAULT_TEXT).read_text(encoding="utf-8")
