"""The install's build logic (setup.py) and how the backends report a missing extension.

The builds themselves run as CI steps of scripts/test.sh (a no-OpenMP, no-AVX2 CPU build and a
failing-compiler build: scripts/check_portable_build.py; the whole CUDA extension against CUDA
torch: scripts/cuda_ci.sh).  Here: the pieces those builds rely on, quickly.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import platform
import stat
import subprocess
import sys

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_module():
    spec = importlib.util.spec_from_file_location("gptfast_setup", REPO / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: defines the helpers, builds nothing
    return module


# ----------------------------------------------------------------------------- setup.py helpers


def _fake_nvcc(tmp_path, toolkit):
    """A wrapper-style nvcc outside the toolkit that answers --dryrun like the real one."""
    bin_dir = tmp_path / "wrapper-bin"
    bin_dir.mkdir()
    nvcc = bin_dir / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho '#$ _HERE_={toolkit}/bin'\necho '#$ TOP={toolkit}/bin/..'\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    return nvcc


def test_cuda_home_comes_from_what_nvcc_reports_not_from_the_wrapper_folder(setup_module, tmp_path, monkeypatch):
    toolkit = tmp_path / "cuda-13.0"
    (toolkit / "include").mkdir(parents=True)
    (toolkit / "include" / "cuda_runtime.h").write_text("")
    nvcc = _fake_nvcc(tmp_path, toolkit)
    assert setup_module.nvcc_cuda_home(str(nvcc)) == str(toolkit)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{nvcc.parent}{os.pathsep}{os.environ['PATH']}")
    assert setup_module.find_cuda_home() == str(toolkit)
    monkeypatch.setenv("CUDA_HOME", "/opt/users-own-cuda")  # the user's choice wins
    assert setup_module.find_cuda_home() == "/opt/users-own-cuda"


def test_cuda_home_is_none_when_nvcc_names_no_toolkit(setup_module, tmp_path):
    nvcc = _fake_nvcc(tmp_path, tmp_path / "missing")
    assert setup_module.nvcc_cuda_home(str(nvcc)) is None


def test_cxx_standard_follows_the_installed_torch(setup_module, monkeypatch):
    import torch.utils.cpp_extension as cpp_extension

    monkeypatch.delenv("GPTFAST_CXX_STD", raising=False)
    torch_default = "20" if "c++20" in pathlib.Path(cpp_extension.__file__).read_text() else "17"
    assert setup_module.torch_cxx_std() == torch_default
    monkeypatch.setenv("GPTFAST_CXX_STD", "c++17")
    assert setup_module.torch_cxx_std() == "17"


def test_openmp_is_probed_and_can_be_switched_off(setup_module, monkeypatch):
    monkeypatch.setenv("GPTFAST_CPU_OPENMP", "0")
    assert setup_module.openmp_flags()[:2] == ([], [])
    monkeypatch.setenv("GPTFAST_CPU_OPENMP", "auto")
    monkeypatch.setenv("CXX", "/nonexistent/c++")  # a compiler that cannot run: no OpenMP, no failure
    cflags, lflags, note = setup_module.openmp_flags()
    assert (cflags, lflags) == ([], []) and "no working OpenMP" in note
    monkeypatch.setenv("GPTFAST_CPU_OPENMP", "1")
    with pytest.raises(RuntimeError, match="GPTFAST_CPU_OPENMP=1"):
        setup_module.openmp_flags()


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86-64 flags")
def test_avx2_only_where_wanted(setup_module, monkeypatch):
    monkeypatch.setenv("GPTFAST_CPU_AVX2", "0")
    assert setup_module.x86_simd_flags()[0] == []
    monkeypatch.setenv("GPTFAST_CPU_AVX2", "auto")
    # A CPU without AVX2, as torch reports it (torch reads ATEN_CPU_CAPABILITY once per process, so the
    # environment variable cannot be changed here after torch has dispatched a kernel).
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    flags, note = setup_module.x86_simd_flags()
    assert flags == [] and "no AVX2" in note


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86-64 flags")
def test_avx512_variant_only_where_wanted(setup_module, monkeypatch):
    avx2 = ["-mavx2", "-mfma", "-mf16c"]
    monkeypatch.setenv("GPTFAST_CPU_AVX512", "0")
    assert setup_module.x86_avx512_flags(avx2) == (None, "not built: GPTFAST_CPU_AVX512=0 at install time")
    monkeypatch.setenv("GPTFAST_CPU_AVX512", "auto")
    flags, note = setup_module.x86_avx512_flags([])  # a portable build gets no AVX-512 variant either
    assert flags is None and "without AVX2" in note
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    flags, note = setup_module.x86_avx512_flags(avx2)
    assert flags is None and "no AVX-512" in note
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(setup_module, "_compiles", lambda flags, source, link_flags=(): True)
    assert setup_module.x86_avx512_flags(avx2) == ([*avx2, *setup_module.AVX512_FLAGS], "avx512")
    monkeypatch.setattr(setup_module, "_compiles", lambda flags, source, link_flags=(): False)
    flags, note = setup_module.x86_avx512_flags(avx2)
    assert flags is None and "rejects" in note
    monkeypatch.setenv("GPTFAST_CPU_AVX512", "1")  # wanted: a compiler that cannot is an error
    with pytest.raises(RuntimeError, match="GPTFAST_CPU_AVX512=1"):
        setup_module.x86_avx512_flags(avx2)


def test_variant_sources_include_the_kernels_themselves(setup_module, tmp_path, monkeypatch):
    (tmp_path / "csrc" / "cpu").mkdir(parents=True)
    (tmp_path / "csrc" / "cpu" / "gelu.cpp").write_text("int gelu_marker = 1;\n")
    monkeypatch.setattr(setup_module, "ROOT", str(tmp_path))
    wrappers = setup_module.variant_sources(["csrc/cpu/gelu.cpp"], os.path.join("build", "variant"))
    assert wrappers == [os.path.join("build", "variant", "gelu.cpp")]
    text = (tmp_path / wrappers[0]).read_text()
    included = text.split('#include "')[1].split('"')[0]
    assert (tmp_path / "build" / "variant" / included).resolve() == (tmp_path / "csrc" / "cpu" / "gelu.cpp").resolve()
    before = (tmp_path / wrappers[0]).stat().st_mtime_ns
    setup_module.variant_sources(["csrc/cpu/gelu.cpp"], os.path.join("build", "variant"))
    assert (tmp_path / wrappers[0]).stat().st_mtime_ns == before  # unchanged: no rebuild


def test_build_report_keeps_a_built_extensions_entry(setup_module, tmp_path):
    (tmp_path / "_C_cpu.cpython-311-x86_64-linux-gnu.so").write_text("")
    setup_module.write_report({"cpu": {"built": True, "attempted": True, "simd": "avx2"}}, str(tmp_path))
    # a later build of only the CUDA extension (CPU skipped) leaves the CPU entry alone
    setup_module.write_report({"cpu": {"built": False, "reason": "not built: GPTFAST_BUILD_CPU=0"},
                               "cuda": {"built": True, "attempted": True}}, str(tmp_path))
    report = json.loads((tmp_path / "_build.json").read_text())
    assert report["cpu"]["built"] and report["cpu"]["simd"] == "avx2" and report["cuda"]["built"]


@pytest.mark.parametrize("backend, flag", [("cpu", "GPTFAST_BUILD_CPU"), ("cuda", "GPTFAST_BUILD_CUDA")])
def test_a_tree_without_kernel_sources_says_so_and_a_forced_build_fails(setup_module, tmp_path, monkeypatch, backend,
                                                                        flag):
    """A source tree lacking csrc (an sdist made without its kernels): the report gives the reason, and a build the
    user forced fails at install instead of leaving the backend missing unannounced."""
    monkeypatch.setattr(setup_module, "ROOT", str(tmp_path))
    build = {"cpu": lambda report: setup_module.cpu_extensions(None, 17, report),
             "cuda": lambda report: setup_module.cuda_extension(None, torch, None, 17, report)}[backend]
    report = {}
    monkeypatch.setenv(flag, "auto")
    assert not build(report)
    assert report[backend] == {"built": False, "reason": f"not built: this source tree has no csrc/{backend} sources"}
    monkeypatch.setenv(flag, "1")
    with pytest.raises(RuntimeError, match=f"{flag}=1 but the {backend} extension cannot be built"):
        build({})


@pytest.mark.parametrize("cxx, why", [("/bin/false", "'/bin/false' exits with status 1"),
                                      ("/nonexistent/c++", "cannot run '/nonexistent/c++': No such file or directory")])
def test_a_compiler_that_does_not_work_is_named_before_any_probe_blames_openmp(setup_module, monkeypatch, cxx, why):
    """A missing or failing compiler is the reason given, not "no OpenMP"; forced, the build fails at once."""
    if not pathlib.Path("/bin/false").exists():
        pytest.skip("no /bin/false here")
    monkeypatch.setenv("CXX", cxx)
    monkeypatch.setenv("GPTFAST_BUILD_CPU", "auto")
    setup_module.compiler_problem.cache_clear()
    try:
        report = {}
        assert setup_module.cpu_extensions(None, 17, report) == []
        assert report["cpu"]["reason"] == f"not built: the C++ compiler does not build a plain program ({why})"
        monkeypatch.setenv("GPTFAST_BUILD_CPU", "1")
        with pytest.raises(RuntimeError, match="GPTFAST_BUILD_CPU=1 but the cpu extension cannot be built: the "
                                               "C.. compiler does not build"):
            setup_module.cpu_extensions(None, 17, {})
    finally:
        setup_module.compiler_problem.cache_clear()


def _without_torch_path(tmp_path):
    """A folder that, first on PYTHONPATH, makes ``import torch`` fail, as in pip's isolated build."""
    blocker = tmp_path / "no_torch"
    blocker.mkdir()
    (blocker / "torch.py").write_text("raise ImportError('torch is not importable in this build')\n")
    return blocker


