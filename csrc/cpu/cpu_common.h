// Shared setup for gptfast's CPU kernels: vector width, small helpers.
//
// Include this header FIRST in every kernel source.  at::vec::Vectorized only uses
// 256-bit registers when CPU_CAPABILITY_AVX2 is defined (512-bit ones with
// CPU_CAPABILITY_AVX512), so on x86-64 the kernels are built for AVX2+FMA where the
// building machine has them (setup.py passes -mavx2 -mfma -mf16c then, and
// gptfast/ops/cpu_ops.py refuses that build on an x86 CPU without AVX2), and a second time
// for AVX-512 where it has that too (the extension gptfast._C_cpu_avx512, loaded instead on
// CPUs that torch reports as AVX512); elsewhere, and on x86-64 without those flags, they use
// Vectorized's portable code.  The vector code lives in its own inline namespace
// (GPTFAST_AVX512 / GPTFAST_AVX2 / GPTFAST_PORTABLE) so it never collides with ATen's own
// copies of the same templates.
#pragma once

#if defined(__x86_64__) && !defined(CPU_CAPABILITY)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && \
    defined(__FMA__)
#define CPU_CAPABILITY GPTFAST_AVX512
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY GPTFAST_AVX2
#define CPU_CAPABILITY_AVX2
#else
#define CPU_CAPABILITY GPTFAST_PORTABLE
#endif
#endif

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace gptfast_cpu {

using at::vec::Vectorized;

// fp32 accumulation for every floating dtype except float64, which keeps double.
template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename scalar_t>
using acc_t = typename AccType<scalar_t>::type;

template <typename T>
inline T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// Sum over a[0..n) of term(a[j]), where term is a generic callable applied to a vector of
// lanes and to the scalar tail alike (e.g. [](auto v) { return v * v; }).  Four independent
// vector accumulators: with one, every add waits for the previous one (a latency chain as
// long as the row), which made the norms' row sums twice slower.
template <typename T, typename Term>
inline T sum_of(const T* a, int64_t n, Term term) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  V a0(T(0)), a1(T(0)), a2(T(0)), a3(T(0));
  int64_t j = 0;
  for (; j + 4 * L <= n; j += 4 * L) {
    a0 = a0 + term(V::loadu(a + j));
    a1 = a1 + term(V::loadu(a + j + L));
    a2 = a2 + term(V::loadu(a + j + 2 * L));
    a3 = a3 + term(V::loadu(a + j + 3 * L));
  }
  for (; j + L <= n; j += L) a0 = a0 + term(V::loadu(a + j));
  T s = at::vec::vec_reduce_all<T>([](V x, V y) { return x + y; }, (a0 + a1) + (a2 + a3));
  for (; j < n; ++j) s += term(a[j]);
  return s;
}

// Max of a[0..n) (vectorized); -inf when n == 0, NaN when any element is NaN
// (at::vec::maximum propagates NaN, std::max would not).  The tail is one partial vector
// padded with -inf.
template <typename T>
inline T vec_max(const T* a, int64_t n) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  V acc(neg_inf<T>());
  int64_t i = 0;
  for (; i + L <= n; i += L) acc = at::vec::maximum(acc, V::loadu(a + i));
  if (i < n) acc = at::vec::maximum(acc, V::set(V(neg_inf<T>()), V::loadu(a + i, n - i), n - i));
  return at::vec::vec_reduce_all<T>([](V x, V y) { return at::vec::maximum(x, y); }, acc);
}

// exp_u20 (fast vector exp) that keeps NaN lanes NaN: exp_u20 alone clamps a NaN (and
// +inf) input to a large finite value, which would turn a NaN result into a number.
template <typename T>
inline Vectorized<T> exp_keep_nan(const Vectorized<T>& x) {
  return Vectorized<T>::blendv(x.exp_u20(), x, x != x);
}

// Index of the first NaN in a[0..n), or -1 when there is none.
template <typename T>
inline int64_t first_nan(const T* a, int64_t n) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  constexpr int kNoNaN = (1 << L) - 1;  // zero_mask: a bit per lane whose compare result is 0
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    const V v = V::loadu(a + i);
    if ((v != v).zero_mask() != kNoNaN) break;  // a NaN lane: find it below
  }
  for (; i < n; ++i)
    if (std::isnan(a[i])) return i;
  return -1;
}

// 2 * Vectorized<T>::size() elements of src starting at p, in T (lo, hi): loaded as they are
// when src is already T, else one 16-bit vector widened in registers.
template <typename T, typename scalar_t>
inline std::pair<Vectorized<T>, Vectorized<T>> load_pair(const scalar_t* p) {
  using V = Vectorized<T>;
  if constexpr (std::is_same_v<scalar_t, T>) {
    return {V::loadu(p), V::loadu(p + V::size())};
  } else {
    static_assert(Vectorized<scalar_t>::size() == 2 * V::size(), "one 16-bit vector widens to two");
    auto [lo, hi] = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p));
    return {lo, hi};
  }
}

// src[0..n) in the accumulation dtype T: src itself when already T, else a copy into `buffer`.
template <typename scalar_t, typename T>
inline const T* widen(const scalar_t* src, int64_t n, T* buffer) {
  if constexpr (std::is_same_v<scalar_t, T>) {
    return src;
  } else {
    at::vec::convert(src, buffer, n);
    return buffer;
  }
}

// Rows per block of a deterministic column reduction over N rows (the weight gradients of the
// norms): a function of N only, so the summation order never depends on the thread count.
inline int64_t rows_per_block(int64_t N) { return std::max<int64_t>(8, (N + 63) / 64); }

// A deterministic column sum over N rows into total[0..width): the rows are cut into blocks of
// rows_per_block(N); blocks run in parallel, accumulate(row_begin, row_end, part) adding its rows'
// contributions into the block's own zeroed `width` partials; then each column adds the blocks'
// partials in block order (column-parallel) into total, which it overwrites.  accumulate may
// also write per-row outputs (dx).
template <typename T, typename Accumulate>
void sum_over_row_blocks(int64_t N, int64_t width, T* total, Accumulate accumulate) {
  const int64_t per_block = rows_per_block(N), blocks = (N + per_block - 1) / per_block;
  std::vector<T> partial(static_cast<size_t>(blocks * width), T(0));
  at::parallel_for(0, blocks, 1, [&](int64_t b_begin, int64_t b_end) {
    for (int64_t b = b_begin; b < b_end; ++b)
      accumulate(b * per_block, std::min(N, (b + 1) * per_block), partial.data() + b * width);
  });
  at::parallel_for(0, width, 256, [&](int64_t c_begin, int64_t c_end) {
    std::fill(total + c_begin, total + c_end, T(0));
    for (int64_t b = 0; b < blocks; ++b) {
      const T* part = partial.data() + b * width;
      for (int64_t j = c_begin; j < c_end; ++j) total[j] += part[j];
    }
  });
}

}  // namespace gptfast_cpu
