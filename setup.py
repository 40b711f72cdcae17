"""Build gptfast's extensions; an extension that cannot be built never fails the install.

* ``gptfast._C_cpu``: every ``csrc/cpu/*.cpp``.  Portable: OpenMP only where a probe shows the
  compiler has it; on x86-64, AVX2/FMA/F16C code only where the compiler accepts the flags and the
  building CPU has them.  ``GPTFAST_BUILD_CPU=0`` skips it, ``=1`` makes a failure fatal;
  ``GPTFAST_CPU_OPENMP=0/1`` and ``GPTFAST_CPU_AVX2=0/1`` override the probes.
* ``gptfast._C_cpu_avx512``: the same kernels compiled for AVX-512 (F/BW/VL/DQ), built next to an
  AVX2 ``_C_cpu`` where the building CPU has AVX-512 and the compiler accepts the flags
  (``GPTFAST_CPU_AVX512=0`` skips it, ``=1`` builds it regardless of the CPU, a failure then being
  fatal).  The cpu backend loads it instead of ``_C_cpu`` on a CPU that torch reports as AVX512.
* ``gptfast._C_cuda``: every ``csrc/cuda/*.cu`` plus its ``*.cpp`` bindings, built where torch has
  CUDA and nvcc is found.  ``GPTFAST_BUILD_CUDA=1`` forces it (a failure is fatal), ``=0`` skips it.
  ``TORCH_CUDA_ARCH_LIST`` is respected.  CUDA_HOME: the user's, else the toolkit nvcc reports
  (works when the ``nvcc`` on PATH is a wrapper script outside the toolkit).
* The C++ standard is the one the installed torch builds extensions with (C++20 from torch 2.13,
  C++17 before); ``GPTFAST_CXX_STD=17|20`` overrides it.
* ``csrc/triton`` is installed as the pure-Python package ``gptfast.triton_kernels`` and ``data`` as
  ``gptfast.embedded``; both install whatever happens to the extensions.

Each build writes ``gptfast/_build.json`` next to the extensions: per extension whether it was
built, with which options, or why not.  ``gptfast.ops.backend_status()`` quotes it.

Build with ``pip install --no-build-isolation -e .`` after installing torch.
"""

import functools
import glob
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_REPORT = "_build.json"


