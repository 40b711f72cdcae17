// Softmax cross-entropy forward with the gradient written in the same kernel.
//
// One thread block per row.  Pass 1 streams the row with 16-byte loads and keeps an
// online (max, sum of exp) per thread in registers, merged across the block; pass 2
// re-reads the row (from L2 for GPT-2 sized rows) and writes
// softmax(row) - onehot(target) with 16-byte stores.  Math is fp32 for every dtype.
//
// Out-of-range targets (not ignore_index, outside [0, vocab)) are never used as an
// index: the row's loss and gradient become NaN, which the caller can detect
// without a host synchronisation on the hot path.
//
// Non-finite rows follow F.cross_entropy: a row holding a NaN or +inf, or only -inf,
// has no softmax (its log-sum-exp is not finite), so its loss is NaN (0 when its target
// is ignore_index) and its gradient row is NaN, ignored or not.  A -inf logit elsewhere
// is an ordinary zero probability.
#include "common.cuh"
#include "loss_sampling_launch.h"

namespace gptfast {
namespace {

__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fffffff); }

template <typename T, typename Index, int BLOCK>
__global__ void __launch_bounds__(BLOCK)
    cross_entropy_fwd_kernel(const T* logits, int64_t row_stride, const Index* targets, int64_t vocab,
                             int64_t ignore_index, float* loss_rows, T* grad, int64_t grad_row_stride) {
  constexpr int kVec = Vec16<T>::kSize;
  __shared__ float scratch[2 * (BLOCK / kWarpSize)];

  const int64_t r = blockIdx.x;
  const T* row = logits + r * row_stride;
  const int64_t target = static_cast<int64_t>(targets[r]);
  const bool ignored = target == ignore_index;
  const bool bad = !ignored && (target < 0 || target >= vocab);
  const bool normal = !ignored && !bad;  // same for the whole block, so barriers below are uniform
  // An ignored row's gradient is 0, or NaN when its softmax is: that needs its log-sum-exp.
  const bool need_lse = normal || (ignored && grad != nullptr);

  // Read the target logit before any thread may overwrite it (grad may alias the
  // logits); the barriers inside block_merge_max_sum order it before pass 2.
  float target_logit = 0.0f;
  if (threadIdx.x == 0 && normal) target_logit = to_float(row[target]);

  float lse = 0.0f, row_max = 0.0f, log_sum = 0.0f;
  if (need_lse) {
    float m = -INFINITY, s = 0.0f;
    bool saw_nan = false;  // fmaxf drops NaN, and a thread whose values are all NaN/-inf sums nothing
    for_each_chunk<T, BLOCK>(row, vocab, [&](int64_t, const float(&v)[kVec], int count) {
      float chunk_max = -INFINITY;
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        if (e < count) {
          chunk_max = fmaxf(chunk_max, v[e]);
          saw_nan |= isnan(v[e]);
        }
      }
      if (chunk_max > m) {  // rescale the running sum once per chunk, not per element
        s *= __expf(m - chunk_max);
        m = chunk_max;
      }
      if (m != -INFINITY) {  // a +inf max makes exp(inf - inf) = NaN: the row has no softmax
#pragma unroll
        for (int e = 0; e < kVec; ++e)
          if (e < count) s += __expf(v[e] - m);
      }
    });
    if (saw_nan) s = quiet_nan();  // merge_max_sum carries a NaN sum through to the log-sum-exp
    block_merge_max_sum<BLOCK>(m, s, scratch);
    row_max = m;
    log_sum = __logf(s);
    lse = m + log_sum;  // NaN (NaN or +inf in the row), -inf (all -inf) or finite
  }
  const bool finite_lse = fabsf(lse) < INFINITY;  // false for NaN and +-inf
  if (threadIdx.x == 0) {
    // (m - target) + log(s) rather than lse - target: a small loss next to a large max keeps its digits.
    loss_rows[r] = ignored ? 0.0f : ((bad || !finite_lse) ? quiet_nan() : (row_max - target_logit) + log_sum);
  }
  if (grad == nullptr) return;

  T* grad_row = grad + r * grad_row_stride;
  // 16-byte stores line up with the 16-byte loads only if both rows share their alignment.
  const bool vector_store = reinterpret_cast<uintptr_t>(grad_row) % 16 == reinterpret_cast<uintptr_t>(row) % 16;
  const bool softmax_row = normal && finite_lse;
  const float fill = (bad || !finite_lse) ? quiet_nan() : 0.0f;  // ignored rows: 0, or NaN without a softmax
  for_each_chunk<T, BLOCK>(row, vocab, [&](int64_t start, const float(&v)[kVec], int count) {
    float g[kVec];
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      g[e] = softmax_row ? __expf(v[e] - lse) - (start + e == target ? 1.0f : 0.0f) : fill;
    }
    if (count == kVec && vector_store) {
      *reinterpret_cast<uint4*>(grad_row + start) = pack16<T>(g);
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e)
        if (e < count) grad_row[start + e] = from_float<T>(g[e]);
    }
  });
}

