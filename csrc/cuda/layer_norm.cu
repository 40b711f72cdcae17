// LayerNorm forward and backward.
//
// Forward: one thread block per row.  The block sums the row (float32) for the mean (corrected by the mean deviation
// from it), then the squared deviations from it for the biased variance (steadier than sum(x^2) - mean^2), every thread
// gets mean and rstd, then writes (x - mean) * rstd * weight + bias rounded once to x's dtype.
//
// Backward: a fixed number of blocks (a function of the row count only) each take rows
// r = block, block + grid, ...; per row the block reduces sum(gw) and sum(gw * xhat) with
// gw = grad * weight, writes dx = rstd * (gw - mean(gw) - xhat * mean(gw * xhat)) and adds
// grad * xhat and grad into its own float32 rows of `partial`.  Column j of a block's partial
// rows is always handled by the same thread, so no atomics are needed; a second kernel sums the
// partial rows in block order.  The result is deterministic.
#include "common.cuh"
#include "layer_ops_launch.h"

namespace gptfast {
namespace {

constexpr int kMaxBwdBlocks = 512;

template <typename T, int BLOCK>
__global__ void __launch_bounds__(BLOCK)
    layer_norm_fwd_kernel(const T* x, const float* weight, const float* bias, int64_t dim, float eps, T* out,
                          float* mean, float* rstd) {
  __shared__ float scratch[BLOCK / kWarpSize];
  const int64_t r = blockIdx.x;
  const T* row = x + r * dim;
  float s = 0.0f;
  for (int64_t j = threadIdx.x; j < dim; j += BLOCK) s += to_float(row[j]);
  const float mu0 = block_sum<BLOCK>(s, scratch) / static_cast<float>(dim);
  // Corrected by the mean deviation from it: an ulp off, mu0 would be the whole deviation of a constant row far
  // from 0 (xhat +-1 instead of 0).
  float sd = 0.0f;
  for (int64_t j = threadIdx.x; j < dim; j += BLOCK) sd += to_float(row[j]) - mu0;
  const float mu = mu0 + block_sum<BLOCK>(sd, scratch) / static_cast<float>(dim);
  float ss = 0.0f;
  for (int64_t j = threadIdx.x; j < dim; j += BLOCK) {
    const float d = to_float(row[j]) - mu;
    ss += d * d;
  }
  const float rs = 1.0f / sqrtf(block_sum<BLOCK>(ss, scratch) / static_cast<float>(dim) + eps);
  if (threadIdx.x == 0) {
    mean[r] = mu;
    rstd[r] = rs;
  }
  T* out_row = out + r * dim;
  for (int64_t j = threadIdx.x; j < dim; j += BLOCK)
    out_row[j] = from_float<T>(((to_float(row[j]) - mu) * rs) * weight[j] + bias[j]);
}

template <typename T, int BLOCK>
__global__ void __launch_bounds__(BLOCK)
    layer_norm_bwd_kernel(const T* grad, const T* x, const float* weight, const float* mean, const float* rstd,
                          int64_t rows, int64_t dim, T* dx, float* partial) {
  __shared__ float scratch[BLOCK / kWarpSize];
  float* part_w = partial + static_cast<int64_t>(blockIdx.x) * 2 * dim;
  float* part_b = part_w + dim;
  for (int64_t j = threadIdx.x; j < dim; j += BLOCK) part_w[j] = part_b[j] = 0.0f;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * dim;
    const T* gr = grad + r * dim;
    const float mu = mean[r], rs = rstd[r];
    float s_gw = 0.0f, s_gwxh = 0.0f;
    for (int64_t j = threadIdx.x; j < dim; j += BLOCK) {
      const float g = to_float(gr[j]);
      const float xh = (to_float(xr[j]) - mu) * rs;
      const float gw = g * weight[j];
      s_gw += gw;
      s_gwxh += gw * xh;
      part_w[j] += g * xh;
      part_b[j] += g;
    }
    const float c1 = block_sum<BLOCK>(s_gw, scratch) / static_cast<float>(dim);
    const float c2 = block_sum<BLOCK>(s_gwxh, scratch) / static_cast<float>(dim);
    T* dxr = dx + r * dim;
    for (int64_t j = threadIdx.x; j < dim; j += BLOCK) {
      const float xh = (to_float(xr[j]) - mu) * rs;
      dxr[j] = from_float<T>(rs * (to_float(gr[j]) * weight[j] - c1 - xh * c2));
    }
  }
}

// dweight[j], dbias[j]: column j of the blocks' partial rows, added in block order.
__global__ void __launch_bounds__(256)
    sum_partials_kernel(const float* partial, int64_t blocks, int64_t dim, float* dweight, float* dbias) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  if (j >= dim) return;
  float sw = 0.0f, sb = 0.0f;
  for (int64_t b = 0; b < blocks; ++b) {
    sw += partial[2 * b * dim + j];
    sb += partial[(2 * b + 1) * dim + j];
  }
  dweight[j] = sw;
  dbias[j] = sb;
}

