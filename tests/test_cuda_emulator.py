"""The CUDA kernels of csrc/cuda, run on the CPU by tests/cuda_emulator and checked against float64 references.

Attention forward/backward (out, lse, dq, dk, dv, with dropout, strided layouts, a key tile scoring -inf and grouped-query
k/v) and decode (split-key flash-decoding, grouped-query too), softmax cross-entropy (loss and in-place/separate gradients for every
dtype, alignment, ignore/bad targets) and top-k/temperature sampling (greedy ties and NaN, top-k
support with ties, the distribution, Philox seed/offset plumbing, per-row clamping), and the
Llama 3 / Qwen3 layer ops (RMSNorm forward/backward with a deterministic dweight, SwiGLU with
NaN/inf, RoPE forward/backward with offsets, per-row and out-of-table positions, strided x), and
the few-row decode_linear (1-17 rows, odd and vector-width K, misaligned x, bias, NaN, untouched guards).

By default the quick subset runs on a plain build; GPTFAST_CUDA_EMULATOR_FULL=1 runs every case on
an ASan + UBSan build (minutes).  The emulator's own detectors (divergent barriers, deadlocks, reads
of unwritten shared memory, cp.async misuse, misaligned vector loads, bad launch configurations)
and its source rewriting are tested here too, so a silent emulator cannot pass the kernels.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess

import pytest

EMULATOR_DIR = pathlib.Path(__file__).resolve().parent / "cuda_emulator"
_spec = importlib.util.spec_from_file_location("cuda_emulator_build", EMULATOR_DIR / "build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

FULL = os.environ.get("GPTFAST_CUDA_EMULATOR_FULL", "") not in ("", "0")
MODE = "full" if FULL else "quick"
RUN_TIMEOUT = 3600 if FULL else 900

needs_toolchain = pytest.mark.skipif(build.prerequisite_missing() is not None,
                                     reason=str(build.prerequisite_missing()))


@pytest.fixture(scope="module")
def executables():
    return build.cached_build(sanitize=FULL)


def _output(result: subprocess.CompletedProcess) -> str:
    return (result.stdout[-6000:] + result.stderr[-3000:]).strip()


# --------------------------------------------------------------------------- the kernels


@needs_toolchain
@pytest.mark.parametrize("check, selection",
                         [(check, selection) for check, selections in build.CHECKS.items() for selection in selections])
def test_kernels_match_float64_reference(executables, check, selection):
    result = build.run_check(executables[check], selection, MODE, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, _output(result)
    assert "EMULATOR ERROR" not in result.stderr
    assert result.stdout.rstrip().endswith("\n0 failures"), _output(result)
    # the attention checks print one line per compared tensor and case: all of them ran
    reported = [line.split()[0] for line in result.stdout.splitlines() if line.endswith((" ok", " FAIL"))]
    # NaN-row cases compare lse and out only; NaN-gradient-row cases lse, out, dq and dk.
    expected = {"fwd_bwd": {**dict.fromkeys(("lse", "out"), 34 if FULL else 22),
                            **dict.fromkeys(("dq", "dk"), 32 if FULL else 20), "dv": 28 if FULL else 16},
                "decode": {"dec": 16 if FULL else 10}}.get(selection, {})
    assert {name: reported.count(name) for name in expected} == expected


@needs_toolchain
def test_check_programs_refuse_unknown_selections(executables):
    for check in build.CHECKS:
        result = build.run_check(executables[check], "nonsense", "quick", timeout=60)
        assert result.returncode == 2 and "usage" in result.stdout


# --------------------------------------------------------------------------- source rewriting


def _assert_contains(text, *pieces):
    """Every one of ``pieces`` stands in ``text``; the failure lists those that do not."""
    missing = [piece for piece in pieces if piece not in text]
    assert not missing, missing


def test_rewrite_launches_keeps_kernel_configuration_and_arguments():
    src = ("  k<T, Foo<int, 2>><<<dim3(a, b), 128, smem, stream>>>(\n      x, f(y, z));\n"
           "  plain_kernel\n      <<<n, 32>>>();\n"
           "  // a comment mentioning k<<<1, 1>>>(x) is left alone\n"
           "  ns::kernel<<<1, 64, 0, s>>>(p);\n")
    out = build.rewrite_launches(src)
    _assert_contains(out, "emu::launch(dim3(a, b), 128, smem, stream)(k<T, Foo<int, 2>>, \n      x, f(y, z));",
                     "emu::launch(n, 32)(plain_kernel)", "emu::launch(1, 64, 0, s)(ns::kernel, p);",
                     "// a comment mentioning k<<<1, 1>>>(x) is left alone")
    assert out.count("<<<") == 1


def test_rewrite_shared_handles_extern_arrays_and_several_declarators():
    src = ("  extern __shared__ __align__(16) unsigned char smem_raw[];\n"
           "  __shared__ float a[N], b[2][M];\n"
           "  __shared__ Pair<int, float> pair;  // __shared__ in a comment; \n")
    out = build.rewrite_shared(src)
    _assert_contains(out, "unsigned char* smem_raw = emu::dynamic_shared<unsigned char>();",
                     "auto& a = *emu::shared_var<float [N]>(&emu_shared_tag_a);",
                     "auto& b = *emu::shared_var<float [2][M]>(&emu_shared_tag_b);",
                     "auto& pair = *emu::shared_var<Pair<int, float> >(&emu_shared_tag_pair);",
                     "// __shared__ in a comment; ")


def test_launch_bounds_become_a_check_at_kernel_entry():
    src = "__global__ void __launch_bounds__(BLOCK, 2)\n    kern(const T* x, int n) {\n  body();\n}\n"
    out = build.add_launch_bounds_checks(src)
    assert "kern(const T* x, int n) { emu::check_launch_bounds(BLOCK, 2);\n  body();" in out


def test_rewrite_source_cuts_the_ptx_region_and_refuses_stray_inline_assembly():
    region = ("// BEGIN PTX PRIMITIVES (substitutable)\n"
              "__device__ void mma() { asm volatile(\"mma.sync ...\"); }\n"
              "// END PTX PRIMITIVES\n")
    out = build.rewrite_source("#ifdef __CUDACC__\n" + region + "#endif\n#if __CUDA_ARCH__ >= 800\n#endif\n")
    assert "asm" not in out and "mma" not in out
    assert "#ifdef GPTFAST_EMU_CUDACC" in out and "GPTFAST_EMU_CUDA_ARCH >= 800" in out
    with pytest.raises(build.RewriteError, match="x.cu:2: inline PTX outside"):
        build.rewrite_source("int a;\n__device__ void f() { asm volatile(\"trap;\"); }\n", "x.cu")
    with pytest.raises(build.RewriteError, match="__shared__"):
        build.rewrite_source("__device__ void f() { __shared__ float; }\n", "y.cu")


def test_every_kernel_source_is_rewritten(tmp_path):
    units = build.write_sources(tmp_path)
    assert {u.name for u in units} == {p.name for p in build.KERNEL_DIR.glob("*.cu")}
    for u in units:
        text = u.read_text()
        assert "emu::launch(" in text, u.name  # every .cu launches its kernels through the emulator
        assert "<<<" not in build._strip_comments(text)


# --------------------------------------------------------------------------- the emulator's own detectors

ABORTS = {
    "divergent_sync": "EMULATOR ERROR: __syncthreads reached by some threads after others of the group returned",
    "deadlock": "EMULATOR ERROR: deadlock",
    "cp_async_not_waited": "EMULATOR ERROR: a thread finished with cp.async copies never waited for",
    "misaligned_ldg": "EMULATOR ERROR: __ldg of a 16-byte type at a misaligned address",
    "misaligned_vector_load": "misaligned address",
    "launch_bounds": "EMULATOR ERROR: kernel with __launch_bounds__(64) launched with 128 threads per block",
}
REPORTS = {
    "unwritten_shared": "odd slots NaN: 64 of 64, even slots 1: 64 of 64",
    "cp_async_order": "before the wait NaN: 32 of 32, after the wait copied: 32 of 32",
    "dynamic_shared": "64 KB without the attribute: launch error\n64 KB with the attribute: success\nreversed: yes",
    "block_too_large": "2048 threads: launch error",
    "warp_collectives": "warp collective mismatches: 0",
}


@needs_toolchain
@pytest.mark.parametrize("scenario", sorted(ABORTS))
def test_emulator_aborts_on_kernel_misuse(executables, scenario):
    result = subprocess.run([str(executables["self_check"]), scenario], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert ABORTS[scenario] in result.stderr, _output(result)


@needs_toolchain
@pytest.mark.parametrize("scenario", sorted(REPORTS))
def test_emulator_models_shared_memory_async_copies_launches_and_shuffles(executables, scenario):
    result = subprocess.run([str(executables["self_check"]), scenario], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, _output(result)
    assert result.stdout.strip() == REPORTS[scenario]
