// Checks shared by the torch bindings of the CUDA kernels (ops_loss_sampling.cpp, ops_layers.cpp).
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include "loss_sampling_launch.h"  // FloatType

namespace gptfast {

// The kernels' element type of ``t``; a TypeError naming ``name`` for any other dtype.
inline FloatType float_type(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return FloatType::kFloat32;
    case at::kHalf:
      return FloatType::kFloat16;
    case at::kBFloat16:
      return FloatType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, name, " must be float32, float16 or bfloat16 for the gptfast CUDA kernels, got ",
                       t.scalar_type());
  }
}

// A launch's status as a RuntimeError naming ``what``.
inline void check_launch(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, "gptfast CUDA ", what, " launch failed: ", cudaGetErrorString(status));
}

}  // namespace gptfast