def test_a_build_without_torch_records_why_the_backends_are_missing(tmp_path):
    """pip's default, isolated build cannot import torch: gptfast installs without extensions, and says why."""
    blocker = _without_torch_path(tmp_path)
    lib = tmp_path / "lib"
    env = {**os.environ, "PYTHONPATH": str(blocker), "GPTFAST_BUILD_CPU": "auto", "GPTFAST_BUILD_CUDA": "auto"}
    command = [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(lib)]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((lib / "gptfast" / "_build.json").read_text())
    for backend in ("cpu", "cuda"):
        assert not report[backend]["built"] and "--no-build-isolation" in report[backend]["reason"]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**env, "GPTFAST_BUILD_CPU": "1"})
    assert proc.returncode != 0 and "GPTFAST_BUILD_CPU=1 but the cpu extension cannot be built" in proc.stderr


class _StandInBuild:
    """The parts of torch's BuildExtension the tolerant build wraps: ``checks`` fails before any extension (as
    torch's compiler check does), ``failing`` names the extensions whose build fails."""

    def __init__(self, extensions, tmp_path, checks_fail=False, failing=()):
        self.extensions, self.inplace, self.tmp_path = extensions, False, tmp_path
        self.checks_fail, self.failing = checks_fail, failing

    def build_extensions(self):
        if self.checks_fail:
            raise RuntimeError("the compiler's version check failed")
        for ext in self.extensions:
            self.build_extension(ext)

    def build_extension(self, ext):
        if ext.name in self.failing:
            raise RuntimeError(f"compile error in {ext.name}")

    def get_ext_fullpath(self, name):
        return str(self.tmp_path / (name + ".so"))

    def get_ext_filename(self, name):
        return name + ".so"