template <typename T, int BLOCK>
cudaError_t fwd_block(const void* x, const float* weight, const float* bias, int64_t rows, int64_t dim, float eps,
                      void* out, float* mean, float* rstd, cudaStream_t stream) {
  layer_norm_fwd_kernel<T, BLOCK><<<static_cast<unsigned>(rows), BLOCK, 0, stream>>>(
      static_cast<const T*>(x), weight, bias, dim, eps, static_cast<T*>(out), mean, rstd);
  return cudaGetLastError();
}

template <typename T>
cudaError_t fwd_typed(const void* x, const float* weight, const float* bias, int64_t rows, int64_t dim, float eps,
                      void* out, float* mean, float* rstd, cudaStream_t stream) {
  if (dim <= 512) return fwd_block<T, 128>(x, weight, bias, rows, dim, eps, out, mean, rstd, stream);
  if (dim <= 4096) return fwd_block<T, 256>(x, weight, bias, rows, dim, eps, out, mean, rstd, stream);
  return fwd_block<T, 512>(x, weight, bias, rows, dim, eps, out, mean, rstd, stream);
}

template <typename T>
cudaError_t bwd_typed(const void* grad, const void* x, const float* weight, const float* mean, const float* rstd,
                      int64_t rows, int64_t dim, void* dx, float* partial, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(layer_norm_bwd_blocks(rows));
  layer_norm_bwd_kernel<T, 256><<<blocks, 256, 0, stream>>>(static_cast<const T*>(grad), static_cast<const T*>(x),
                                                            weight, mean, rstd, rows, dim, static_cast<T*>(dx),
                                                            partial);
  return cudaGetLastError();
}

}  // namespace

int64_t layer_norm_bwd_blocks(int64_t rows) { return rows < kMaxBwdBlocks ? (rows > 0 ? rows : 1) : kMaxBwdBlocks; }

cudaError_t launch_layer_norm_fwd(const void* x, FloatType dtype, const float* weight, const float* bias,
                                  int64_t rows, int64_t dim, float eps, void* out, float* mean, float* rstd,
                                  cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  if (rows > 0x7fffffffLL || dim <= 0) return cudaErrorInvalidValue;
  return with_element_type(dtype, [&](auto t) {
    return fwd_typed<decltype(t)>(x, weight, bias, rows, dim, eps, out, mean, rstd, stream);
  });
}

cudaError_t launch_layer_norm_bwd(const void* grad, const void* x, FloatType dtype, const float* weight,
                                  const float* mean, const float* rstd, int64_t rows, int64_t dim, void* dx,
                                  float* partial, float* dweight, float* dbias, cudaStream_t stream) {
  if (dim <= 0) return cudaErrorInvalidValue;
  if (rows > 0) {
    const cudaError_t status = with_element_type(dtype, [&](auto t) {
      return bwd_typed<decltype(t)>(grad, x, weight, mean, rstd, rows, dim, dx, partial, stream);
    });
    if (status != cudaSuccess) return status;
  }
  const int64_t blocks = rows > 0 ? layer_norm_bwd_blocks(rows) : 0;
  sum_partials_kernel<<<static_cast<unsigned>((dim + 255) / 256), 256, 0, stream>>>(partial, blocks, dim, dweight,
                                                                                   dbias);
  return cudaGetLastError();
}

}  // namespace gptfast
