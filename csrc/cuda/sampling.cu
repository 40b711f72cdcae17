// Top-k / temperature sampling of one token per row, in one kernel launch.
//
// One thread block per row:
//   1. argmax of the row (the greedy answer, and the max used to shift the scores);
//   2. if top_k < vocab: the k-th largest value by radix select over order-preserving
//      32-bit keys, 8 bits per pass with a 256-bin histogram in shared memory (no sort);
//   3. an exponential race over the kept values: token j wins with probability
//      softmax(x / T)_j restricted to the kept set, because
//      argmax_j (x_j - max) / T - log(E_j), E_j ~ Exp(1) independent, is a Gumbel-max draw.
//      E_j = philox_exponential of two words of Philox4x32-10 (seed, subsequence = row,
//      counter = offset / 4 + j / 2), so the draw needs no normalisation and no second pass.
// Rows whose temperature is not > 0 (or so small that 1 / T overflows) return the
// argmax; a row with NaN logits returns its first NaN's index (as torch.argmax does).
//
// Non-finite rows (no host synchronisation, so no exception): a sampled row whose logits
// hold a NaN or +inf, or are all -inf, has no softmax to draw from and returns its
// torch.argmax instead (the torch and CPU backends raise there); so does a row whose
// kept scores all come out -inf.  The Triton kernel follows the same rule, so every
// backend returns an id in [0, vocab).
#include "common.cuh"
#include "loss_sampling_launch.h"
#include "philox.cuh"

namespace gptfast {
namespace {

constexpr int kRadixBits = 8;
constexpr int kRadixBins = 1 << kRadixBits;
constexpr int kBinsPerLane = kRadixBins / kWarpSize;

// Seed and offset, read on the device while a CUDA graph replays (see PhiloxLaunchArgs).
__device__ __forceinline__ PhiloxState unpack_philox(const PhiloxLaunchArgs& rng) {
  if (rng.captured) {
    return PhiloxState{static_cast<unsigned long long>(*rng.seed_ptr),
                       static_cast<unsigned long long>(*rng.offset_ptr) + rng.offset_intragraph};
  }
  return PhiloxState{rng.seed, rng.offset};
}

// Shared memory of the radix select.
struct RadixShared {
  unsigned histogram[kRadixBins];
  unsigned digit;  // the bin holding the k-th largest key in this pass
  unsigned rank;   // its rank within that bin (1 = largest)
};

// Warp 0 finds the bin, counted from the top, that holds the rank-th largest key;
// writes it and the rank within the bin to `shared`.  Caller syncs before and after.
__device__ __forceinline__ void select_bin(RadixShared& shared, unsigned rank) {
  if (threadIdx.x >= kWarpSize) return;
  const int lane = threadIdx.x;
  const int top_bin = kRadixBins - 1 - lane * kBinsPerLane;  // lane 0 owns the largest bins
  unsigned lane_total = 0;
#pragma unroll
  for (int j = 0; j < kBinsPerLane; ++j) lane_total += shared.histogram[top_bin - j];
  unsigned inclusive = lane_total;  // keys in this lane's bins and all larger bins
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const unsigned below = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive += below;
  }
  const unsigned exclusive = inclusive - lane_total;
  if (exclusive < rank && rank <= inclusive) {  // exactly one lane
    unsigned larger = exclusive;
    for (int j = 0; j < kBinsPerLane; ++j) {
      const unsigned count = shared.histogram[top_bin - j];
      if (larger + count >= rank) {
        shared.digit = static_cast<unsigned>(top_bin - j);
        shared.rank = rank - larger;
        break;
      }
      larger += count;
    }
  }
}

// Key of the k-th largest value of the row (1 <= k <= n), ties counted.
template <typename T, int BLOCK>
__device__ unsigned kth_largest_key(const T* row, int64_t n, int64_t k, RadixShared& shared) {
  constexpr int kVec = Vec16<T>::kSize;
  unsigned prefix = 0, mask = 0, rank = static_cast<unsigned>(k);
  // Safe defaults, written once: select_bin overwrites them every pass.  (Resetting them
  // at the top of each pass would race with threads still reading the previous pass.)
  if (threadIdx.x == 0) {
    shared.digit = 0;
    shared.rank = 1;
  }
  for (int shift = 32 - kRadixBits; shift >= 0; shift -= kRadixBits) {
    // Nobody reads the histogram after the previous pass's select_bin barrier, so it can be cleared.
    for (int b = threadIdx.x; b < kRadixBins; b += BLOCK) shared.histogram[b] = 0;
    __syncthreads();
    for_each_chunk<T, BLOCK>(row, n, [&](int64_t, const float(&v)[kVec], int count) {
      // Neighbouring values often share a bin: add runs with one atomic.
      unsigned run_bin = 0, run_length = 0;
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        if (e >= count) break;
        const unsigned key = float_to_key(v[e]);
        if ((key & mask) != prefix) continue;
        const unsigned bin = (key >> shift) & (kRadixBins - 1);
        if (run_length != 0 && bin != run_bin) {
          atomicAdd(&shared.histogram[run_bin], run_length);
          run_length = 0;
        }
        run_bin = bin;
        ++run_length;
      }
      if (run_length != 0) atomicAdd(&shared.histogram[run_bin], run_length);
    });
    __syncthreads();
    select_bin(shared, rank);
    __syncthreads();
    prefix |= shared.digit << shift;
    mask |= static_cast<unsigned>(kRadixBins - 1) << shift;
    rank = shared.rank;
  }
  __syncthreads();  // everyone has read shared.digit/rank before the caller reuses anything
  return prefix;
}

