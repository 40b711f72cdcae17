// The dropout mask of the dropout_fwd op, one definition for the C++ and CUDA kernels (the Triton
// kernel spells the same arithmetic): element i of the contiguous tensor is kept iff the top 24
// bits of splitmix64's finaliser applied to seed + i * 0x9E3779B97F4A7C15 are >= round(p * 2^24).
// A counter-based draw, so the backward regenerates the forward's mask from the seed alone and any
// element's draw is independent of how the work is split.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define GPTFAST_HOST_DEVICE __host__ __device__
#else
#define GPTFAST_HOST_DEVICE
#endif

namespace gptfast_dropout {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;
constexpr double kDrawRange = 16777216.0;  // 2^24 draws

GPTFAST_HOST_DEVICE inline uint64_t mix64(uint64_t x) {
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

// round(p * 2^24) for 0 <= p <= 1: draws below it are dropped (p = 1 drops all 2^24 draws).
GPTFAST_HOST_DEVICE inline uint64_t draw_threshold(double p) { return static_cast<uint64_t>(p * kDrawRange + 0.5); }

// The factor a kept element is multiplied by, 1 / (1 - p); 0 for p = 1, where nothing is kept.
GPTFAST_HOST_DEVICE inline double keep_scale(double p) { return p < 1.0 ? 1.0 / (1.0 - p) : 0.0; }

// Whether element `index` survives; `threshold` is draw_threshold(p).
GPTFAST_HOST_DEVICE inline bool keeps(uint64_t seed, uint64_t index, uint64_t threshold) {
  return (mix64(seed + index * kGolden) >> 40) >= threshold;
}

}  // namespace gptfast_dropout
