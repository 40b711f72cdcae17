// Dropout with the counter-based mask of csrc/dropout_hash.h (the same mask as the CPU and Triton
// kernels): out = x * keep / (1 - p) elementwise, grid-stride, float32 math, one rounding to x's
// dtype.  A dropped element is multiplied by 0 (NaN and inf give NaN, as in torch).  The seed is
// read from device memory, so drawing it from torch's generator needs no host synchronisation.
// The backward is the same kernel on grad_out with the forward's p and seed.
#include "../dropout_hash.h"
#include "common.cuh"
#include "layer_ops_launch.h"

namespace gptfast {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads) dropout_kernel(const T* x, int64_t n, const int64_t* seed,
                                                              uint64_t threshold, float scale, T* out) {
  const uint64_t key = static_cast<uint64_t>(*seed);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const float factor = gptfast_dropout::keeps(key, static_cast<uint64_t>(i), threshold) ? scale : 0.0f;
    out[i] = from_float<T>(to_float(x[i]) * factor);
  }
}

unsigned grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65535 * 8 ? blocks : 65535 * 8);
}

}  // namespace

cudaError_t launch_dropout(const void* x, FloatType dtype, int64_t n, const int64_t* seed, double p, void* out,
                           cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const uint64_t threshold = gptfast_dropout::draw_threshold(p);
  const float scale = static_cast<float>(gptfast_dropout::keep_scale(p));
  return with_element_type(dtype, [&](auto t) {
    using T = decltype(t);
    dropout_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(static_cast<const T*>(x), n, seed, threshold, scale,
                                                            static_cast<T*>(out));
    return cudaGetLastError();
  });
}

}  // namespace gptfast
