"""Build and run the CPU emulator of gptfast's CUDA kernels (see emu.h).

Every ``csrc/cuda/*.cu`` is rewritten into host C++ (``rewrite_source``), compiled with
``emu.h`` force-included, and linked with each check program of this folder
(``attention_check.cpp``: attention forward/backward and decode; ``loss_sampling_check.cpp``:
cross-entropy and sampling; ``layer_ops_check.cpp``: RMSNorm, LayerNorm, SwiGLU, GELU, RoPE and decode_linear).  The check programs call the kernels' own host launchers and
compare with float64 references; each prints ``N failures`` and exits non-zero on a mismatch.

Usage: python tests/cuda_emulator/build.py [--full] [--sanitize] [--keep DIR] [--kernels DIR]
  (default: the quick subset that tests/test_cuda_emulator.py runs; --full: every case;
  --sanitize: ASan + UBSan, slower; --kernels: another copy of csrc/cuda.)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import fcntl
import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
KERNEL_DIR = REPO / "csrc" / "cuda"
EMULATOR_HEADER = HERE / "emu.h"
# check program -> the selections it accepts (its first argument); the second is quick|full
CHECKS = {
    "attention_check": ("fwd_bwd", "decode"),
    "loss_sampling_check": ("cross_entropy", "sampling"),
    "layer_ops_check": ("norms", "swiglu_rope", "decode_linear"),
}
SELF_CHECK = HERE / "self_check.cu"  # faulty kernels the emulator must catch
# A GPU faults on a misaligned load; UBSan's alignment check is the emulator's counterpart,
# cheap enough to be always on.  --sanitize adds the rest of UBSan and ASan.
BASE_SANITIZE_FLAGS = ("-fsanitize=alignment", "-fno-sanitize-recover=alignment")
SANITIZE_FLAGS = ("-fsanitize=address,undefined", "-fno-sanitize-recover=undefined")
PTX_REGION = re.compile(r"[ \t]*//[^\n]*BEGIN PTX PRIMITIVES.*?//[^\n]*END PTX PRIMITIVES[^\n]*\n", re.S)


class RewriteError(Exception):
    """A kernel source uses a construct the emulator cannot take over (the message says which)."""


def cuda_home() -> pathlib.Path:
    return pathlib.Path(os.environ.get("CUDA_HOME") or "/usr/local/cuda")


def prerequisite_missing() -> str | None:
    """Why the emulator cannot be built here (None when it can)."""
    if shutil.which("g++") is None:
        return "g++ not found"
    if not (cuda_home() / "include" / "cuda_fp16.h").exists():
        return f"CUDA headers not found under {cuda_home()}/include (set CUDA_HOME)"
    return None


# --------------------------------------------------------------------------- source scanning


def _strip_comments(text: str) -> str:
    """Comments and string literals blanked out (same length, newlines kept), for scanning code."""
    def blank(m: re.Match) -> str:
        return re.sub(r"[^\n]", " ", m.group(0))
    return re.sub(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"', blank, text, flags=re.S)


def _matching(text: str, start: int, open_ch: str, close_ch: str) -> int:
    """Index just past the bracket that closes text[start] (== open_ch)."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == open_ch:
            depth += 1
        elif text[i] == close_ch:
            depth -= 1
            if depth == 0:
                return i + 1
    raise RewriteError(f"unbalanced {open_ch}{close_ch} at offset {start}")


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside (), [], {} and <>."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "([{<"
        depth -= ch in ")]}>"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return parts + [current]


# --------------------------------------------------------------------------- rewrites


def rewrite_launches(text: str) -> str:
    """``kernel<tmpl><<<grid, block, smem, stream>>>(args)`` -> ``emu::launch(grid, block, smem, stream)(kernel<tmpl>, args)``.

    The kernel expression is whatever name (with ``::`` and balanced template arguments)
    precedes ``<<<``, on any line; the launch configuration and arguments are kept verbatim.
    """
    code = _strip_comments(text)
    out, pos = [], 0
    for m in re.finditer(r"<<<", code):
        if m.start() < pos:
            continue
        # walk back over whitespace, template arguments and the (qualified) name
        i = m.start()
        while i > 0 and code[i - 1].isspace():
            i -= 1
        if code[i - 1] == ">":
            depth = 0
            while i > 0:
                i -= 1
                depth += (code[i] == ">") - (code[i] == "<")
                if depth == 0:
                    break
            while i > 0 and code[i - 1].isspace():
                i -= 1
        name_end = i
        while i > 0 and (code[i - 1].isalnum() or code[i - 1] in "_:"):
            i -= 1
        if i == name_end:
            raise RewriteError(f"cannot find the kernel name before <<< at offset {m.start()}")
        kernel = text[i:m.start()].strip()
        config_end = code.index(">>>", m.end())
        config = text[m.end():config_end]
        paren = config_end + 3
        while code[paren].isspace():
            paren += 1
        if code[paren] != "(":
            raise RewriteError(f"no argument list after >>> at offset {config_end}")
        args_end = _matching(code, paren, "(", ")")
        args = text[paren + 1:args_end - 1]
        call = f"emu::launch({config})({kernel}" + (f", {args})" if args.strip() else ")")
        out.append(text[pos:i] + call)
        pos = args_end
    if not out:
        return text
    return "".join(out) + text[pos:]


_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s*)?([^;\[]+?)\s*(\w+)\s*\[\s*\]\s*;")
_SHARED = re.compile(r"__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s*)?([^;]+);")


def rewrite_shared(text: str) -> str:
    """``__shared__`` declarations -> references into the emulator's per-launch shared arena."""
    def extern(m: re.Match) -> str:
        return f"{m.group(1)}* {m.group(2)} = emu::dynamic_shared<{m.group(1)}>();"

    def static(m: re.Match) -> str:
        declarators = _split_top_level(m.group(1))
        first = re.fullmatch(r"\s*(.*?)\s*\b(\w+)\s*((?:\[[^\]]*\]\s*)*)", declarators[0], re.S)
        if first is None or not first.group(1):
            raise RewriteError(f"cannot parse the __shared__ declaration {m.group(0)!r}")
        type_ = first.group(1)
        decls = [(first.group(2), first.group(3))]
        for d in declarators[1:]:
            more = re.fullmatch(r"\s*(\w+)\s*((?:\[[^\]]*\]\s*)*)", d, re.S)
            if more is None:
                raise RewriteError(f"cannot parse the __shared__ declaration {m.group(0)!r}")
            decls.append((more.group(1), more.group(2)))
        return " ".join(f"static char emu_shared_tag_{name}; "
                        f"auto& {name} = *emu::shared_var<{type_} {dims.strip()}>(&emu_shared_tag_{name});"
                        for name, dims in decls)

    for pattern, replace in ((_EXTERN_SHARED, extern), (_SHARED, static)):
        code = _strip_comments(text)
        out, pos = [], 0
        for m in pattern.finditer(code):
            out.append(text[pos:m.start()] + replace(pattern.fullmatch(text, m.start(), m.end())))
            pos = m.end()
        text = "".join(out) + text[pos:]
    return text


def add_launch_bounds_checks(text: str) -> str:
    """Start each ``__launch_bounds__(n)`` kernel with a check that its launch has at most n threads."""
    code = _strip_comments(text)
    out, pos = [], 0
    for m in re.finditer(r"__launch_bounds__\s*\(", code):
        bounds_end = _matching(code, m.end() - 1, "(", ")")
        bounds = text[m.end():bounds_end - 1]
        params = code.index("(", bounds_end)
        body = _matching(code, params, "(", ")")
        while code[body].isspace():
            body += 1
        if code[body] != "{":
            continue  # a declaration without a body
        out.append(text[pos:body + 1] + f" emu::check_launch_bounds({bounds});")
        pos = body + 1
    return "".join(out) + text[pos:]


def rewrite_source(text: str, name: str = "<source>") -> str:
    """One kernel source file (.cu/.cuh/.h) made host-compilable against emu.h."""
    text, _ = PTX_REGION.subn("", text)
    text = re.sub(r"\b__CUDACC__\b", "GPTFAST_EMU_CUDACC", text)
    text = re.sub(r"\b__CUDA_ARCH__\b", "GPTFAST_EMU_CUDA_ARCH", text)
    text = add_launch_bounds_checks(text)
    text = rewrite_launches(text)
    text = rewrite_shared(text)
    code = _strip_comments(text)
    for pattern, what in ((r"\basm\b|\b__asm__\b", "inline PTX outside the BEGIN/END PTX PRIMITIVES region "
                                                   "(wrap it there and add its emulation to emu.h)"),
                          (r"\b__shared__\b", "a __shared__ declaration the emulator could not rewrite"),
                          (r"<<<", "a kernel launch the emulator could not rewrite")):
        hit = re.search(pattern, code)
        if hit:
            line = code.count("\n", 0, hit.start()) + 1
            raise RewriteError(f"{name}:{line}: {what}")
    return text


def write_sources(gen: pathlib.Path, kernel_dir: pathlib.Path = KERNEL_DIR) -> list[pathlib.Path]:
    """Every file of `kernel_dir` (csrc/cuda) rewritten into `gen`; returns the .cu files to compile."""
    gen.mkdir(parents=True, exist_ok=True)
    units = []
    for src in sorted(pathlib.Path(kernel_dir).iterdir()):
        if src.suffix not in (".cu", ".cuh", ".h"):
            continue
        (gen / src.name).write_text(rewrite_source(src.read_text(), src.name))
        if src.suffix == ".cu":
            units.append(gen / src.name)
    if not units:
        raise RewriteError(f"no .cu file under {kernel_dir}")
    return units


# --------------------------------------------------------------------------- build and run


def build(out_dir: pathlib.Path, sanitize: bool = False, jobs: int = 2,
          kernel_dir: pathlib.Path = KERNEL_DIR) -> dict[str, pathlib.Path]:
    """Compile the kernels, the check programs and the emulator's self check into `out_dir`.

    Returns {program name: executable} for the programs of CHECKS and "self_check".
    """
    out_dir = pathlib.Path(out_dir)
    gen = out_dir / "gen"
    units = write_sources(gen, kernel_dir)
    self_check = out_dir / "self_check_src" / SELF_CHECK.name
    self_check.parent.mkdir(exist_ok=True)
    self_check.write_text(rewrite_source(SELF_CHECK.read_text(), SELF_CHECK.name))
    flags = ["g++", "-std=c++20", "-O1", "-g0", "-w", "-pthread", "-U_FORTIFY_SOURCE",
             f"-I{cuda_home() / 'include'}", *(SANITIZE_FLAGS if sanitize else BASE_SANITIZE_FLAGS)]
    # -I kernel_dir after gen: a kernel's "../x.h" (a header shared with the CPU kernels, csrc/x.h) is
    # not under gen, and resolves from there as it does from csrc/cuda.
    jobs_list = [[*flags, "-x", "c++", "-include", str(EMULATOR_HEADER), f"-I{gen}", f"-I{kernel_dir}", "-c", str(u),
                  "-o", str(out_dir / f"{u.parent.name}_{u.stem}.o")] for u in [*units, self_check]]
    jobs_list += [[*flags, f"-I{kernel_dir}", "-c", str(HERE / f"{check}.cpp"), "-o", str(out_dir / f"{check}.o")]
                  for check in CHECKS]

    def compile_one(cmd: list[str]) -> None:
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}\n{result.stderr[-6000:]}")

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(compile_one, jobs_list))
    kernels = [str(out_dir / f"{u.parent.name}_{u.stem}.o") for u in units]
    executables = {"self_check": out_dir / "self_check"}
    compile_one([*flags, str(out_dir / f"{self_check.parent.name}_{self_check.stem}.o"), "-o",
                 str(executables["self_check"])])
    for check in CHECKS:
        exe = out_dir / check
        compile_one([*flags, str(out_dir / f"{check}.o"), *kernels, "-o", str(exe)])
        executables[check] = exe
    return executables


def cached_build(sanitize: bool = False, kernel_dir: pathlib.Path = KERNEL_DIR) -> dict[str, pathlib.Path]:
    """build() into a temp folder named by a hash of every input, reused while nothing changed.

    A lock makes concurrent callers (pytest-xdist workers) wait for one build instead of
    compiling the same thing twice.
    """
    digest = hashlib.sha256(repr((sanitize, cuda_home(), os.environ.get("CXX"))).encode())
    inputs = [*sorted(pathlib.Path(kernel_dir).iterdir()), *sorted(HERE.iterdir())]
    for path in inputs:
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    out_dir = pathlib.Path(tempfile.gettempdir()) / f"gptfast-cuda-emulator-{digest.hexdigest()[:16]}"
    out_dir.mkdir(exist_ok=True)
    with open(out_dir / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = out_dir / "built"
        if done.exists():
            return {name: out_dir / name for name in [*CHECKS, "self_check"]}
        executables = build(out_dir, sanitize=sanitize, kernel_dir=kernel_dir)
        done.write_text("ok\n")
        return executables


def run_check(exe: pathlib.Path, selection: str, mode: str, timeout: float | None = None):
    """Run one selection of a check program; returns the CompletedProcess (stdout/stderr as text)."""
    return subprocess.run([str(exe), selection, mode], capture_output=True, text=True, timeout=timeout)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="every case, not the quick subset")
    parser.add_argument("--sanitize", action="store_true", help="build with ASan and UBSan")
    parser.add_argument("--keep", type=pathlib.Path, help="build here and keep the files")
    parser.add_argument("--kernels", type=pathlib.Path, default=KERNEL_DIR, help="kernel sources (default csrc/cuda)")
    args = parser.parse_args(argv)
    missing = prerequisite_missing()
    if missing:
        print(f"cannot build the emulator: {missing}")
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.keep or pathlib.Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        executables = build(out_dir, sanitize=args.sanitize, jobs=os.cpu_count() or 2, kernel_dir=args.kernels)
        status = 0
        for check, selections in CHECKS.items():
            for selection in selections:
                result = run_check(executables[check], selection, "full" if args.full else "quick")
                sys.stdout.write(result.stdout + result.stderr)
                status |= result.returncode != 0
        print("emulator checks:", "FAILED" if status else "OK")
        return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
