// GPT-2's tanh GELU, 0.5 x (1 + tanh(b (x + k x^3))), forward and backward: elementwise,
// grid-stride, float32 math, one rounding to the input's dtype.  0.5 (1 + tanh(u)) is sigmoid(2u),
// so with s = 1 / (1 + exp(-2u)):
//   out = x / (1 + exp(-2u)),   dx = grad * (s + x * s (1 - s) * 2b (1 + 3k x^2)).
// The build's --use_fast_math makes expf the fast exp2-based one; its limits stay exact, so
// gelu(+inf) = +inf, gelu(-inf) = NaN as in the book's formula, and a large negative x gives zero.
// The backward caps x^2 at 400 inside the polynomial: past |x| = 20, s (1 - s) is exactly 0, and
// the cap keeps the product finite (limit 1 or 0, no 0 * inf).  b is sqrt(2/pi) at the book's
// float32 value, which the host code takes from torch and passes in (its last bit depends on the
// machine, see csrc/book_constants.h).
#include "common.cuh"
#include "layer_ops_launch.h"

namespace gptfast {
namespace {

constexpr int kThreads = 256;
constexpr float kKappa = 0.044715f;
constexpr float kSquareCap = 400.0f;

// The polynomial's coefficients for a given b, in float as the kernels use them.
struct Coefficients {
  float minus_two_b, minus_two_bk, two_b, six_bk;
};

Coefficients coefficients_for(float beta) {
  return {-2.0f * beta, -2.0f * beta * kKappa, 2.0f * beta, 6.0f * beta * kKappa};
}

__device__ __forceinline__ float minus_two_u(float x, float x2, const Coefficients& c) {
  return x * (c.minus_two_b + c.minus_two_bk * x2);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) gelu_fwd_kernel(const T* x_in, int64_t n, Coefficients c, T* out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const float x = to_float(x_in[i]);
    out[i] = from_float<T>(x / (1.0f + expf(minus_two_u(x, x * x, c))));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) gelu_bwd_kernel(const T* grad, const T* x_in, int64_t n, Coefficients c,
                                                               T* dx) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const float g = to_float(grad[i]), x = to_float(x_in[i]), x2 = x * x;
    const float s = 1.0f / (1.0f + expf(minus_two_u(x, x2, c)));
    const float slope = c.two_b + c.six_bk * fminf(x2, kSquareCap);
    dx[i] = from_float<T>(g * (s + x * (slope * s * (1.0f - s))));
  }
}

unsigned grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65535 * 8 ? blocks : 65535 * 8);
}

template <typename T>
cudaError_t fwd_typed(const void* x, int64_t n, float beta, void* out, cudaStream_t stream) {
  gelu_fwd_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(static_cast<const T*>(x), n, coefficients_for(beta),
                                                          static_cast<T*>(out));
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd_typed(const void* grad, const void* x, int64_t n, float beta, void* dx, cudaStream_t stream) {
  gelu_bwd_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(static_cast<const T*>(grad), static_cast<const T*>(x), n,
                                                          coefficients_for(beta), static_cast<T*>(dx));
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_gelu_fwd(const void* x, FloatType dtype, int64_t n, float beta, void* out, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  return with_element_type(dtype, [&](auto t) { return fwd_typed<decltype(t)>(x, n, beta, out, stream); });
}

cudaError_t launch_gelu_bwd(const void* grad, const void* x, FloatType dtype, int64_t n, float beta, void* dx,
                            cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  return with_element_type(dtype, [&](auto t) { return bwd_typed<decltype(t)>(grad, x, n, beta, dx, stream); });
}

}  // namespace gptfast
