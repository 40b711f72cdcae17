// Device helpers shared by gptfast's loss and sampling kernels: dtype conversion,
// 16-byte vectorised row traversal, warp/block reductions and order-preserving
// float keys.  Plain CUDA C++ (no torch headers).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "loss_sampling_launch.h"  // FloatType

namespace gptfast {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// ----------------------------------------------------------------- host dispatch

// f(T{}) with T the element type `dtype` names (float, __half, __nv_bfloat16): the launchers' one
// dtype switch, e.g. with_element_type(dtype, [&](auto t) { return launch<decltype(t)>(...); }).
template <typename F>
cudaError_t with_element_type(FloatType dtype, F&& f) {
  switch (dtype) {
    case FloatType::kFloat32:
      return f(float{});
    case FloatType::kFloat16:
      return f(__half{});
    case FloatType::kBFloat16:
      return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// ----------------------------------------------------------------- conversions

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Elements of T in one 16-byte (128-bit) load.
template <typename T>
struct Vec16 {
  static constexpr int kSize = 16 / static_cast<int>(sizeof(T));
};

// One 16-byte global load into registers.  The uint4 is taken by value so that
// nvcc emits a single LDG.E.128; unpacking through a T* into the loaded object
// (or into global memory) makes it split the load into per-element loads.
// A plain (coherent) load, not __ldg: a kernel may write its gradient over the row it reads.
__device__ __forceinline__ uint4 load16(const uint4* ptr) { return *ptr; }

// The two 16-bit halves of a 32-bit word (low half = lower address), widened to float.
__device__ __forceinline__ void halves_to_float(unsigned word, const __half*, float& lo, float& hi) {
  lo = __half2float(__ushort_as_half(static_cast<unsigned short>(word & 0xffffu)));
  hi = __half2float(__ushort_as_half(static_cast<unsigned short>(word >> 16)));
}
__device__ __forceinline__ void halves_to_float(unsigned word, const __nv_bfloat16*, float& lo, float& hi) {
  // bf16 is the top half of an fp32: widening is a shift, exact for every value incl. NaN/inf.
  lo = __int_as_float(static_cast<int>(word << 16));
  hi = __int_as_float(static_cast<int>(word & 0xffff0000u));
}

// Unpacks a register copy of 16 bytes into Vec16<T>::kSize floats with bit operations only.
template <typename T>
__device__ __forceinline__ void unpack16(uint4 raw, float (&out)[Vec16<T>::kSize]) {
  const unsigned words[4] = {raw.x, raw.y, raw.z, raw.w};
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int e = 0; e < 4; ++e) out[e] = __int_as_float(static_cast<int>(words[e]));
  } else {
    static_assert(sizeof(T) == 2, "unpack16 handles 2- and 4-byte element types");
#pragma unroll
    for (int e = 0; e < 4; ++e) halves_to_float(words[e], static_cast<const T*>(nullptr), out[2 * e], out[2 * e + 1]);
  }
}

template <typename T>
__device__ __forceinline__ uint4 pack16(const float (&in)[Vec16<T>::kSize]) {
  uint4 raw;
  T* elems = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int e = 0; e < Vec16<T>::kSize; ++e) elems[e] = from_float<T>(in[e]);
  return raw;
}

// Number of leading elements of `row` to handle one by one before the address is
// 16-byte aligned (n when the row is not even aligned to its element size).
template <typename T>
__device__ __forceinline__ int64_t unaligned_head(const T* row, int64_t n) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(row);
  if (addr % sizeof(T) != 0) return n;
  const int64_t head = static_cast<int64_t>(((16 - addr % 16) % 16) / sizeof(T));
  return head < n ? head : n;
}

// Calls f(start, values, count) over a row of n elements, split among BLOCK
// threads.  All but an unaligned head and a short tail are read with 16-byte
// loads: those calls get count == Vec16<T>::kSize consecutive values starting at
// index `start`; head and tail elements come one at a time (count == 1, only
// values[0] set).  Every index in [0, n) is visited exactly once, none outside.
template <typename T, int BLOCK, typename F>
__device__ __forceinline__ void for_each_chunk(const T* row, int64_t n, F&& f) {
  constexpr int kVec = Vec16<T>::kSize;
  const int64_t head = unaligned_head(row, n);
  float values[kVec];
  for (int64_t i = threadIdx.x; i < head; i += BLOCK) {
    values[0] = to_float(row[i]);
    f(i, values, 1);
  }
  const int64_t chunks = (n - head) / kVec;
  const uint4* vec = reinterpret_cast<const uint4*>(row + head);
  for (int64_t c = threadIdx.x; c < chunks; c += BLOCK) {
    unpack16<T>(load16(vec + c), values);
    f(head + c * kVec, values, kVec);
  }
  for (int64_t i = head + chunks * kVec + threadIdx.x; i < n; i += BLOCK) {
    values[0] = to_float(row[i]);
    f(i, values, 1);
  }
}