def _extensions(*names):
    import types

    return [types.SimpleNamespace(name=name) for name in names]


def test_the_tolerant_build_records_failures_and_stops_on_a_forced_one(setup_module, tmp_path, monkeypatch):
    names = ("gptfast._C_cpu", "gptfast._C_cpu_avx512")
    for flag in ("GPTFAST_BUILD_CPU", "GPTFAST_CPU_AVX512", "GPTFAST_BUILD_CUDA"):
        monkeypatch.setenv(flag, "auto")
    # A check that fails before any extension: every one recorded as failed, the install goes on.
    report = {}
    build = setup_module.make_build_ext(_StandInBuild, report)(_extensions(*names), tmp_path, checks_fail=True)
    build.build_extensions()
    assert all("version check failed" in report[key]["reason"] for key in ("cpu", "cpu_avx512"))
    assert set(build.failed) == set(names)
    # A forced extension that fails stops the install, even with another extension after it.
    monkeypatch.setenv("GPTFAST_BUILD_CPU", "1")
    build = setup_module.make_build_ext(_StandInBuild, {})(_extensions(*names), tmp_path, failing={names[0]})
    with pytest.raises(RuntimeError, match="compile error in gptfast._C_cpu"):
        build.build_extensions()


def test_the_sdist_ships_every_kernel_source_and_the_data(tmp_path):
    """Whatever setup.py lists when the sdist is made (nothing without torch), the kernels build from the sdist."""
    # The files as they are in this tree: the sdist is made from a copy holding only them.
    tree = tmp_path / "tree"
    for folder in ("csrc", "data", "gptfast"):
        for path in (REPO / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".so", ".pyc"):
                (tree / path.relative_to(REPO)).parent.mkdir(parents=True, exist_ok=True)
                (tree / path.relative_to(REPO)).write_bytes(path.read_bytes())
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "ARCHITECTURE.md"):
        (tree / name).write_bytes((REPO / name).read_bytes())
    # Without torch importable, as in an isolated build: setup.py then lists no extension at all.
    blocker = _without_torch_path(tmp_path)
    proc = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--formats=tar", "-d", str(tmp_path / "dist")],
                          cwd=tree, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(blocker)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    import tarfile

    (archive,) = (tmp_path / "dist").glob("*.tar")
    with tarfile.open(archive) as tar:
        shipped = {pathlib.PurePosixPath(*pathlib.PurePosixPath(n).parts[1:]).as_posix() for n in tar.getnames()}
    wanted = {p.relative_to(tree).as_posix() for folder in ("csrc", "data") for p in (tree / folder).rglob("*")
              if p.is_file()}
    assert wanted - shipped == set()
    assert {"csrc/cpu/cpu_common.h", "csrc/dropout_hash.h", "csrc/cuda/layer_norm.cu"} <= shipped


