// Few-row linear layer of decode steps: out = x @ weight.T (+ bias), x (M, K) with M small.
//
// The time is the time to stream the weight once, so each warp owns COLS output columns
// (weight rows) and walks K with 16-byte loads of those rows; for every loaded weight vector
// it reads the matching slice of all ROWS rows of x (tiny, L1/L2-resident) and accumulates
// COLS x ROWS float32 sums in registers.  A warp-shuffle reduction gives each sum to every
// lane; bias is added in float32 and the result rounded once to x's dtype.  ROWS is M
// rounded up to 1, 2, 4, 8 or 16; more than 16 rows take further row groups (grid.y), each
// streaming the weight again.  The 16-byte path needs 16-byte aligned x and weight rows
// (aligned base pointers and K a multiple of the vector width); otherwise the scalar kernel
// reads one element per lane per step.  Every index is bounds-checked: columns past N and
// rows past M are never read or written.
#include "common.cuh"
#include "layer_ops_launch.h"

namespace gptfast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int64_t kMaxGridY = 65535;

// Sums of this warp's tile (COLS columns from n0, ROWS rows from m0) written out by lane 0.
template <typename T, int ROWS, int COLS>
__device__ __forceinline__ void store_tile(float (&acc)[COLS][ROWS], const T* bias, int64_t N, int64_t n0,
                                           int ncols, int nrows, int lane, T* out) {
#pragma unroll
  for (int c = 0; c < COLS; ++c) {
    const float b = (bias != nullptr && c < ncols) ? to_float(bias[n0 + c]) : 0.0f;
#pragma unroll
    for (int m = 0; m < ROWS; ++m) {
      const float s = warp_sum(acc[c][m]);
      if (lane == 0 && c < ncols && m < nrows) out[m * N + n0 + c] = from_float<T>(s + b);
    }
  }
}

// 16-byte loads: K % Vec16<T>::kSize == 0 and x, weight 16-byte aligned (checked by the launcher).
template <typename T, int ROWS, int COLS>
__global__ void __launch_bounds__(kThreads)
    decode_linear_vec16_kernel(const T* x, const T* weight, const T* bias, int64_t M, int64_t N, int64_t K, T* out) {
  constexpr int kVec = Vec16<T>::kSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize) * COLS;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * ROWS;
  if (n0 >= N) return;  // a whole warp leaves: no block-wide barrier follows
  const int ncols = N - n0 < COLS ? static_cast<int>(N - n0) : COLS;
  const int nrows = M - m0 < ROWS ? static_cast<int>(M - m0) : ROWS;
  const int64_t chunks = K / kVec;
  const uint4* wrow[COLS];
#pragma unroll
  for (int c = 0; c < COLS; ++c)  // a column past N reads column n0 (in range); its sums are never stored
    wrow[c] = reinterpret_cast<const uint4*>(weight + (n0 + (c < ncols ? c : 0)) * K);
  const uint4* xrows = reinterpret_cast<const uint4*>(x + m0 * K);  // row m's chunk i: xrows[m * chunks + i]
  float acc[COLS][ROWS];
#pragma unroll
  for (int c = 0; c < COLS; ++c)
#pragma unroll
    for (int m = 0; m < ROWS; ++m) acc[c][m] = 0.0f;
  for (int64_t i = lane; i < chunks; i += kWarpSize) {
    float w[COLS][kVec];
#pragma unroll
    for (int c = 0; c < COLS; ++c) unpack16<T>(load16(wrow[c] + i), w[c]);
#pragma unroll
    for (int m = 0; m < ROWS; ++m) {
      if (m >= nrows) break;  // the same for the whole warp
      float xv[kVec];
      unpack16<T>(load16(xrows + m * chunks + i), xv);
#pragma unroll
      for (int c = 0; c < COLS; ++c)
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[c][m] = fmaf(w[c][e], xv[e], acc[c][m]);
    }
  }
  store_tile<T, ROWS, COLS>(acc, bias, N, n0, ncols, nrows, lane, out + m0 * N);
}

