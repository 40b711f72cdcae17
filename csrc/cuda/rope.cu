// Rotate-half rotary embedding, forward and backward: one thread per (row, j < D/2) pair,
// rows = (b, h, t) of a (B, H, T, D) input read through its strides, a contiguous output.
// With c = cos[p], s = sin[p] (float32 tables), h = D / 2:
//   forward   y[j] = x[j] c[j] - x[j+h] s[j],     y[j+h] = x[j+h] c[j+h] + x[j] s[j+h]
//   backward  dx[j] = g[j] c[j] + g[j+h] s[j+h],  dx[j+h] = g[j+h] c[j+h] - g[j] s[j]
// A position outside the tables is never used as an index: that row's output is NaN.
#include "common.cuh"
#include "layer_ops_launch.h"

namespace gptfast {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    rope_kernel(const T* x, int64_t H, int64_t T_len, int64_t half, int64_t sb, int64_t sh, int64_t st,
                const float* cos, const float* sin, int64_t table_rows, const int64_t* positions, int64_t offset,
                bool backward, int64_t total, T* out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t j = i % half, row = i / half;
    const int64_t t = row % T_len, h = (row / T_len) % H, b = row / (T_len * H);
    const int64_t p = positions != nullptr ? positions[b * T_len + t] : offset + t;
    T* dst = out + row * 2 * half;
    if (p < 0 || p >= table_rows) {
      const float nan = __int_as_float(0x7fffffff);
      dst[j] = from_float<T>(nan);
      dst[j + half] = from_float<T>(nan);
      continue;
    }
    const T* src = x + b * sb + h * sh + t * st;
    const float x1 = to_float(src[j]), x2 = to_float(src[j + half]);
    const float* c = cos + p * 2 * half;
    const float* s = sin + p * 2 * half;
    float y1, y2;
    if (backward) {
      y1 = x1 * c[j] + x2 * s[j + half];
      y2 = x2 * c[j + half] - x1 * s[j];
    } else {
      y1 = x1 * c[j] - x2 * s[j];
      y2 = x2 * c[j + half] + x1 * s[j + half];
    }
    dst[j] = from_float<T>(y1);
    dst[j + half] = from_float<T>(y2);
  }
}

template <typename T>
cudaError_t rope_typed(const void* x, int64_t B, int64_t H, int64_t T_len, int64_t D, int64_t sb, int64_t sh,
                       int64_t st, const float* cos, const float* sin, int64_t table_rows, const int64_t* positions,
                       int64_t offset, bool backward, void* out, cudaStream_t stream) {
  const int64_t total = B * H * T_len * (D / 2);
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  const unsigned grid = static_cast<unsigned>(blocks < 65535 * 8 ? blocks : 65535 * 8);
  rope_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(x), H, T_len, D / 2, sb, sh, st, cos, sin,
                                                table_rows, positions, offset, backward, total, static_cast<T*>(out));
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_rope(const void* x, FloatType dtype, int64_t B, int64_t H, int64_t T, int64_t D, int64_t sb,
                        int64_t sh, int64_t st, const float* cos, const float* sin, int64_t table_rows,
                        const int64_t* positions, int64_t offset, bool backward, void* out, cudaStream_t stream) {
  if (B <= 0 || H <= 0 || T <= 0) return cudaSuccess;
  if (D <= 0 || D % 2 != 0) return cudaErrorInvalidValue;
  return with_element_type(dtype, [&](auto t) {
    return rope_typed<decltype(t)>(x, B, H, T, D, sb, sh, st, cos, sin, table_rows, positions, offset, backward, out,
                               stream);
  });
}

}  // namespace gptfast