# ----------------------------------------------------------------------------- backend status without extensions

BLOCKED = '''
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in {blocked!r}:
            raise ImportError(name + " blocked by the test")
        return None

sys.meta_path.insert(0, Block())
import json
from gptfast import ops
print(json.dumps(ops.backend_status()))
'''


def _status(tmp_path, blocked=(), report=None, **env):
    report_path = tmp_path / "report.json"
    if report is not None:
        report_path.write_text(json.dumps(report))
    proc = subprocess.run([sys.executable, "-c", BLOCKED.format(blocked=set(blocked))], capture_output=True,
                          text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "GPTFAST_BUILD_REPORT": str(report_path), **env})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_cpu_backend_without_its_extension_says_how_to_build_it(tmp_path):
    status = _status(tmp_path, blocked={"gptfast._C_cpu", "gptfast._C_cpu_avx512"})
    assert status["cpu"].startswith("extension gptfast._C_cpu not built: run pip install")
    assert status["torch"] == "available"


def test_cpu_backend_quotes_the_recorded_build_failure(tmp_path):
    reason = "build failed at install time: RuntimeError: c++: error: no OpenMP here"
    status = _status(tmp_path, blocked={"gptfast._C_cpu", "gptfast._C_cpu_avx512"},
                     report={"cpu": {"built": False, "attempted": True, "reason": reason}})
    assert status["cpu"] == f"extension gptfast._C_cpu is unavailable: {reason}"
    assert status["torch"] == "available"


def test_cuda_backend_quotes_the_recorded_build_failure(tmp_path):
    reason = "build failed at install time: RuntimeError: nvcc fatal: something"
    status = _status(tmp_path, blocked={"gptfast._C_cuda"},
                     report={"cuda": {"built": False, "attempted": True, "reason": reason}})
    assert reason in status["cuda"] and "not built" not in status["cuda"].split(reason)[0]


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="AVX2 is an x86-64 matter")
def test_avx2_refusal_applies_only_to_an_avx2_build(tmp_path):
    no_avx2 = {"ATEN_CPU_CAPABILITY": "default"}  # torch reports a CPU without AVX2
    refused = _status(tmp_path, report={"cpu": {"built": True, "simd": "avx2"}}, **no_avx2)
    assert "AVX2" in refused["cpu"]
    portable = _status(tmp_path, report={"cpu": {"built": True, "simd": "portable x86-64 (GPTFAST_CPU_AVX2=0)"}},
                       **no_avx2)
    assert portable["cpu"] == "available"


LOADED = """
import sys
import gptfast.ops.cpu_ops as cpu_ops
print(cpu_ops.LOADED, cpu_ops.unavailable_reason(), sorted(m for m in sys.modules if m.startswith("gptfast._C_cpu")))
"""


def _loaded(capability=None):
    env = {**os.environ}
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    proc = subprocess.run([sys.executable, "-c", LOADED], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def _avx512_build_present() -> bool:
    return importlib.util.find_spec("gptfast._C_cpu_avx512") is not None


@pytest.mark.skipif(not _avx512_build_present(), reason="no AVX-512 build of the CPU kernels here")
def test_the_avx512_build_loads_alone_on_an_avx512_cpu_and_the_avx2_build_elsewhere():
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        assert _loaded() == "gptfast._C_cpu_avx512 None ['gptfast._C_cpu_avx512']"
    # torch reports an AVX2 CPU: the AVX2 build, and never both (they register the same namespace)
    assert _loaded("avx2") == "gptfast._C_cpu None ['gptfast._C_cpu']"
