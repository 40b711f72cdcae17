#!/usr/bin/env bash
# Quick CUDA compile check without a GPU or CUDA torch: every csrc/cuda/*.cu compiled for sm_90 with
# setup.py's nvcc flags, and its machine code checked (16-byte loads, registers, no local memory).
# CI goes further (scripts/cuda_ci.sh: the whole extension, bindings included, built against CUDA
# torch, imported and checked); this stays as the fast loop while editing kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" scripts/check_sass.py "$@"
