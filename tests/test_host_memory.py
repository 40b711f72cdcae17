"""The training commands' host-memory setting: glibc's malloc keeps freed blocks for the next step."""

import os
import subprocess
import sys
import textwrap

import pytest

from gptfast.training import host_memory


class _FakeLibc:
    def __init__(self, result=1):
        self.calls, self.result = [], result

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return self.result


def test_sets_the_trim_threshold_then_turns_mmap_off(monkeypatch):
    libc = _FakeLibc()
    monkeypatch.delenv("GPTFAST_KEEP_HOST_MEMORY", raising=False)
    monkeypatch.setattr(host_memory, "_glibc", lambda: libc)
    assert "kept for reuse" in host_memory.keep_freed_host_memory()
    assert libc.calls == [(-1, 2**31 - 1), (-4, 0)]


@pytest.mark.parametrize("case,expected", [("opt-out", "GPTFAST_KEEP_HOST_MEMORY=0"), ("not glibc", "not glibc"),
                                           ("refused", "mallopt refused")])
def test_says_why_malloc_is_left_alone(monkeypatch, case, expected):
    libc = _FakeLibc(result=0 if case == "refused" else 1)
    monkeypatch.setenv("GPTFAST_KEEP_HOST_MEMORY", "0" if case == "opt-out" else "1")
    monkeypatch.setattr(host_memory, "_glibc", lambda: None if case == "not glibc" else libc)
    note = host_memory.keep_freed_host_memory()
    assert "left as it is" in note and expected in note
    if case == "opt-out":
        assert libc.calls == []


# A 256 MB tensor, then glibc's count of bytes in mmapped blocks (mallinfo2, glibc 2.33+).
_PROBE = textwrap.dedent("""
    import ctypes, sys, torch
    from gptfast.training.host_memory import keep_freed_host_memory
    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")]
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    if sys.argv[1] == "keep":
        print(keep_freed_host_memory())
    x = torch.ones(64 << 20)
    print("mmapped", libc.mallinfo2().hblkhd)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux") or host_memory._glibc() is None, reason="glibc only")
def test_large_blocks_come_from_the_heap_after_the_call():
    """In a fresh process: without the call a 256 MB tensor is its own mmap; after it, it is heap memory."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env["GPTFAST_KEEP_HOST_MEMORY"] = "1"

    def mmapped(mode):
        out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True,
                             env=env).stdout
        return int(out.split("mmapped")[1])

    assert mmapped("plain") >= 256 << 20
    assert mmapped("keep") < 256 << 20
