// RMSNorm forward and backward.
//
// Forward: one thread block per row.  The block sums the row's squares (float32), every
// thread gets rstd, then writes x * rstd * weight rounded once to x's dtype.
//
// Backward: a fixed number of blocks (a function of the row count only) each take rows
// r = block, block + grid, ...; per row the block reduces dot = sum(grad * weight * xhat),
// writes dx = rstd * (grad * weight - xhat * dot / dim) and adds grad * xhat into its own
// float32 row of `partial`.  Column j of a block's partial row is always handled by the same
// thread, so no atomics are needed; a second kernel sums the partial rows in block order.
// The result is deterministic.
#include "common.cuh"
#include "layer_ops_launch.h"

namespace gptfast {
namespace {

constexpr int kMaxBwdBlocks = 512;

template <typename T, int BLOCK>
__global__ void __launch_bounds__(BLOCK)
    rms_norm_fwd_kernel(const T* x, const float* weight, int64_t dim, float eps, T* out, float* rstd) {
  __shared__ float scratch[BLOCK / kWarpSize];
  const int64_t r = blockIdx.x;
  const T* row = x + r * dim;
  float ss = 0.0f;
  for (int64_t j = threadIdx.x; j < dim; j += BLOCK) {
    const float v = to_float(row[j]);
    ss += v * v;
  }
  const float rs = 1.0f / sqrtf(block_sum<BLOCK>(ss, scratch) / static_cast<float>(dim) + eps);
  if (threadIdx.x == 0) rstd[r] = rs;
  T* out_row = out + r * dim;
  for (int64_t j = threadIdx.x; j < dim; j += BLOCK) out_row[j] = from_float<T>((to_float(row[j]) * rs) * weight[j]);
}

template <typename T, int BLOCK>
__global__ void __launch_bounds__(BLOCK)
    rms_norm_bwd_kernel(const T* grad, const T* x, const float* weight, const float* rstd, int64_t rows, int64_t dim,
                        T* dx, float* partial) {
  __shared__ float scratch[BLOCK / kWarpSize];
  float* part = partial + static_cast<int64_t>(blockIdx.x) * dim;
  for (int64_t j = threadIdx.x; j < dim; j += BLOCK) part[j] = 0.0f;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * dim;
    const T* gr = grad + r * dim;
    const float rs = rstd[r];
    float dot = 0.0f;
    for (int64_t j = threadIdx.x; j < dim; j += BLOCK) {
      const float gxh = to_float(gr[j]) * (to_float(xr[j]) * rs);
      dot += gxh * weight[j];
      part[j] += gxh;
    }
    const float c = block_sum<BLOCK>(dot, scratch) / static_cast<float>(dim);
    T* dxr = dx + r * dim;
    for (int64_t j = threadIdx.x; j < dim; j += BLOCK) {
      const float xh = to_float(xr[j]) * rs;
      dxr[j] = from_float<T>(rs * (to_float(gr[j]) * weight[j] - xh * c));
    }
  }
}

template <typename W>
__global__ void __launch_bounds__(256)
    sum_partials_kernel(const float* partial, int64_t blocks, int64_t dim, W* dweight) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  if (j >= dim) return;
  float s = 0.0f;
  for (int64_t b = 0; b < blocks; ++b) s += partial[b * dim + j];
  dweight[j] = from_float<W>(s);
}

template <typename T, int BLOCK>
cudaError_t fwd_block(const void* x, const float* weight, int64_t rows, int64_t dim, float eps, void* out,
                      float* rstd, cudaStream_t stream) {
  rms_norm_fwd_kernel<T, BLOCK><<<static_cast<unsigned>(rows), BLOCK, 0, stream>>>(
      static_cast<const T*>(x), weight, dim, eps, static_cast<T*>(out), rstd);
  return cudaGetLastError();
}

template <typename T>
cudaError_t fwd_typed(const void* x, const float* weight, int64_t rows, int64_t dim, float eps, void* out,
                      float* rstd, cudaStream_t stream) {
  if (dim <= 512) return fwd_block<T, 128>(x, weight, rows, dim, eps, out, rstd, stream);
  if (dim <= 4096) return fwd_block<T, 256>(x, weight, rows, dim, eps, out, rstd, stream);
  return fwd_block<T, 512>(x, weight, rows, dim, eps, out, rstd, stream);
}

template <typename T>
cudaError_t bwd_typed(const void* grad, const void* x, const float* weight, const float* rstd, int64_t rows,
                      int64_t dim, void* dx, float* partial, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(rms_norm_bwd_blocks(rows));
  rms_norm_bwd_kernel<T, 256><<<blocks, 256, 0, stream>>>(static_cast<const T*>(grad), static_cast<const T*>(x),
                                                          weight, rstd, rows, dim, static_cast<T*>(dx), partial);
  return cudaGetLastError();
}

template <typename W>
cudaError_t sum_typed(const float* partial, int64_t blocks, int64_t dim, void* dweight, cudaStream_t stream) {
  sum_partials_kernel<W><<<static_cast<unsigned>((dim + 255) / 256), 256, 0, stream>>>(partial, blocks, dim,
                                                                                     static_cast<W*>(dweight));
  return cudaGetLastError();
}

}  // namespace

int64_t rms_norm_bwd_blocks(int64_t rows) { return rows < kMaxBwdBlocks ? (rows > 0 ? rows : 1) : kMaxBwdBlocks; }

cudaError_t launch_rms_norm_fwd(const void* x, FloatType dtype, const float* weight, int64_t rows, int64_t dim,
                                float eps, void* out, float* rstd, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  if (rows > 0x7fffffffLL || dim <= 0) return cudaErrorInvalidValue;
  return with_element_type(dtype, [&](auto t) {
    return fwd_typed<decltype(t)>(x, weight, rows, dim, eps, out, rstd, stream);
  });
}

cudaError_t launch_rms_norm_bwd(const void* grad, const void* x, FloatType dtype, const float* weight,
                                const float* rstd, int64_t rows, int64_t dim, void* dx, float* partial,
                                void* dweight, FloatType weight_dtype, cudaStream_t stream) {
  if (dim <= 0) return cudaErrorInvalidValue;
  if (rows > 0) {
    const cudaError_t status = with_element_type(dtype, [&](auto t) {
      return bwd_typed<decltype(t)>(grad, x, weight, rstd, rows, dim, dx, partial, stream);
    });
    if (status != cudaSuccess) return status;
  }
  const int64_t blocks = rows > 0 ? rms_norm_bwd_blocks(rows) : 0;
  return with_element_type(weight_dtype, [&](auto t) {
    return sum_typed<decltype(t)>(partial, blocks, dim, dweight, stream);
  });
}

}  // namespace gptfast