def _flag(name, default="auto"):
    """'0', '1' or 'auto' from an environment variable (accepts yes/no/true/false)."""
    value = os.environ.get(name, default).strip().lower()
    if value in ("0", "false", "no", "off"):
        return "0"
    if value in ("1", "true", "yes", "on"):
        return "1"
    return "auto"


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _log(message):
    print(f"gptfast setup: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- toolchain probes


def nvcc_cuda_home(nvcc):
    """The toolkit folder ``nvcc`` itself uses, from its ``--dryrun`` listing (``TOP=...``).

    Follows wrapper scripts that exec the real compiler from elsewhere, where the folder above
    the ``nvcc`` on PATH holds no ``include/cuda_runtime.h``.
    """
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cu")
        open(src, "w").close()
        try:
            proc = subprocess.run([nvcc, "--dryrun", "-c", src, "-o", os.path.join(tmp, "probe.o")],
                                  capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
    for line in (proc.stdout + proc.stderr).splitlines():
        match = re.match(r"#\$ TOP=(.+)$", line.strip())
        if match:
            home = os.path.realpath(match.group(1).strip())
            if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
                return home
    real = os.path.realpath(nvcc)  # a symlink into the toolkit
    home = os.path.dirname(os.path.dirname(real))
    return home if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")) else None


def find_cuda_home():
    """CUDA_HOME/CUDA_PATH if set, else the toolkit of the ``nvcc`` on PATH, else /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        return nvcc_cuda_home(nvcc)
    return "/usr/local/cuda" if os.path.isfile("/usr/local/cuda/bin/nvcc") else None


def torch_cxx_std():
    """The C++ standard (17 or 20) the installed torch compiles extensions with."""
    override = os.environ.get("GPTFAST_CXX_STD")
    if override:
        return override.replace("c++", "")
    import torch.utils.cpp_extension as cpp_extension

    with open(cpp_extension.__file__, encoding="utf-8") as f:
        return "20" if "c++20" in f.read() else "17"


def _compile_error(flags, source, link_flags=()):
    """None when the C++ compiler builds and links ``source`` with ``flags``, else why not (one line)."""
    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write(source)
        try:
            proc = subprocess.run([cxx, *os.environ.get("CFLAGS", "").split(), *flags, src, "-o",
                                   os.path.join(tmp, "probe"), *link_flags],
                                  capture_output=True, text=True, timeout=120)
        except OSError as exc:
            return f"cannot run {cxx!r}: {exc.strerror or exc}"
        except subprocess.SubprocessError as exc:
            return f"{cxx!r}: {exc}"
        if proc.returncode == 0:
            return None
        lines = [line.strip() for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        return f"{cxx!r} exits with status {proc.returncode}" + (f": {lines[0][:300]}" if lines else "")


def _compiles(flags, source, link_flags=()):
    """Whether the C++ compiler builds and links ``source`` with ``flags`` (quietly)."""
    return _compile_error(flags, source, link_flags) is None


@functools.lru_cache(maxsize=None)
def compiler_problem():
    """None when the C++ compiler builds a plain program, else the reason no extension can be built.

    Probed before anything else: a compiler that is missing or fails would otherwise be reported as "no OpenMP"
    and "no AVX2" by the other probes, and torch's build checks it before building any extension, failing the
    whole install.
    """
    error = _compile_error([], "int main() { return 0; }\n")
    return None if error is None else f"the C++ compiler does not build a plain program ({error})"


def openmp_flags():
    """(compile flags, link flags, description) for OpenMP, or ([], [], reason) without it."""
    wanted = _flag("GPTFAST_CPU_OPENMP")
    if wanted == "0":
        return [], [], "off (GPTFAST_CPU_OPENMP=0)"
    probe = "#include <omp.h>\nint main() { int n = 0;\n#pragma omp parallel\n n = omp_get_num_threads();\n return n > 0 ? 0 : 1; }\n"
    candidates = [(["-fopenmp"], ["-fopenmp"])]
    if sys.platform == "darwin":  # Apple clang: preprocessor-only OpenMP against the libomp torch ships
        import torch

        lib = os.path.join(os.path.dirname(torch.__file__), "lib")
        inc = os.path.join(os.path.dirname(torch.__file__), "include")
        candidates.append((["-Xpreprocessor", "-fopenmp", f"-I{inc}"], [f"-L{lib}", "-lomp", f"-Wl,-rpath,{lib}"]))
    for cflags, lflags in candidates:
        if _compiles(cflags, probe, lflags):
            return cflags, lflags, "on (" + " ".join(cflags) + ")"
    if wanted == "1":
        raise RuntimeError("GPTFAST_CPU_OPENMP=1 but the C++ compiler has no working OpenMP")
    return [], [], "off (the C++ compiler has no working OpenMP: kernels run single-threaded)"


def x86_simd_flags():
    """(flags, description): AVX2/FMA/F16C where wanted and possible, else portable code."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return [], f"portable ({platform.machine()})"
    wanted = _flag("GPTFAST_CPU_AVX2")
    flags = ["-mavx2", "-mfma", "-mf16c"]
    if wanted == "0":
        return [], "portable x86-64 (GPTFAST_CPU_AVX2=0)"
    if wanted == "auto":
        import torch

        if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
            return [], "portable x86-64 (this CPU has no AVX2)"
    if not _compiles(flags, "#include <immintrin.h>\nint main() { return _mm256_testz_si256(_mm256_setzero_si256(), _mm256_setzero_si256()) ? 0 : 1; }\n"):
        if wanted == "1":
            raise RuntimeError("GPTFAST_CPU_AVX2=1 but the C++ compiler rejects -mavx2 -mfma -mf16c")
        return [], "portable x86-64 (the C++ compiler rejects -mavx2 -mfma -mf16c)"
    return flags, "avx2"


AVX512_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
AVX512_PROBE = "#include <immintrin.h>\nint main() { return _mm512_reduce_add_ps(_mm512_set1_ps(1.f)) > 0 ? 0 : 1; }\n"


def x86_avx512_flags(simd_flags):
    """(flags, note) of the AVX-512 variant of the CPU extension: flags None when it is not built."""
    wanted = _flag("GPTFAST_CPU_AVX512")
    if wanted == "0":
        return None, "not built: GPTFAST_CPU_AVX512=0 at install time"
    if not simd_flags:
        return None, "not built: the CPU extension itself is built without AVX2"
    if wanted == "auto":
        import torch

        if torch.backends.cpu.get_cpu_capability() != "AVX512":
            return None, "not built: the building CPU has no AVX-512 (GPTFAST_CPU_AVX512=1 builds it anyway)"
    flags = [*simd_flags, *AVX512_FLAGS]
    if not _compiles(flags, AVX512_PROBE):
        if wanted == "1":
            raise RuntimeError("GPTFAST_CPU_AVX512=1 but the C++ compiler rejects " + " ".join(AVX512_FLAGS))
        return None, "not built: the C++ compiler rejects " + " ".join(AVX512_FLAGS)
    return flags, "avx512"


def variant_sources(sources, folder):
    """One source per kernel file under ``folder`` that includes it: the same code compiled again with
    other flags, into objects of its own (an extension's objects are named after its sources)."""
    os.makedirs(os.path.join(ROOT, folder), exist_ok=True)
    wrappers = []
    for source in sources:
        wrapper = os.path.join(folder, os.path.basename(source))
        target = os.path.relpath(os.path.join(ROOT, source), os.path.join(ROOT, folder))
        text = f'// Generated by setup.py: {source} compiled for another instruction set.\n#include "{target}"\n'
        path = os.path.join(ROOT, wrapper)
        if not os.path.exists(path) or open(path).read() != text:  # unchanged files keep their timestamps
            with open(path + ".tmp", "w") as f:
                f.write(text)
            os.replace(path + ".tmp", path)
        wrappers.append(wrapper)
    return wrappers


# ----------------------------------------------------------------------------- extensions


def _not_built(backend, flag, reason, report):
    """None, with ``reason`` in ``report``: ``backend``'s extension cannot be built here.  An error if ``flag``
    forces the build (a forced build that quietly builds nothing would leave the backend missing unannounced)."""
    if _flag(flag) == "1":
        raise RuntimeError(f"{flag}=1 but the {backend} extension cannot be built: {reason}")
    report[backend] = {"built": False, "reason": f"not built: {reason}"}
    return None


def cpu_extensions(CppExtension, std, report):
    """The CPU extension and, where it is built, its AVX-512 variant; none (the reason in ``report``)."""
    sources = _sources("csrc/cpu/*.cpp")
    if not sources:
        return _not_built("cpu", "GPTFAST_BUILD_CPU", "this source tree has no csrc/cpu sources", report) or []
    if _flag("GPTFAST_BUILD_CPU") == "0":
        report["cpu"] = {"built": False, "reason": "not built: GPTFAST_BUILD_CPU=0 at install time"}
        return []
    if compiler_problem() is not None:
        return _not_built("cpu", "GPTFAST_BUILD_CPU", compiler_problem(), report) or []
    omp_cflags, omp_lflags, omp_note = openmp_flags()
    simd_flags, simd_note = x86_simd_flags()
    report["cpu"] = {"built": False, "openmp": omp_note, "simd": simd_note, "cxx_std": f"c++{std}"}
    _log(f"CPU extension: C++{std}, OpenMP {omp_note}, SIMD {simd_note}")
    built = [CppExtension(
        "gptfast._C_cpu", sources,
        # -g0 after Python's own -g: debug info would make the library ~20x larger (23 MB against ~1 MB).
        extra_compile_args={"cxx": ["-O3", "-g0", f"-std=c++{std}", *omp_cflags, *simd_flags]},
        extra_link_args=omp_lflags,
    )]
    avx512_flags, avx512_note = x86_avx512_flags(simd_flags)
    if avx512_flags is None:
        report["cpu_avx512"] = {"built": False, "reason": avx512_note}
        return built
    report["cpu_avx512"] = {"built": False, "openmp": omp_note, "simd": avx512_note, "cxx_std": f"c++{std}"}
    _log(f"CPU extension, AVX-512 variant: C++{std}, OpenMP {omp_note}")
    built.append(CppExtension(
        "gptfast._C_cpu_avx512", variant_sources(sources, os.path.join("build", "cpu_avx512_sources")),
        extra_compile_args={"cxx": ["-O3", "-g0", f"-std=c++{std}", *omp_cflags, *avx512_flags]},
        extra_link_args=omp_lflags,
    ))
    return built


def cuda_extension(CUDAExtension, torch_module, cuda_home, std, report):
    """The CUDA extension, or None (with the reason in ``report``)."""
    sources = _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
    if not sources:
        return _not_built("cuda", "GPTFAST_BUILD_CUDA", "this source tree has no csrc/cuda sources", report)
    wanted = _flag("GPTFAST_BUILD_CUDA")
    reason = None
    if wanted == "0":
        reason = "not built: GPTFAST_BUILD_CUDA=0 at install time"
    elif torch_module.version.cuda is None:
        reason = f"not built: the installed torch ({torch_module.__version__}) has no CUDA"
    elif cuda_home is None:
        reason = "not built: no CUDA toolkit found (no nvcc on PATH; set CUDA_HOME)"
    elif compiler_problem() is not None:
        reason = f"not built: {compiler_problem()}"
    if reason is not None:
        if wanted == "1":
            raise RuntimeError(f"GPTFAST_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        report["cuda"] = {"built": False, "reason": reason}
        return None
    report["cuda"] = {"built": False, "cuda_home": cuda_home, "cxx_std": f"c++{std}",
                      "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST", "torch default")}
    _log(f"CUDA extension: C++{std}, CUDA_HOME={cuda_home}, TORCH_CUDA_ARCH_LIST="
         f"{report['cuda']['arch_list']}")
    return CUDAExtension(
        "gptfast._C_cuda", sources,
        extra_compile_args={
            "cxx": ["-O3", f"-std=c++{std}"],
            # fast-math only changes exp/div rounding, which the kernels' fp32 accumulation tolerates.
            "nvcc": ["-O3", f"-std=c++{std}", "--use_fast_math", "-lineinfo"],
        },
    )


def write_report(report, folder):
    """Merges the build report into ``folder``'s ``_build.json`` (temp file + rename).

    An extension skipped by this build does not overwrite the entry of one already built there,
    so a second build of only one extension (another venv, say) keeps the other's record.
    """
    path = os.path.join(folder, BUILD_REPORT)
    try:
        with open(path) as f:
            merged = json.load(f)
    except (OSError, ValueError):
        merged = {}
    for key, entry in report.items():
        if entry.get("attempted") or not glob.glob(os.path.join(folder, f"_C_{key}.*")):
            merged[key] = entry
    os.makedirs(folder, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(merged, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def make_build_py(build_py, report):
    """build_py that also ships the build report (an install with no extension gets one too)."""

    class BuildPyWithReport(build_py):
        def run(self):
            super().run()
            in_place = getattr(self, "editable_mode", False)
            write_report(report, os.path.join(ROOT if in_place else self.build_lib, "gptfast"))

    return BuildPyWithReport


class TeeOutput:
    """Copies everything written to fds 1 and 2 (compiler subprocesses too) into a buffer while
    still passing it through, so a failed build's reason can quote the compiler's error."""

    def __enter__(self):
        import collections
        import threading

        sys.stdout.flush()
        sys.stderr.flush()
        self.lines = collections.deque(maxlen=400)
        self.saved = (os.dup(1), os.dup(2))
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 1)
        os.dup2(write_fd, 2)
        os.close(write_fd)

        def pump():
            with os.fdopen(read_fd, "rb") as pipe:
                for raw in pipe:
                    os.write(self.saved[1], raw)
                    self.lines.append(raw.decode(errors="replace").rstrip())

        self.thread = threading.Thread(target=pump, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self.saved[0], 1)  # closes the pipe's last write ends: the pump sees EOF
        os.dup2(self.saved[1], 2)
        self.thread.join(timeout=10)
        for fd in self.saved:
            os.close(fd)
        return False

    def errors(self, limit=3):
        """The first compiler error lines (a missing compiler's "not found" too), else the last lines."""
        found = list(dict.fromkeys(
            line.strip() for line in self.lines
            if re.search(r"\berror\b|not found|No such file", line, re.I)
            and not line.startswith(("FAILED:", "ninja: build stopped"))))
        return " | ".join((found or list(self.lines)[-limit:])[:limit])


def make_build_ext(BuildExtension, report):
    """BuildExtension that turns a failed extension into a recorded 'unavailable' (unless forced)."""

    class TolerantBuildExt(BuildExtension):
        failed = ()
        attempted = ()

        def run(self):
            # Editable and --inplace builds leave the extensions in the source tree: the report goes there too.
            self.report_to_source = bool(self.inplace or getattr(self, "editable_mode", False))
            super().run()

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as exc:  # noqa: BLE001
                # torch checks the compiler (its version, its ABI) before it builds any extension: what fails
                # there fails every extension, each recorded as one that failed.  Once one was attempted, an error
                # here is a forced build's failure, which _record re-raised: it stops the install.
                if self.attempted:
                    raise
                for ext in self.extensions:
                    self._record(ext, exc, "")

        def build_extension(self, ext):
            tee = TeeOutput()
            try:
                with tee:
                    super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001  (compiler, linker and ninja errors alike)
                self._record(ext, exc, tee.errors())
            else:
                self._record(ext, None, "")

        def _record(self, ext, exc, compiler_lines):
            """The outcome of ``ext``'s build in the report; a failure re-raised where the user forced the build."""
            key = ext.name.split("._C_")[-1]  # "cpu", "cpu_avx512" or "cuda"
            self.attempted = (*self.attempted, ext.name)
            if exc is None:
                report[key] = {**report.get(key, {}), "built": True}
            else:
                if _flag({"cuda": "GPTFAST_BUILD_CUDA", "cpu": "GPTFAST_BUILD_CPU",
                          "cpu_avx512": "GPTFAST_CPU_AVX512"}[key]) == "1":
                    raise exc
                # The compiler's own lines first: the exception's text may be a long command line.
                message = " ".join(" -- ".join(filter(None, (compiler_lines, str(exc)))).split())[:600]
                report[key] = {**report.get(key, {}), "built": False,
                               "reason": f"build failed at install time: {type(exc).__name__}: {message}"}
                _log(f"WARNING: {ext.name} failed to build; backend {key!r} will be unavailable "
                     f"(the rest of gptfast installs): {message}")
                self.failed = (*self.failed, ext.name)
                self._remove_stale_binary(ext)
            report[key]["attempted"] = True
            write_report(report, os.path.dirname(self.get_ext_fullpath(ext.name)))
            if getattr(self, "report_to_source", False):
                write_report(report, os.path.join(ROOT, "gptfast"))

        def _remove_stale_binary(self, ext):
            """A failed build leaves no earlier build's binary behind (a reused tree's build/ folder would ship it,
            loaded and used while the report says the build failed)."""
            paths = {self.get_ext_fullpath(ext.name)}
            if getattr(self, "report_to_source", False):
                paths.add(os.path.join(ROOT, self.get_ext_filename(ext.name)))
            for path in paths:
                if os.path.exists(path):
                    os.remove(path)

        def _built_only(self):
            self.extensions = [ext for ext in self.extensions if ext.name not in self.failed]

        # Editable and in-place installs copy each extension's output: skip the failed ones.
        def copy_extensions_to_source(self):
            self._built_only()
            super().copy_extensions_to_source()

        def get_outputs(self):
            self._built_only()
            return super().get_outputs()

        def get_output_mapping(self):
            self._built_only()
            return super().get_output_mapping()

    return TolerantBuildExt


def _without_torch():
    """No extension, and the report saying why: torch is not importable here (pip's isolated build by default,
    or metadata only, as for an sdist).  A build the user forced is an error."""
    from setuptools.command.build_py import build_py

    reason = ("torch was not importable when gptfast was built (pip builds in an isolated environment by "
              "default): install torch first, then gptfast with --no-build-isolation")
    report = {}
    for backend, flag in (("cpu", "GPTFAST_BUILD_CPU"), ("cuda", "GPTFAST_BUILD_CUDA")):
        _not_built(backend, flag, reason, report)
    return [], {"build_py": make_build_py(build_py, report)}


def extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return _without_torch()
    report = {}
    cuda_home = find_cuda_home()
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME when imported; make its guess ours.
        os.environ.setdefault("CUDA_HOME", cuda_home)
        cpp_extension.CUDA_HOME = cuda_home
    std = torch_cxx_std()
    exts = [*cpu_extensions(cpp_extension.CppExtension, std, report),
            *filter(None, [cuda_extension(cpp_extension.CUDAExtension, torch, cuda_home, std, report)])]
    from setuptools.command.build_py import build_py

    build_ext = make_build_ext(cpp_extension.BuildExtension, report).with_options(use_ninja=True)
    return exts, {"build_ext": build_ext, "build_py": make_build_py(build_py, report)}


def main():
    ext_modules, cmdclass = extensions()
    setup(
        # Every subpackage of gptfast/ (found, so a new one cannot be forgotten), plus the two folders
        # installed under gptfast's name: the shipped data and the Triton kernels.
        packages=find_packages(include=["gptfast", "gptfast.*"]) + ["gptfast.embedded", "gptfast.triton_kernels"],
        package_dir={"gptfast.embedded": "data", "gptfast.triton_kernels": "csrc/triton"},
        package_data={"gptfast.embedded": ["*.txt", "*.tiktoken"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )


if __name__ == "__main__":  # also how pip's build backend runs this file; tests import its helpers
    main()
