#!/usr/bin/env bash
# Compile check of the CUDA sources without a GPU (or CUDA torch):
#   * every csrc/cuda/*.cu with plain `nvcc -arch=sm_90 -std=c++17 -O3 -c` (no torch headers allowed);
#   * every csrc/cuda/*.cpp binding with `g++ -fsyntax-only` against the installed torch's headers.
# Files are compiled one after another; the first failure names the file and exits non-zero.
# NVCC (default /usr/local/bin/nvcc, else nvcc on PATH) and PYTHON (default python) may be overridden.
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC="${NVCC:-/usr/local/bin/nvcc}"
[ -x "$NVCC" ] || NVCC="$(command -v nvcc || true)"
if [ -z "$NVCC" ]; then
  echo "check_cuda_compile: nvcc not found (set NVCC=...)" >&2
  exit 1
fi
PYTHON="${PYTHON:-python}"
# CUDA headers for the host compiler (nvcc may be a wrapper script outside the toolkit).
CUDA_INCLUDE=""
for dir in "${CUDA_HOME:-}/include" "$(dirname "$(dirname "$(readlink -f "$NVCC")")")/include" /usr/local/cuda/include; do
  if [ -f "$dir/cuda_runtime.h" ]; then CUDA_INCLUDE="$dir"; break; fi
done
OUT="$(mktemp -d /tmp/gptfast_cuda_check.XXXXXX)"
trap 'rm -rf "$OUT"' EXIT

shopt -s nullglob
cu_files=(csrc/cuda/*.cu)
cpp_files=(csrc/cuda/*.cpp)

for src in "${cu_files[@]}"; do
  echo "nvcc  $src"
  if ! "$NVCC" -arch=sm_90 -std=c++17 -O3 -c -o "$OUT/$(basename "$src").o" "$src"; then
    echo "check_cuda_compile: FAILED to compile $src" >&2
    exit 1
  fi
done

# The binding needs torch's C++ headers.  CPU wheels ship the CUDA headers except the one
# cmake generates (c10/cuda/impl/cuda_cmake_macros.h); a one-line stand-in suffices for a
# syntax check.
if ! includes="$("$PYTHON" -c 'import sysconfig, torch.utils.cpp_extension as c; print(" ".join("-I" + p for p in c.include_paths() + [sysconfig.get_paths()["include"]]))' 2>/dev/null)"; then
  echo "check_cuda_compile: NOTE: torch is not importable with $PYTHON; skipped the .cpp syntax check"
  echo "check_cuda_compile: ${#cu_files[@]} .cu files OK"
  exit 0
fi
torch_include="$("$PYTHON" -c 'import torch.utils.cpp_extension as c; print(c.include_paths()[0])')"
if [ ! -f "$torch_include/c10/cuda/impl/cuda_cmake_macros.h" ]; then
  mkdir -p "$OUT/stub/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$OUT/stub/c10/cuda/impl/cuda_cmake_macros.h"
  includes="$includes -I$OUT/stub"
fi
if [ ! -f "$torch_include/ATen/cuda/CUDAGeneratorImpl.h" ]; then
  echo "check_cuda_compile: NOTE: this torch has no ATen/cuda headers; skipped the .cpp syntax check"
  echo "check_cuda_compile: ${#cu_files[@]} .cu files OK"
  exit 0
fi
if [ -z "$CUDA_INCLUDE" ]; then
  echo "check_cuda_compile: NOTE: cuda_runtime.h not found (set CUDA_HOME); skipped the .cpp syntax check"
  echo "check_cuda_compile: ${#cu_files[@]} .cu files OK"
  exit 0
fi
for src in "${cpp_files[@]}"; do
  echo "g++   $src (syntax only)"
  # shellcheck disable=SC2086  # $includes is a list of flags
  if ! g++ -std=c++17 -fsyntax-only -Wno-c++20-extensions $includes -I"$CUDA_INCLUDE" -Icsrc/cuda "$src"; then
    echo "check_cuda_compile: FAILED syntax check of $src" >&2
    exit 1
  fi
done
echo "check_cuda_compile: ${#cu_files[@]} .cu and ${#cpp_files[@]} .cpp files OK"
