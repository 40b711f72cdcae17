"""Build and run the CPU emulation of csrc/cuda/cross_entropy.cu and sampling.cu.

Each .cu is copied with its launches ``k<<<g, b, s, st>>>(args)`` rewritten to
``emu::launch(g, b, s, st)(k, args)``, compiled as C++20 with emu.h force-included
(ASan + UBSan), linked with driver.cpp and run.  Exit status 0 means every check passed.
Usage: python tests/cuda_emulation/run_emulation.py [--no-sanitize] [--quick]
(--quick: the subset run by tests/test_ops_cuda.py; the full set takes minutes.)
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
SOURCES = ("cross_entropy.cu", "sampling.cu")
LAUNCH = re.compile(r"^(\s*)([\w:]+<[^<>;]*>)<<<(.*?)>>>\(", re.M | re.S)
CUDA_INCLUDE = "/usr/local/cuda/include"


def rewrite_launches(text: str) -> str:
    out, count = LAUNCH.subn(r"\1emu::launch(\3)(\2, ", text)
    if count == 0:
        raise SystemExit("no kernel launch found to rewrite")
    return out


def main(argv) -> int:
    sanitize = [] if "--no-sanitize" in argv else ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
    flags = ["g++", "-std=c++20", "-O1", "-g", "-pthread", "-w", *sanitize,
             "-I", str(REPO / "csrc" / "cuda"), "-I", CUDA_INCLUDE]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        objects = []
        for name in SOURCES:
            src = tmp / f"{name}.cpp"
            src.write_text(rewrite_launches((REPO / "csrc" / "cuda" / name).read_text()))
            obj = tmp / f"{name}.o"
            subprocess.run([*flags, "-include", str(HERE / "emu.h"), "-c", str(src), "-o", str(obj)], check=True)
            objects.append(str(obj))
        exe = tmp / "emulation"
        subprocess.run([*flags, str(HERE / "driver.cpp"), *objects, "-o", str(exe)], check=True)
        return subprocess.run([str(exe)] + (["quick"] if "--quick" in argv else [])).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
