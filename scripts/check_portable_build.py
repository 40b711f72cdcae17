#!/usr/bin/env python3
"""CI check of the builds readers' machines get (arm64/clang without OpenMP, x86-64 without AVX2).

Forced on this machine with setup.py's switches, each into a temporary folder:

1. ``GPTFAST_CPU_OPENMP=0 GPTFAST_CPU_AVX2=0``: the CPU extension builds; its report says so; the
   library references no OpenMP runtime and holds no 256-bit (ymm) instruction; loaded in place of
   the installed one, on a CPU reported as lacking AVX2 (``ATEN_CPU_CAPABILITY=default``), backend
   ``cpu`` is available and matches the torch backend on every op (forward and backward).
2. A compiler that fails on the kernels (a wrapper that refuses csrc/ sources), built over the
   portable build: ``build_ext`` still succeeds, the earlier build's extension is removed (not
   shipped in place of the failed one), and the report gives the compiler's error as the reason.
3. A compiler that does not run at all (``CXX=/bin/false``, which torch's own compiler check
   trips on): ``build_ext`` still succeeds, builds nothing, and the report says why.

    python scripts/check_portable_build.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PARITY = r'''
import sys, torch
import gptfast
gptfast.__path__.insert(0, sys.argv[1])      # the portable build shadows the installed extension
from gptfast import ops
import gptfast._C_cpu as ext
assert ext.__file__.startswith(sys.argv[1]), ext.__file__
assert torch.backends.cpu.get_cpu_capability() == "DEFAULT"
status = ops.backend_status()["cpu"]
assert status == "available", status
torch.manual_seed(0)

def close(a, b, what):
    err = float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12))
    assert err < 1e-4, f"{what}: relative error {err}"

def run(backend, q, k, v, logits, targets):
    q, k, v, logits = (t.detach().clone().requires_grad_(True) for t in (q, k, v, logits))
    out = ops.causal_attention(q, k, v, backend=backend)
    out.square().sum().backward()
    loss = ops.cross_entropy(logits, targets, backend=backend)
    loss.backward()
    return [out, q.grad, k.grad, v.grad, loss, logits.grad]

q, k, v = (torch.randn(2, 3, 37, 64) for _ in range(3))
logits, targets = torch.randn(37, 1031), torch.randint(0, 1031, (37,))
for name, a, b in zip(["attention", "dq", "dk", "dv", "loss", "dlogits"], run("cpu", q, k, v, logits, targets),
                      run("torch", q, k, v, logits, targets)):
    close(a, b, name)
tokens = ops.sample_next_token(logits, temperature=0.8, top_k=5, backend="cpu")
assert (logits.topk(5).indices == tokens.reshape(-1, 1)).any(-1).all()
print("portable build: backend cpu available on a CPU without AVX2, parity with torch OK")
'''


def fail(message: str) -> None:
    print(f"check_portable_build: FAIL {message}")
    sys.exit(1)


def build(folder: str, env: dict, with_python: bool = False) -> subprocess.CompletedProcess:
    """``build_ext`` into ``folder`` (``with_python``: ``build_py`` first, which writes the report of a build
    that attempts no extension)."""
    lib = os.path.join(folder, "lib")
    first = ["build_py", "--build-lib", lib] if with_python else []
    return subprocess.run([sys.executable, "setup.py", "-q", *first, "build_ext", "--build-lib", lib,
                           "--build-temp", os.path.join(folder, "tmp")], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "GPTFAST_BUILD_CUDA": "0", "MAX_JOBS": os.environ.get("MAX_JOBS", "2"),
                               **env})


def report_of(folder: str) -> dict:
    with open(os.path.join(folder, "lib", "gptfast", "_build.json")) as f:
        return json.load(f)["cpu"]


def extension_path(folder: str) -> str | None:
    lib = os.path.join(folder, "lib", "gptfast")
    found = [f for f in os.listdir(lib) if f.startswith("_C_cpu.")] if os.path.isdir(lib) else []
    return os.path.join(lib, found[0]) if found else None


def check_portable(folder: str) -> None:
    t0 = time.monotonic()
    proc = build(folder, {"GPTFAST_CPU_OPENMP": "0", "GPTFAST_CPU_AVX2": "0"})
    if proc.returncode != 0:
        fail(f"portable build failed:\n{proc.stderr[-3000:]}")
    so = extension_path(folder)
    if so is None:
        fail(f"portable build produced no extension:\n{proc.stderr[-3000:]}")
    entry = report_of(folder)
    if not (entry.get("built") and entry.get("openmp", "").startswith("off") and "portable" in entry.get("simd", "")):
        fail(f"build report does not describe a portable build without OpenMP: {entry}")
    symbols = subprocess.run(["nm", "-D", "--undefined-only", so], capture_output=True, text=True).stdout
    omp = [s for s in symbols.split() if s.startswith(("GOMP_", "omp_", "__kmpc_"))]
    if omp:
        fail(f"the no-OpenMP build references the OpenMP runtime: {omp[:5]}")
    disasm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", so], capture_output=True, text=True).stdout
    ymm = sum(1 for line in disasm.splitlines() if "%ymm" in line)
    if ymm:
        fail(f"the portable build holds {ymm} instructions on 256-bit ymm registers (needs AVX)")
    print(f"check_portable_build: no-OpenMP, no-AVX2 build OK in {time.monotonic() - t0:.0f}s "
          f"({entry['openmp']}; {entry['simd']}); no OpenMP symbols, no ymm instructions")
    run = subprocess.run([sys.executable, "-c", PARITY, os.path.dirname(so)], capture_output=True, text=True,
                         cwd=folder, env={**os.environ, "ATEN_CPU_CAPABILITY": "default"})
    if run.returncode != 0:
        fail(f"the portable build does not run:\n{run.stdout[-2000:]}{run.stderr[-3000:]}")
    print("check_portable_build: " + run.stdout.strip().splitlines()[-1])


FAILS_ON_KERNELS = '''#!/bin/sh
case "$*" in *csrc*) echo "error: the compiler refuses this kernel (simulated)" >&2; exit 1 ;; esac
exec c++ "$@"
'''


def check_failing_compiler(folder: str) -> None:
    """Over ``folder``'s earlier (successful) build: a compiler that builds plain programs but fails on the kernels."""
    if extension_path(folder) is None:
        fail("no earlier build to replace")
    wrapper = os.path.join(folder, "fails-on-kernels")
    with open(wrapper, "w") as f:
        f.write(FAILS_ON_KERNELS)
    os.chmod(wrapper, 0o755)
    proc = build(folder, {"CXX": wrapper, "GPTFAST_CPU_OPENMP": "0", "GPTFAST_CPU_AVX2": "0"})
    if proc.returncode != 0:
        fail(f"a failing CPU extension build failed the whole build:\n{proc.stderr[-3000:]}")
    if extension_path(folder) is not None:
        fail("a failed build left the earlier build's extension in place")
    entry = report_of(folder)
    reason = entry.get("reason", "")
    if entry.get("built") or "build failed" not in reason or "refuses this kernel" not in reason:
        fail(f"the report does not give the compiler's error: {entry}")
    print(f"check_portable_build: compiler failing on the kernels -> build succeeds, the earlier extension removed; "
          f"reason recorded: {reason[:100]}...")


def check_compiler_that_does_not_run(folder: str) -> None:
    proc = build(folder, {"CXX": "/bin/false"}, with_python=True)
    if proc.returncode != 0:
        fail(f"a compiler that does not run failed the whole build:\n{proc.stderr[-3000:]}")
    if extension_path(folder) is not None:
        fail("a build without a working compiler left an extension")
    entry = report_of(folder)
    if entry.get("built") or "does not build a plain program" not in entry.get("reason", ""):
        fail(f"the report does not say the compiler does not work: {entry}")
    print(f"check_portable_build: CXX=/bin/false -> build succeeds without the extension; reason recorded: "
          f"{entry['reason'][:100]}...")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", help="build here (kept) instead of a temporary folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gptfast_portable_") as tmp:
        base = args.keep or tmp
        check_compiler_that_does_not_run(os.path.join(base, "no-compiler"))
        check_portable(os.path.join(base, "portable"))
        check_failing_compiler(os.path.join(base, "portable"))
    print("check_portable_build: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
