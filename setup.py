"""Build gptfast's extensions.

* ``gptfast._C_cpu``: every ``csrc/cpu/*.cpp``, always built (any C++17 compiler).
* ``gptfast._C_cuda``: every ``csrc/cuda/*.cu`` plus its ``*.cpp`` bindings, built only
  where torch has CUDA and nvcc is found.  ``GPTFAST_BUILD_CUDA=1`` forces it (fail
  loudly if impossible), ``=0`` skips it.  ``TORCH_CUDA_ARCH_LIST`` is respected.
* ``csrc/triton`` is installed as the pure-Python package ``gptfast.triton_kernels``.

Build with ``pip install --no-build-isolation -e .`` after installing torch.
"""

import glob
import os
import platform

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _want_cuda(cuda_home):
    import torch

    flag = os.environ.get("GPTFAST_BUILD_CUDA", "auto").lower()
    possible = torch.version.cuda is not None and cuda_home is not None
    if flag in ("0", "false", "no"):
        return False
    if flag in ("1", "true", "yes"):
        if not possible:
            raise RuntimeError("GPTFAST_BUILD_CUDA=1 but torch has no CUDA or nvcc (CUDA_HOME) was not found")
        return True
    return possible


def extensions():
    try:
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # metadata-only invocations (sdist) without torch
        return [], {}
    exts = []
    cpu_sources = _sources("csrc/cpu/*.cpp")
    if cpu_sources:
        # The kernels use 256-bit vectors on x86-64; the backend refuses to load on CPUs without AVX2.
        x86_flags = ["-mavx2", "-mfma", "-mf16c"] if platform.machine().lower() in ("x86_64", "amd64") else []
        exts.append(CppExtension(
            "gptfast._C_cpu", cpu_sources,
            extra_compile_args={"cxx": ["-O3", "-std=c++17", "-fopenmp", *x86_flags]},
            extra_link_args=["-fopenmp"],
        ))
    cuda_sources = _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
    if cuda_sources and _want_cuda(CUDA_HOME):
        exts.append(CUDAExtension(
            "gptfast._C_cuda", cuda_sources,
            extra_compile_args={
                "cxx": ["-O3", "-std=c++17"],
                # fast-math only changes exp/div rounding, which the kernels' fp32 accumulation tolerates.
                "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"],
            },
        ))
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    packages=["gptfast", "gptfast.ops", "gptfast.models", "gptfast.generation", "gptfast.training", "gptfast.kv_cache",
              "gptfast.finetuning", "gptfast.embedded", "gptfast.triton_kernels"],
    package_dir={"gptfast.embedded": "data", "gptfast.triton_kernels": "csrc/triton"},
    package_data={"gptfast.embedded": ["*.txt", "*.tiktoken"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
