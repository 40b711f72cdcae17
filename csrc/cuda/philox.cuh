// Header-only Philox4x32-10 counter-based random numbers (Salmon et al., SC'11),
// shared by the gptfast CUDA kernels (sampling, attention dropout).
//
// Plain CUDA C++: no torch headers, so every .cu that includes it still compiles
// with `nvcc -arch=sm_90 -std=c++17 -c`.
//
// Stream layout used by gptfast: key = seed split into (low, high) 32-bit words,
// counter = (offset low, offset high, subsequence low, subsequence high).  One call
// yields four 32-bit numbers, so a kernel that needs n numbers per subsequence
// (e.g. per row or per thread) uses offsets 0..ceil(n/4)-1 and advances the
// generator's offset by that many on the host side.
#pragma once

#include <cuda_runtime.h>

namespace gptfast {

// Seed and offset of torch's Philox generator as a kernel receives them.
struct PhiloxState {
  unsigned long long seed, offset;
};

namespace philox_detail {

constexpr unsigned int kMul0 = 0xD2511F53u;
constexpr unsigned int kMul1 = 0xCD9E8D57u;
constexpr unsigned int kKeyStep0 = 0x9E3779B9u;  // golden ratio
constexpr unsigned int kKeyStep1 = 0xBB67AE85u;  // sqrt(3) - 1

// 32x32 -> 64-bit product split into (high, low) words.
__host__ __device__ inline void mul_hi_lo(unsigned int a, unsigned int b, unsigned int* hi, unsigned int* lo) {
#ifdef __CUDA_ARCH__
  *hi = __umulhi(a, b);
  *lo = a * b;
#else
  const unsigned long long product = static_cast<unsigned long long>(a) * b;
  *hi = static_cast<unsigned int>(product >> 32);
  *lo = static_cast<unsigned int>(product);
#endif
}

__host__ __device__ inline uint4 philox_round(uint4 ctr, uint2 key) {
  unsigned int hi0, lo0, hi1, lo1;
  mul_hi_lo(kMul0, ctr.x, &hi0, &lo0);
  mul_hi_lo(kMul1, ctr.z, &hi1, &lo1);
  uint4 out;
  out.x = hi1 ^ ctr.y ^ key.x;
  out.y = lo1;
  out.z = hi0 ^ ctr.w ^ key.y;
  out.w = lo0;
  return out;
}

}  // namespace philox_detail

// Ten Philox rounds of `counter` under `key`: four independent 32-bit random words.
__host__ __device__ inline uint4 philox4x32_10(uint2 key, uint4 counter) {
#pragma unroll
  for (int i = 0; i < 9; ++i) {
    counter = philox_detail::philox_round(counter, key);
    key.x += philox_detail::kKeyStep0;
    key.y += philox_detail::kKeyStep1;
  }
  return philox_detail::philox_round(counter, key);
}

// An Exp(1) draw -log(1 - v) from two uniform 32-bit words: finite, > 0, and down to 2^-47.
// word0 picks one of 2^23 equal buckets of [0, 1), word1 the point inside it.  Below 1/2 a
// float holds that sum to 24 significant bits; from 1/2 up v is the bucket's midpoint, exact
// and below 1 (a rounded sum could reach 1 and give an infinite draw).  Small draws are what
// let a token far below the top one win an exponential race, so their resolution sets how far
// into the tail a sampler reaches: (x_top - x) / T up to ~32 here, ~22 from one word.  The
// Triton sampler builds its draws the same way.
__host__ __device__ inline float philox_exponential(unsigned int word0, unsigned int word1) {
  const float high = static_cast<float>(word0 >> 9) * 0x1p-23f;
  const float v = high < 0.5f ? high + (static_cast<float>(word1 >> 9) + 0.5f) * 0x1p-46f : high + 0x1p-24f;
  return -log1pf(-v);
}

// The four words of (seed, subsequence, offset) in the stream layout above.
__device__ inline uint4 philox_words4(unsigned long long seed, unsigned long long subsequence,
                                      unsigned long long offset) {
  const uint2 key = make_uint2(static_cast<unsigned int>(seed), static_cast<unsigned int>(seed >> 32));
  const uint4 counter = make_uint4(static_cast<unsigned int>(offset), static_cast<unsigned int>(offset >> 32),
                                   static_cast<unsigned int>(subsequence),
                                   static_cast<unsigned int>(subsequence >> 32));
  return philox4x32_10(key, counter);
}

}  // namespace gptfast
