#!/usr/bin/env bash
# Set up a virtual environment (once), build gptfast, check the builds readers' machines get and
# the whole CUDA extension (without a GPU), then run the tests.
# Works from a fresh clone with no network but the package registries; reruns reuse the venvs.
#
# Steps (each prints its time):
#   cuda-venv   .venv-cuda with CUDA torch 2.14.1 from the local disk, in the background (disk-bound)
#   venv+build  .venv with CPU torch 2.13, gptfast editable (the CPU extension)
#   portable    scripts/check_portable_build.py: no-OpenMP/no-AVX2 build runs; a compiler failing on the
#               kernels, or not running at all, still installs, with the reason recorded
#   cuda        scripts/cuda_ci.sh check: build gptfast._C_cuda (sm_90) against CUDA torch, import it
#               without a GPU, registrations, fakes, SASS (16-byte loads, registers, spills)
#   tests       pytest -n 2 tests (and the kernels' tests again on the AVX2 build where an AVX-512
#               build of the CPU kernels exists and was used)
# GPTFAST_CUDA_CI=0 skips the CUDA steps (default: run them where nvcc is found).
set -euo pipefail
cd "$(dirname "$0")/.."

START=$(date +%s)
took() { echo "test.sh: $1 took $(( $(date +%s) - $2 ))s (total $(( $(date +%s) - START ))s)"; }

CUDA_CI=${GPTFAST_CUDA_CI:-auto}
if [ "$CUDA_CI" = auto ]; then
    if command -v nvcc >/dev/null 2>&1; then CUDA_CI=1; else CUDA_CI=0; echo "test.sh: no nvcc: CUDA steps skipped"; fi
fi
CUDA_VENV_LOG=$(mktemp /tmp/gptfast_cuda_venv.XXXXXX.log)
if [ "$CUDA_CI" = 1 ]; then
    T_CUDA_VENV=$(date +%s)
    bash scripts/cuda_ci.sh venv > "$CUDA_VENV_LOG" 2>&1 &
    CUDA_VENV_PID=$!
fi

T=$(date +%s)
VENV=${GPTFAST_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"

# torch first and pinned: on the CPU CI machine this is the local CPU wheel, never a CUDA build.
python -m pip install -q --disable-pip-version-check "torch==${GPTFAST_TORCH_VERSION:-2.13.0}"
python -m pip install -q --disable-pip-version-check setuptools wheel ninja pytest pytest-benchmark pytest-xdist \
    hypothesis pandas psutil tokenizers triton tiktoken numpy matplotlib tqdm safetensors
# The reference package is the oracle; its own dependency list is heavy and not needed at import.
python -m pip install -q --disable-pip-version-check --no-deps "llms-from-scratch==1.0.19"
# Build the extensions (the CPU one; the CUDA one only where CUDA torch and nvcc exist).
MAX_JOBS=${MAX_JOBS:-2} python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
took "venv+build" "$T"

T=$(date +%s)
python scripts/check_portable_build.py
took "portable builds" "$T"

if [ "$CUDA_CI" = 1 ]; then
    if ! wait "$CUDA_VENV_PID"; then
        cat "$CUDA_VENV_LOG"
        echo "test.sh: creating the CUDA venv failed (GPTFAST_CUDA_CI=0 skips the CUDA steps)" >&2
        exit 1
    fi
    cat "$CUDA_VENV_LOG"
    took "cuda venv (in the background)" "$T_CUDA_VENV"
    T=$(date +%s)
    bash scripts/cuda_ci.sh check
    took "cuda build+checks" "$T"
fi
rm -f "$CUDA_VENV_LOG"

T=$(date +%s)
python -m pytest -q -n 2 tests "$@"
took "tests" "$T"

# Where the CPU kernels also have an AVX-512 build, the run above used it: run the kernels' tests
# once more on the AVX2 build, which a process loads when torch reports an AVX2 CPU.
if python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('gptfast._C_cpu_avx512') is None)"; then
    T=$(date +%s)
    ATEN_CPU_CAPABILITY=avx2 python -m pytest -q -n 2 tests/test_attention.py tests/test_cross_entropy.py \
        tests/test_layer_norm.py tests/test_rms_norm.py tests/test_gelu.py tests/test_dropout.py tests/test_rope.py \
        tests/test_swiglu.py tests/test_decode_linear.py tests/test_sampling.py tests/test_planned_decode.py
    took "kernel tests on the AVX2 build" "$T"
    # On a CPU with AMX the AVX-512 build multiplies bf16 decode rows with tile products: run the decode
    # kernels' tests once more with them off, on its AVX512-BF16 dot-product and one-row paths.
    T=$(date +%s)
    GPTFAST_CPU_AMX=0 python -m pytest -q -n 2 tests/test_decode_linear.py tests/test_planned_decode.py
    took "decode kernel tests without AMX" "$T"
fi
