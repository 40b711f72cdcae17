#!/usr/bin/env bash
# CI without a GPU for the whole CUDA extension: compile, link, import, registrations, fakes, SASS.
#
#   bash scripts/cuda_ci.sh venv     # create the CUDA venv (torch 2.14.1 CUDA build, from the local disk)
#   bash scripts/cuda_ci.sh check    # build gptfast._C_cuda into it (sm_90) and run the checks
#
# The CUDA torch lives in its own venv ($GPTFAST_CUDA_VENV, default .venv-cuda), never in the
# test venv.  gptfast is installed there non-editable (built in a temporary folder), so no
# extension built against this torch lands in the source tree the test venv imports from.
# Checks: scripts/check_cuda_extension.py (imports without a GPU, every op has a CUDA kernel and
# a fake that allocates like the kernel, backend_status says "no CUDA device") and
# scripts/check_sass.py on the built library (16-byte loads, registers, no local memory).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=$(realpath -m "${GPTFAST_CUDA_VENV:-.venv-cuda}")
TORCH_CUDA=${GPTFAST_CUDA_TORCH_VERSION:-2.14.1}
PY="$VENV/bin/python"

stamp() { date +%s; }

make_venv() {
    local t0; t0=$(stamp)
    [ -x "$PY" ] || python3 -m venv "$VENV"
    "$PY" -m pip install -q --disable-pip-version-check "torch==$TORCH_CUDA" setuptools wheel ninja numpy tiktoken \
        2> >(grep -v "^WARNING: Location" >&2)
    "$PY" -c 'import torch; assert torch.version.cuda, torch.__version__; print("cuda_ci: venv", torch.__version__, "CUDA", torch.version.cuda)'
    echo "cuda_ci: venv ready in $(( $(stamp) - t0 ))s"
}

check() {
    local t0 t1; t0=$(stamp)
    local build; build=$(mktemp -d /tmp/gptfast_cuda_build.XXXXXX)
    trap 'rm -rf "$build"' RETURN
    # A copy of the sources: the build never touches the checkout's gptfast/ (the test venv's).
    git ls-files -z --cached --others --exclude-standard | grep -zv '^\.venv' | xargs -0 cp --parents -t "$build"
    (cd "$build" && MAX_JOBS=${MAX_JOBS:-2} TORCH_CUDA_ARCH_LIST=9.0 GPTFAST_BUILD_CPU=0 GPTFAST_BUILD_CUDA=1 \
        "$PY" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps --force-reinstall . \
        2> >(grep -v "^WARNING: Location" >&2))
    t1=$(stamp)
    echo "cuda_ci: built gptfast._C_cuda (sm_90) in $(( t1 - t0 ))s"
    # (from / so that the checkout's gptfast/, which has no _C_cuda, is not the one found)
    local so; so=$(cd / && "$PY" -c 'import importlib.util as u; print(u.find_spec("gptfast._C_cuda").origin)')
    # A script's own folder (scripts/) leads sys.path, not the checkout: gptfast comes from the venv.
    "$PY" scripts/check_cuda_extension.py
    "$PY" scripts/check_sass.py --binary "$so"
    echo "cuda_ci: checks done in $(( $(stamp) - t1 ))s"
}

case "${1:-all}" in
    venv) make_venv ;;
    check) check ;;
    all) make_venv; check ;;
    *) echo "usage: $0 [venv|check|all]" >&2; exit 2 ;;
esac
