"""Writing files a user would miss: never a truncated file, never the old one lost.

Every checkpoint, exported weight file, metrics file, plot and token cache the project writes goes
through :func:`atomic_write` (or one of its wrappers): the bytes go to a temporary file in the
destination's own folder, are flushed and fsync'ed, and only then renamed over the destination.
A rename within one file system is atomic, so a process killed at any moment leaves either the
complete old file or the complete new one, plus at most a stray ``.<name>.*.tmp`` beside it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import tempfile
from pathlib import Path
from typing import IO, Iterator

__all__ = ["atomic_write", "atomic_torch_save", "atomic_write_text", "atomic_savefig", "check_writable_dir",
           "check_dir_path", "removing_new_empty_dirs", "save_response", "path_inside"]


# The errors of a write that ran out of room: a full disk or quota, a file over the size limit, a failing device.
_WRITE_FAILURES = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO}


def _write_error(exc: OSError, target: Path) -> OSError:
    """``exc``, a failed write to ``target``'s temporary file, as an OSError naming ``target`` (the temporary
    file's name would mean nothing to the user)."""
    error = OSError(f"could not write {target}: {exc.strerror or exc}")
    error.errno = exc.errno
    return error


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _new_temporary_file(target: Path) -> tuple[int, Path]:
    """A new ``.<name>.<random>.tmp`` beside ``target``, opened for writing: its fd and path.

    Created with mode 0666 less the umask, as ``open`` creates a file; ``tempfile.mkstemp`` makes it 0600, and
    reading the umask means setting it, which would change it for the whole process for a moment.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary file name", str(target.parent))


def _keep_mode_of(target: Path, tmp: Path) -> None:
    """Give ``tmp`` the permissions of the ``target`` it replaces, so that a replaced file keeps them (a new
    one keeps the umask's)."""
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        return
    os.chmod(tmp, mode & 0o7777)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on success rename it over ``path``.

    If the block raises, the temporary file is removed and ``path`` is untouched.  ``mode``
    must be a write mode (``"w"``, ``"wb"``); ``open_kwargs`` go to :func:`open` (``encoding``, ``newline``).
    A write that fails for want of room (no space left, file too large) raises an ``OSError`` naming ``path``.
    """
    if mode not in ("w", "wb", "wt"):
        raise ValueError(f"mode must be 'w', 'wt' or 'wb', got {mode!r}")
    target = Path(path)
    folder = target.parent
    fd, tmp = _new_temporary_file(target)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        _keep_mode_of(target, tmp)
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.errno in _WRITE_FAILURES:
            raise _write_error(exc, target) from None
        raise
    _fsync_dir(folder)


class _WriteErrorRecorder:
    """A file whose ``write`` and ``flush`` remember the OSError they raise: ``torch.save`` reports a failed
    write (a full disk, a file over the size limit) as a RuntimeError about its zip stream instead."""

    def __init__(self, handle: IO):
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data):
        try:
            return self.handle.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self):
        try:
            return self.handle.flush()
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name):
        return getattr(self.handle, name)


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` through :func:`atomic_write`; a failed write raises its OSError, naming ``path``."""
    import torch

    with atomic_write(path, "wb") as handle:
        recorder = _WriteErrorRecorder(handle)
        try:
            torch.save(obj, recorder)
        except RuntimeError:
            if recorder.error is None:
                raise
            raise recorder.error from None


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_write`."""
    with atomic_write(path, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)


def atomic_savefig(figure, path: str | os.PathLike, **savefig_kwargs) -> None:
    """``figure.savefig(path)`` through :func:`atomic_write`; the format comes from ``path``'s suffix."""
    fmt = savefig_kwargs.pop("format", None) or Path(path).suffix.lstrip(".") or "png"
    with atomic_write(path, "wb") as handle:
        figure.savefig(handle, format=fmt, **savefig_kwargs)


def check_dir_path(path: str | os.PathLike, *, name: str = "out_dir") -> Path:
    """``ValueError`` naming ``name`` when ``path`` is a file or lies below one; creates nothing, so a run can
    check its folders with its other input before it makes any of them.  Returns ``path`` as a Path."""
    if os.fspath(path) == "":
        # Path("") is the current folder: an unset shell variable would silently write there.
        raise ValueError(f"{name} is empty: name a folder ('.' for the current one)")
    folder = Path(path)
    for parent in (folder, *folder.parents):
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"{name} {str(folder)!r} is not usable: {str(parent)!r} is a file, not a folder")
    return folder


def check_writable_dir(path: str | os.PathLike, *, name: str = "out_dir") -> Path:
    """Create ``path`` if needed and prove files can be written there, before any long work starts.

    Raises ``ValueError`` naming ``name`` when ``path`` is a file, lies below a file, or is not
    writable, so a run never trains for hours and then loses its result.
    """
    folder = check_dir_path(path, name=name)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"{name} {str(folder)!r} is not writable: {exc.strerror or exc}") from None
    return folder


@contextlib.contextmanager
def removing_new_empty_dirs(*paths: str | os.PathLike) -> Iterator[None]:
    """When the block raises, remove each folder of ``paths`` (and each parent) that did not exist before the
    block and is empty after it: a run that fails (bad input found late, Ctrl-C) leaves behind no empty folder it
    made.  A folder holding anything stays."""
    made = set()
    for path in paths:
        for folder in (Path(path), *Path(path).parents):
            if os.path.lexists(folder):
                break
            made.add(folder)
    try:
        yield
    except BaseException:
        for folder in sorted(made, key=lambda f: len(f.parts), reverse=True):  # the deepest first
            with contextlib.suppress(OSError):  # not empty, or already gone
                folder.rmdir()
        raise


def check_output_files(folder: Path, names, *, name: str = "out_dir") -> None:
    """``ValueError`` naming ``name`` when one of the files ``names`` a run will write into ``folder`` is a folder:
    found before the work, not when the file is written."""
    for file_name in names:
        if (Path(folder) / file_name).is_dir():
            raise ValueError(f"{name} {str(folder)!r}: {file_name} is a folder; the run writes a file there")


def save_response(response, destination: str | os.PathLike, progress=None) -> int:
    """Write an HTTP ``response``'s body to ``destination`` through :func:`atomic_write`; return its size.

    ``progress(n)`` is called after each chunk of ``n`` bytes.  A server that closes before the
    ``Content-Length`` it announced gets a ``ConnectionError`` and leaves no file: a short body reads
    as a normal end of data, and kept, it would later pass for the complete file.
    """
    size = int(response.headers.get("Content-Length", 0) or 0)
    received = 0
    with atomic_write(destination, "wb") as out:
        while chunk := response.read(1 << 16):
            out.write(chunk)
            received += len(chunk)
            if progress is not None:
                progress(len(chunk))
        if size and received != size:
            raise ConnectionError(f"the connection closed after {received} of {size} bytes")
    return received


def path_inside(folder: str | os.PathLike, name: str) -> Path:
    """``folder / name``, or ``ValueError`` when ``name`` (a file name from a server or an index file) would
    lead outside ``folder``: an absolute path, or ``..`` parts that climb out.  Checked on the name itself,
    not by following links (a Hugging Face cache's shards are links into a sibling ``blobs`` folder)."""
    normal = os.path.normpath(name)
    if os.path.isabs(name) or normal == os.pardir or normal.startswith(os.pardir + os.sep):
        raise ValueError(f"file name {name!r} leads outside {str(folder)!r}")
    return Path(folder) / name
