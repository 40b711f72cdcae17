#!/usr/bin/env bash
# Set up a virtual environment (once), build gptfast, compile-check the CUDA sources and run the tests.
# Works from a fresh clone with no network but the package registries; reruns reuse .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${GPTFAST_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"

# torch first and pinned: on the CPU CI machine this is the local CPU wheel, never a CUDA build.
python -m pip install -q --disable-pip-version-check "torch==${GPTFAST_TORCH_VERSION:-2.13.0}"
python -m pip install -q --disable-pip-version-check setuptools wheel ninja pytest pytest-benchmark pytest-xdist \
    triton tiktoken numpy matplotlib tqdm safetensors
# The reference package is the oracle; its own dependency list is heavy and not needed at import.
python -m pip install -q --disable-pip-version-check --no-deps "llms-from-scratch==1.0.19"
# Build the extensions (the CPU one always; the CUDA one only where CUDA torch and nvcc exist).
MAX_JOBS=${MAX_JOBS:-2} python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .

# Every .cu must compile for sm_90 even where nothing can run it.
if [ -f .ci/check_cuda_compile.sh ] && command -v nvcc >/dev/null 2>&1; then
    bash .ci/check_cuda_compile.sh
fi

python -m pytest -q -n 2 tests "$@"
