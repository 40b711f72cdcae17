#!/usr/bin/env python3
"""Check the sm_90 machine code of gptfast's CUDA kernels, so that vector loads, registers and spills cannot regress.

For every kernel (every ``Function`` in ``cuobjdump -sass``) it counts 128-bit global loads
(``LDG.E.128``), local-memory traffic (``LDL``/``STL``: spills or register arrays indexed at run time)
and reads registers and stack from ``cuobjdump -res-usage``.  Rules, by kernel family (a regular
expression on the demangled name):

* every kernel: no local memory (``LOCAL:0``, ``STACK:0``, no ``LDL``/``STL``) and at most
  ``max_regs`` registers;
* families that claim 16-byte loads (``min_vec128``): at least that many ``LDG.E.128`` (or cp.async
  ``LDGSTS.128``) in every instantiation;
* every family must match at least one kernel, so a rename is noticed rather than silently unchecked.

Input: the built extension (``--binary gptfast/_C_cuda*.so``) or, by default, every
``csrc/cuda/*.cu`` compiled here to a cubin with nvcc (the .cu files include no torch headers).
Prints one line per kernel family and exits non-zero on any violation.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Same code-generation flags as setup.py's nvcc line (the arch is fixed to Hopper here).
NVCC_FLAGS = ["-arch=sm_90", "-O3", "--use_fast_math", "-lineinfo", "-std=c++17"]


@dataclass(frozen=True)
class Rule:
    """Expectations for one kernel family (``pattern`` is searched in the demangled name)."""

    pattern: str
    max_regs: int
    min_vec128: int = 0


# Register caps are today's counts plus headroom; raise one deliberately, with a reason in the commit.
# The first matching rule applies.  "16-byte loads" counts LDG.E*.128 and cp.async LDGSTS*.128.
RULES = [
    # Row-wise loss/sampling kernels: every row is read through for_each_chunk's 16-byte loads.
    Rule(r"cross_entropy\w*_kernel", max_regs=72, min_vec128=1),
    Rule(r"sample\w*_kernel", max_regs=80, min_vec128=1),
    # Split-K decode: q, K and V rows are read as uint4; the combine pass reads a few floats per split.
    Rule(r"decode_partial\w*_kernel", max_regs=96, min_vec128=1),
    Rule(r"decode_combine\w*_kernel", max_regs=64),
    # Few-row linear: weight and x rows streamed as uint4 (the scalar kernel serves unaligned/odd K).
    Rule(r"decode_linear_vec16\w*_kernel", max_regs=96, min_vec128=1),
    Rule(r"decode_linear_scalar\w*_kernel", max_regs=80),
    # Tiled attention: tiles stream into shared memory through 16-byte cp.async; the big
    # register budget is the tensor-core accumulators, so only spills are a hard limit.
    Rule(r"attention_bwd_delta\w*_kernel", max_regs=64),
    Rule(r"attention_fwd\w*_kernel", max_regs=255, min_vec128=1),
    Rule(r"attention_bwd\w*_kernel", max_regs=255, min_vec128=1),
]
DEFAULT_MAX_REGS = 255


@dataclass
class Kernel:
    mangled: str
    name: str
    regs: int = -1
    stack: int = -1
    local: int = -1
    ldg128: int = 0
    ldgsts128: int = 0
    local_ops: int = 0


def find_tool(name: str) -> str | None:
    """A CUDA binary utility: $NAME (upper case), PATH, $CUDA_HOME/bin, or the copy shipped in triton's package."""
    env = os.environ.get(name.upper())
    if env:
        return env
    found = shutil.which(name)
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.isfile(os.path.join(home, "bin", name)):
        return os.path.join(home, "bin", name)
    try:
        import triton  # noqa: PLC0415  (optional: only for its bundled binutils)

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.isfile(path):
            return path
    except ImportError:
        pass
    return None


def compile_cubins(nvcc: str, sources: list[str], out_dir: str, jobs: int) -> list[str]:
    """Compiles each .cu to an sm_90 cubin, ``jobs`` at a time; raises on the first failure."""

    def one(src: str) -> str:
        cubin = os.path.join(out_dir, os.path.basename(src) + ".cubin")
        proc = subprocess.run([nvcc, *NVCC_FLAGS, "-I", os.path.join(ROOT, "csrc", "cuda"), "-cubin", "-o", cubin, src],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed on {src}:\n{proc.stderr[-4000:]}")
        return cubin

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(one, sources))


def demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def parse_binary(cuobjdump: str, path: str) -> dict[str, Kernel]:
    """Kernels of one cubin or shared library, with their SASS counts and resource usage."""
    sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, check=True).stdout
    res = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    kernels: dict[str, Kernel] = {}
    for block in re.split(r"\n\s*Function : ", sass)[1:]:
        mangled = block.split("\n", 1)[0].strip()
        code = [line for line in block.splitlines() if "/*" in line]
        kernels[mangled] = Kernel(
            mangled=mangled, name=mangled,
            ldg128=sum(1 for line in code if re.search(r"\bLDG\.E(\.\w+)*\.128\b", line)),
            ldgsts128=sum(1 for line in code if re.search(r"\bLDGSTS(\.\w+)*\.128\b", line)),
            local_ops=sum(1 for line in code if re.search(r"\b(LDL|STL)(\.\w+)*\b", line)),
        )
    for mangled, usage in re.findall(r"Function (\S+?):\s*\n\s*(REG:.*)", res):
        kernel = kernels.setdefault(mangled, Kernel(mangled=mangled, name=mangled))
        fields = dict(re.findall(r"(\w+):(\d+)", usage))
        kernel.regs = int(fields.get("REG", -1))
        kernel.stack = int(fields.get("STACK", -1))
        kernel.local = int(fields.get("LOCAL", -1))
    names = demangle(list(kernels))
    for mangled, kernel in kernels.items():
        kernel.name = names.get(mangled, mangled)
    return kernels


def check(kernels: list[Kernel]) -> list[str]:
    """Violations of RULES (empty when everything holds); prints one summary line per family."""
    problems = []
    matched: dict[str, list[Kernel]] = {rule.pattern: [] for rule in RULES}
    for kernel in kernels:
        rule = next((r for r in RULES if re.search(r.pattern, kernel.name)), None)
        if rule is not None:
            matched[rule.pattern].append(kernel)
        max_regs = rule.max_regs if rule else DEFAULT_MAX_REGS
        short = kernel.name.replace("(anonymous namespace)::", "").split("(")[0]
        if kernel.local_ops or kernel.local > 0 or kernel.stack > 0:
            problems.append(f"{short}: local memory used (LDL/STL {kernel.local_ops}, LOCAL {kernel.local}, "
                            f"STACK {kernel.stack}): spills or a run-time-indexed register array")
        if kernel.regs > max_regs:
            problems.append(f"{short}: {kernel.regs} registers > cap {max_regs}")
        if rule and kernel.ldg128 + kernel.ldgsts128 < rule.min_vec128:
            problems.append(f"{short}: {kernel.ldg128} LDG.E.128 + {kernel.ldgsts128} LDGSTS.128, expected >= "
                            f"{rule.min_vec128} (16-byte loads split into narrower ones)")
    for rule in RULES:
        group = matched[rule.pattern]
        if not group:
            problems.append(f"no kernel matches /{rule.pattern}/ (renamed? update scripts/check_sass.py RULES)")
            continue
        print(f"{rule.pattern:34s} {len(group):3d} kernels  LDG.E.128 {min(k.ldg128 for k in group)}-"
              f"{max(k.ldg128 for k in group)}  LDGSTS.128 {min(k.ldgsts128 for k in group)}-"
              f"{max(k.ldgsts128 for k in group)}  regs {min(k.regs for k in group)}-{max(k.regs for k in group)} "
              f"(cap {rule.max_regs})  local-memory ops {sum(k.local_ops for k in group)}")
    others = [k for k in kernels if not any(re.search(r.pattern, k.name) for r in RULES)]
    if others:
        print(f"{'(other kernels)':34s} {len(others):3d} kernels  regs <= {max(k.regs for k in others)} "
              f"(cap {DEFAULT_MAX_REGS})")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--binary", action="append", default=[],
                        help="cubin or built extension (.so) to inspect; default: compile csrc/cuda/*.cu")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", "2")))
    parser.add_argument("--verbose", action="store_true", help="one line per kernel")
    args = parser.parse_args(argv)

    cuobjdump = find_tool("cuobjdump")
    if cuobjdump is None:
        print("check_sass: cuobjdump not found (set CUOBJDUMP, or install triton, which ships one)")
        return 1
    with tempfile.TemporaryDirectory(prefix="gptfast_sass_") as tmp:
        binaries = list(args.binary)
        missing = [b for b in binaries if not os.path.isfile(b)]
        if missing:
            print(f"check_sass: no such binary: {', '.join(repr(b) for b in missing)}")
            return 1
        if not binaries:
            nvcc = find_tool("nvcc")
            if nvcc is None:
                print("check_sass: nvcc not found (set NVCC)")
                return 1
            sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
            try:
                binaries = compile_cubins(nvcc, sources, tmp, args.jobs)
            except RuntimeError as exc:
                print(f"check_sass: {exc}")
                return 1
        kernels: dict[str, Kernel] = {}
        for path in binaries:
            kernels.update(parse_binary(cuobjdump, path))
    if not kernels:
        print("check_sass: no sm_90 kernels found in " + ", ".join(binaries))
        return 1
    if args.verbose:
        for k in sorted(kernels.values(), key=lambda k: k.name):
            print(f"  regs {k.regs:3d}  LDG.E.128 {k.ldg128:3d}  LDGSTS.128 {k.ldgsts128:3d}  local {k.local_ops}  {k.name[:140]}")
    problems = check(list(kernels.values()))
    for problem in problems:
        print("check_sass: FAIL " + problem)
    print(f"check_sass: {len(kernels)} kernels, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