template <typename T, int BLOCK>
__global__ void __launch_bounds__(BLOCK)
    sample_next_token_kernel(const T* logits, int64_t row_stride, int64_t vocab, const float* temperature,
                             float temperature_value, const int64_t* top_k, int64_t top_k_value,
                             PhiloxLaunchArgs rng, int64_t* out) {
  constexpr int kVec = Vec16<T>::kSize;
  __shared__ float reduce_values[BLOCK / kWarpSize];
  __shared__ int64_t reduce_indices[BLOCK / kWarpSize];
  __shared__ RadixShared radix;

  const int64_t r = blockIdx.x;
  const T* row = logits + r * row_stride;
  const float temp = temperature != nullptr ? temperature[r] : temperature_value;
  int64_t k = top_k != nullptr ? top_k[r] : top_k_value;
  k = k < 1 ? 1 : (k > vocab ? vocab : k);

  // 1. argmax: NaN counts as largest, ties go to the first index (torch.argmax).
  float max_value = -INFINITY;
  int64_t max_index = INT64_MAX;
  for_each_chunk<T, BLOCK>(row, vocab, [&](int64_t start, const float(&v)[kVec], int count) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      if (e < count && argmax_better(v[e], start + e, max_value, max_index)) {
        max_value = v[e];
        max_index = start + e;
      }
    }
  });
  block_argmax<BLOCK>(max_value, max_index, reduce_values, reduce_indices);

  const float inv_temp = 1.0f / temp;
  // Greedy (also NaN/negative temperatures), or no distribution to draw from: NaN (the
  // argmax then holds NaN), +inf or all -inf.  Uniform across the block: no barrier skipped.
  if (!(temp > 0.0f) || !(inv_temp < INFINITY) || !(fabsf(max_value) < INFINITY)) {
    if (threadIdx.x == 0) out[r] = max_index;
    return;
  }

  // 2. keep the values whose key is >= the k-th largest key (ties at the k-th value kept).
  unsigned threshold = 0;  // every key is >= 0: keep all
  if (k == 1) {
    threshold = float_to_key(max_value);
  } else if (k < vocab) {
    threshold = kth_largest_key<T, BLOCK>(row, vocab, k, radix);
  }

  // 3. exponential race over the kept values: one Philox call, two words per value, serves two values.
  const PhiloxState state = unpack_philox(rng);
  const unsigned long long first_counter = state.offset / 4;
  float best_score = -INFINITY;
  int64_t best_index = vocab;  // sentinel: nothing kept scored
  const int64_t pairs = (vocab + 1) / 2;
  for (int64_t pair = threadIdx.x; pair < pairs; pair += BLOCK) {
    const uint4 words = philox_words4(state.seed, static_cast<unsigned long long>(r), first_counter + pair);
    const float exponentials[2] = {philox_exponential(words.x, words.y), philox_exponential(words.z, words.w)};
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int64_t j = pair * 2 + c;
      if (j >= vocab) break;
      const float x = to_float(row[j]);
      if (float_to_key(x) < threshold) continue;
      // exponentials[c] is finite and > 0, so the score is finite unless (x - max) / T overflows to -inf.
      const float score = (x - max_value) * inv_temp - __logf(exponentials[c]);
      // -inf never wins (best_score starts there), so an all -inf row keeps the sentinel.
      if (score > best_score || (score == best_score && score > -INFINITY && j < best_index)) {
        best_score = score;
        best_index = j;
      }
    }
  }
  block_argmax<BLOCK>(best_score, best_index, reduce_values, reduce_indices);
  // Scores are finite or -inf here; if every kept one is -inf, fall back to the argmax.
  if (threadIdx.x == 0) out[r] = best_index < vocab ? best_index : max_index;
}

template <typename T, int BLOCK>
cudaError_t launch_block(const void* logits, int64_t row_stride, int64_t rows, int64_t vocab, const float* temperature,
                         float temperature_value, const int64_t* top_k, int64_t top_k_value,
                         const PhiloxLaunchArgs& rng, int64_t* out, cudaStream_t stream) {
  sample_next_token_kernel<T, BLOCK><<<static_cast<unsigned>(rows), BLOCK, 0, stream>>>(
      static_cast<const T*>(logits), row_stride, vocab, temperature, temperature_value, top_k, top_k_value, rng,
      out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const void* logits, int64_t row_stride, int64_t rows, int64_t vocab, const float* temperature,
                         float temperature_value, const int64_t* top_k, int64_t top_k_value,
                         const PhiloxLaunchArgs& rng, int64_t* out, cudaStream_t stream) {
  // Decoding has few rows: give each row many threads once the vocabulary is large.
  if (vocab <= 4096)
    return launch_block<T, 256>(logits, row_stride, rows, vocab, temperature, temperature_value, top_k, top_k_value,
                                rng, out, stream);
  return launch_block<T, 1024>(logits, row_stride, rows, vocab, temperature, temperature_value, top_k, top_k_value,
                               rng, out, stream);
}

}  // namespace

int64_t sampling_philox_counters(int64_t vocab) { return (vocab + 1) / 2; }

cudaError_t launch_sample_next_token(const void* logits, int64_t row_stride, FloatType dtype, int64_t rows,
                                     int64_t vocab, const float* temperature, float temperature_value,
                                     const int64_t* top_k, int64_t top_k_value, PhiloxLaunchArgs rng,
                                     int64_t* out, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  if (rows > 0x7fffffffLL || vocab <= 0 || vocab > 0x7fffffffLL) return cudaErrorInvalidValue;
  return with_element_type(dtype, [&](auto t) {
    return launch_typed<decltype(t)>(logits, row_stride, rows, vocab, temperature, temperature_value, top_k,
                                 top_k_value, rng, out, stream);
  });
}

}  // namespace gptfast
