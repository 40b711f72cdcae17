"""How the command-line tools report expected failures: one line on stderr, a non-zero exit, no traceback.

Bad flags, missing or corrupt files, an unavailable backend or a diverging loss are
expected failures: the user gets ``<prog>: error: <what is wrong>`` and exit status 2.
``--debug`` or ``GPTFAST_DEBUG=1`` lets the exception through with its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from typing import Callable, Iterator

# FileNotFoundError, PermissionError, disk-full errors ... are OSErrors; torch reports most
# device and shape problems as RuntimeError.
EXPECTED_ERRORS = (ValueError, TypeError, OSError, RuntimeError)
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def debug_requested(flag: bool = False) -> bool:
    """``--debug`` given, or ``$GPTFAST_DEBUG`` set to anything but empty/0."""
    return bool(flag) or os.environ.get("GPTFAST_DEBUG", "").strip() not in ("", "0")


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (whitespace runs collapsed), or its type name."""
    text = " ".join(str(exc).split())
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}"
    return text or type(exc).__name__


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold a Ctrl-C back until the body is done, then raise it as ``KeyboardInterrupt``.

    For the heavy imports (torch, numpy, matplotlib): a ``KeyboardInterrupt`` raised inside their C-level module
    set-up may be swallowed there (the run goes on as if no Ctrl-C came) or leave a module half made (a later,
    unrelated error).  Only in the main thread, and only while Python's default handler is installed.
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    received = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


def report_interrupt(prog: str) -> int:
    """Say on stderr that ``prog`` was interrupted (Ctrl-C); return the exit status for it."""
    print(f"{prog}: interrupted", file=sys.stderr)
    return EXIT_INTERRUPTED


def raised_by_interrupt(exc: BaseException) -> bool:
    """Whether a Ctrl-C is in ``exc``'s chain of causes: a library (torch's import among them) may turn the
    ``KeyboardInterrupt`` it was handling into an error of its own."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def run_cli(prog: str, main: Callable[[], int], *, debug: bool = False) -> int:
    """Run ``main``; turn an expected failure into one stderr line and exit status 2 (a Ctrl-C, even one another
    error wraps, into one line and status 130)."""
    try:
        return main()
    except EXPECTED_ERRORS as exc:
        if debug_requested(debug):
            raise
        if raised_by_interrupt(exc):
            return report_interrupt(prog)
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        if debug_requested(debug):
            raise
        return report_interrupt(prog)


def non_empty_path(value: str) -> str:
    """argparse ``type`` of a file or folder flag: an empty value (an unset shell variable) would mean the current
    folder, or no file at all, so it is refused rather than reinterpreted."""
    if value == "":
        raise argparse.ArgumentTypeError("is empty: name a file or folder ('.' for the current folder)")
    return value


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr, as the commands' other errors, with
    argparse's exit status 2: the usage block would bury the line that says what is wrong.
    ``--help`` still prints the full help."""

    def error(self, message):
        self.exit(EXIT_ERROR, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")