// Any alignment and K: one element per lane per step.
template <typename T, int ROWS, int COLS>
__global__ void __launch_bounds__(kThreads)
    decode_linear_scalar_kernel(const T* x, const T* weight, const T* bias, int64_t M, int64_t N, int64_t K, T* out) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize) * COLS;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * ROWS;
  if (n0 >= N) return;
  const int ncols = N - n0 < COLS ? static_cast<int>(N - n0) : COLS;
  const int nrows = M - m0 < ROWS ? static_cast<int>(M - m0) : ROWS;
  float acc[COLS][ROWS];
#pragma unroll
  for (int c = 0; c < COLS; ++c)
#pragma unroll
    for (int m = 0; m < ROWS; ++m) acc[c][m] = 0.0f;
  for (int64_t k = lane; k < K; k += kWarpSize) {
    float w[COLS];
#pragma unroll
    for (int c = 0; c < COLS; ++c) w[c] = to_float(weight[(n0 + (c < ncols ? c : 0)) * K + k]);
#pragma unroll
    for (int m = 0; m < ROWS; ++m) {
      if (m >= nrows) break;
      const float xv = to_float(x[(m0 + m) * K + k]);
#pragma unroll
      for (int c = 0; c < COLS; ++c) acc[c][m] = fmaf(w[c], xv, acc[c][m]);
    }
  }
  store_tile<T, ROWS, COLS>(acc, bias, N, n0, ncols, nrows, lane, out + m0 * N);
}

// One launch per at most kMaxGridY row groups (grid.y's limit).
template <typename T, int ROWS, int COLS>
cudaError_t launch_tiles(const T* x, const T* weight, const T* bias, int64_t M, int64_t N, int64_t K, T* out,
                         cudaStream_t stream) {
  constexpr int kVec = Vec16<T>::kSize;
  const bool vec16 = K % kVec == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(weight) % 16 == 0;
  const int64_t col_blocks = (N + kWarps * COLS - 1) / (kWarps * COLS);
  if (col_blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
  for (int64_t m_start = 0; m_start < M; m_start += kMaxGridY * ROWS) {
    const int64_t rows = M - m_start < kMaxGridY * ROWS ? M - m_start : kMaxGridY * ROWS;
    const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>((rows + ROWS - 1) / ROWS));
    const T* xs = x + m_start * K;
    T* outs = out + m_start * N;
    if (vec16) {
      decode_linear_vec16_kernel<T, ROWS, COLS><<<grid, kThreads, 0, stream>>>(xs, weight, bias, rows, N, K, outs);
    } else {
      decode_linear_scalar_kernel<T, ROWS, COLS><<<grid, kThreads, 0, stream>>>(xs, weight, bias, rows, N, K, outs);
    }
    const cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) return status;
  }
  return cudaSuccess;
}

// ROWS: M rounded up to 1, 2, 4, 8 or 16; COLS: 4 columns per warp up to 4 rows, then 2, so the
// COLS x ROWS accumulators stay within 32 registers.
template <typename T>
cudaError_t launch_typed(const void* x_raw, const void* w_raw, const void* b_raw, int64_t M, int64_t N, int64_t K,
                         void* out_raw, cudaStream_t stream) {
  const T* x = static_cast<const T*>(x_raw);
  const T* w = static_cast<const T*>(w_raw);
  const T* b = static_cast<const T*>(b_raw);
  T* out = static_cast<T*>(out_raw);
  if (M <= 1) return launch_tiles<T, 1, 4>(x, w, b, M, N, K, out, stream);
  if (M <= 2) return launch_tiles<T, 2, 4>(x, w, b, M, N, K, out, stream);
  if (M <= 4) return launch_tiles<T, 4, 4>(x, w, b, M, N, K, out, stream);
  if (M <= 8) return launch_tiles<T, 8, 2>(x, w, b, M, N, K, out, stream);
  return launch_tiles<T, 16, 2>(x, w, b, M, N, K, out, stream);
}

}  // namespace

cudaError_t launch_decode_linear(const void* x, const void* weight, const void* bias, FloatType dtype, int64_t M,
                                 int64_t N, int64_t K, void* out, cudaStream_t stream) {
  if (M < 0 || N < 0 || K < 0) return cudaErrorInvalidValue;
  if (M == 0 || N == 0) return cudaSuccess;
  return with_element_type(dtype, [&](auto t) {
    return launch_typed<decltype(t)>(x, weight, bias, M, N, K, out, stream);
  });
}

}  // namespace gptfast
