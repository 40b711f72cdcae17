// SwiGLU, silu(gate) * up, forward and backward: elementwise, grid-stride, float32 math,
// one rounding to the inputs' dtype.  With s = sigmoid(a) = 1 / (1 + exp(-a)):
//   out = a / (1 + exp(-a)) * b,  d gate = grad * b * s * (1 + a (1 - s)),  d up = grad * a * s.
// The build's --use_fast_math makes expf the fast exp2-based one; its limits stay exact (exp(-inf) = 0,
// exp(inf) = inf), so -inf gives s = 0 and +inf gives s = 1.  Fast division returns 0 for a divisor past
// 2^126: a gate below about -87 gives 0 where exact math gives a subnormal.
#include "common.cuh"
#include "layer_ops_launch.h"

namespace gptfast {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads) swiglu_fwd_kernel(const T* gate, const T* up, int64_t n, T* out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const float a = to_float(gate[i]);
    out[i] = from_float<T>(a / (1.0f + expf(-a)) * to_float(up[i]));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    swiglu_bwd_kernel(const T* grad, const T* gate, const T* up, int64_t n, T* d_gate, T* d_up) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const float g = to_float(grad[i]), a = to_float(gate[i]), b = to_float(up[i]);
    const float s = 1.0f / (1.0f + expf(-a));
    d_gate[i] = from_float<T>(g * b * s * (1.0f + a * (1.0f - s)));
    d_up[i] = from_float<T>(g * a * s);
  }
}

unsigned grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65535 * 8 ? blocks : 65535 * 8);
}

template <typename T>
cudaError_t fwd_typed(const void* gate, const void* up, int64_t n, void* out, cudaStream_t stream) {
  swiglu_fwd_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(static_cast<const T*>(gate), static_cast<const T*>(up),
                                                            n, static_cast<T*>(out));
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd_typed(const void* grad, const void* gate, const void* up, int64_t n, void* d_gate, void* d_up,
                      cudaStream_t stream) {
  swiglu_bwd_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(static_cast<const T*>(grad), static_cast<const T*>(gate),
                                                            static_cast<const T*>(up), n, static_cast<T*>(d_gate),
                                                            static_cast<T*>(d_up));
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_swiglu_fwd(const void* gate, const void* up, FloatType dtype, int64_t n, void* out,
                              cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  return with_element_type(dtype, [&](auto t) { return fwd_typed<decltype(t)>(gate, up, n, out, stream); });
}

cudaError_t launch_swiglu_bwd(const void* grad, const void* gate, const void* up, FloatType dtype, int64_t n,
                              void* d_gate, void* d_up, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  return with_element_type(dtype, [&](auto t) {
    return bwd_typed<decltype(t)>(grad, gate, up, n, d_gate, d_up, stream);
  });
}

}  // namespace gptfast