// ----------------------------------------------------------------- order-preserving keys

// Maps a float to an unsigned key with the same order (larger float -> larger
// key); -0.0 is folded onto +0.0 so that equal floats get equal keys.  Positive
// NaNs sort above +inf, as torch.topk treats NaN as the largest value.
__device__ __forceinline__ unsigned float_to_key(float x) {
  unsigned bits = __float_as_uint(x);
  if (bits == 0x80000000u) bits = 0u;
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// ----------------------------------------------------------------- reductions

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

// Block-wide float sum; all threads get it.  `scratch` holds BLOCK / 32 floats.  Contains __syncthreads.
template <int BLOCK>
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  constexpr int kWarps = BLOCK / kWarpSize;
  v = warp_sum(v);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  __syncthreads();  // scratch may be reused right after
  return total;
}

// Merges two partial softmax normalisers (max m, sum s of exp(x - m)) into (m, s).
__device__ __forceinline__ void merge_max_sum(float& m, float& s, float other_m, float other_s) {
  const float new_m = fmaxf(m, other_m);
  if (new_m == -INFINITY) {  // both empty (or all -inf): avoid exp(-inf - -inf) = NaN
    s = s + other_s;         // 0, or NaN when a part flagged a NaN it could not sum
    m = new_m;
    return;
  }
  s = s * __expf(m - new_m) + other_s * __expf(other_m - new_m);
  m = new_m;
}

// Block-wide merge of every thread's (m, s); all threads get the result.
// `scratch` must hold 2 * (BLOCK / 32) floats.  Contains __syncthreads.
template <int BLOCK>
__device__ __forceinline__ void block_merge_max_sum(float& m, float& s, float* scratch) {
  static_assert(BLOCK % kWarpSize == 0 && BLOCK <= 1024, "block must be whole warps, at most 1024 threads");
  constexpr int kWarps = BLOCK / kWarpSize;
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const float om = __shfl_xor_sync(kFullMask, m, offset);
    const float os = __shfl_xor_sync(kFullMask, s, offset);
    merge_max_sum(m, s, om, os);
  }
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  if (lane == 0) {
    scratch[warp] = m;
    scratch[kWarps + warp] = s;
  }
  __syncthreads();
  m = -INFINITY;
  s = 0.0f;
  for (int w = 0; w < kWarps; ++w) merge_max_sum(m, s, scratch[w], scratch[kWarps + w]);
  __syncthreads();  // scratch may be reused right after
}

// (value, index) pair ordering for argmax: larger value wins, NaN beats any number
// (as torch.argmax), ties go to the smaller index.
__device__ __forceinline__ bool argmax_better(float a, int64_t ia, float b, int64_t ib) {
  const bool a_nan = isnan(a), b_nan = isnan(b);
  if (a_nan || b_nan) return a_nan && (!b_nan || ia < ib);
  return a > b || (a == b && ia < ib);
}

// Block-wide argmax; all threads get the winner.  `values`/`indices` scratch
// hold BLOCK / 32 entries each.  Contains __syncthreads.
template <int BLOCK>
__device__ __forceinline__ void block_argmax(float& value, int64_t& index, float* values, int64_t* indices) {
  constexpr int kWarps = BLOCK / kWarpSize;
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const float ov = __shfl_xor_sync(kFullMask, value, offset);
    const int64_t oi = __shfl_xor_sync(kFullMask, index, offset);
    if (argmax_better(ov, oi, value, index)) {
      value = ov;
      index = oi;
    }
  }
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  if (lane == 0) {
    values[warp] = value;
    indices[warp] = index;
  }
  __syncthreads();
  value = values[0];
  index = indices[0];
  for (int w = 1; w < kWarps; ++w) {
    if (argmax_better(values[w], indices[w], value, index)) {
      value = values[w];
      index = indices[w];
    }
  }
  __syncthreads();
}

}  // namespace gptfast