template <typename T, typename Index, int BLOCK>
cudaError_t launch_block(const void* logits, int64_t row_stride, const void* targets, int64_t rows, int64_t vocab,
                         int64_t ignore_index, float* loss_rows, void* grad, int64_t grad_row_stride,
                         cudaStream_t stream) {
  cross_entropy_fwd_kernel<T, Index, BLOCK><<<static_cast<unsigned>(rows), BLOCK, 0, stream>>>(
      static_cast<const T*>(logits), row_stride, static_cast<const Index*>(targets), vocab, ignore_index, loss_rows,
      static_cast<T*>(grad), grad_row_stride);
  return cudaGetLastError();
}

// Threads per row grow with the vocabulary so each thread handles a few 16-byte chunks.
template <typename T, typename Index>
cudaError_t launch_typed(const void* logits, int64_t row_stride, const void* targets, int64_t rows, int64_t vocab,
                         int64_t ignore_index, float* loss_rows, void* grad, int64_t grad_row_stride,
                         cudaStream_t stream) {
  if (vocab <= 1024)
    return launch_block<T, Index, 128>(logits, row_stride, targets, rows, vocab, ignore_index, loss_rows, grad,
                                       grad_row_stride, stream);
  if (vocab <= 8192)
    return launch_block<T, Index, 256>(logits, row_stride, targets, rows, vocab, ignore_index, loss_rows, grad,
                                       grad_row_stride, stream);
  if (vocab <= 32768)
    return launch_block<T, Index, 512>(logits, row_stride, targets, rows, vocab, ignore_index, loss_rows, grad,
                                       grad_row_stride, stream);
  return launch_block<T, Index, 1024>(logits, row_stride, targets, rows, vocab, ignore_index, loss_rows, grad,
                                      grad_row_stride, stream);
}

template <typename T>
cudaError_t launch_index(const void* logits, int64_t row_stride, const void* targets, bool targets_int64,
                         int64_t rows, int64_t vocab, int64_t ignore_index, float* loss_rows, void* grad,
                         int64_t grad_row_stride, cudaStream_t stream) {
  if (targets_int64)
    return launch_typed<T, int64_t>(logits, row_stride, targets, rows, vocab, ignore_index, loss_rows, grad,
                                    grad_row_stride, stream);
  return launch_typed<T, int32_t>(logits, row_stride, targets, rows, vocab, ignore_index, loss_rows, grad,
                                  grad_row_stride, stream);
}

}  // namespace

cudaError_t launch_cross_entropy_fwd(const void* logits, int64_t row_stride, FloatType dtype, const void* targets,
                                     bool targets_int64, int64_t rows, int64_t vocab, int64_t ignore_index,
                                     float* loss_rows, void* grad, int64_t grad_row_stride, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  if (rows > 0x7fffffffLL || vocab <= 0) return cudaErrorInvalidValue;
  return with_element_type(dtype, [&](auto t) {
    return launch_index<decltype(t)>(logits, row_stride, targets, targets_int64, rows, vocab, ignore_index, loss_rows,
                                 grad, grad_row_stride, stream);
  });
}

}  // namespace gptfast
