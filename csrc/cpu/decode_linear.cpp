// Small-batch linear layer for CPU: out = x @ weight.T (+ bias) for a few rows of x.
//
// A decode step multiplies one to a few token rows by every weight matrix of the model, so
// the time is the time to read the weights once.  torch's bf16/fp16 F.linear on a CPU
// without native bf16 matmul reads them several times slower than fp32, although they are
// half the bytes.  Here each thread takes a slice of the N output rows and streams each of
// its weight rows once, against all M rows of x: 16-bit weights are widened to float32 in
// registers (never in memory), products accumulate in float32, and the result is rounded
// once to x's dtype after adding the bias (the order of torch's float32 accumulation).
//
// Tiling: R weight rows x MT rows of x per inner loop, two float32 accumulators (the low
// and high halves of a 16-element step) per pair, R * MT * 2 <= 8 vector accumulators.
// The weight tile (R rows) stays in L1 while the chunks of x rows reuse it; x itself is
// widened to float32 once per call into a buffer every thread reads.
//
// bf16 with 2-4 rows on a CPU with AVX512-BF16 (the AVX-512 build only): the dot-product
// instruction multiplies bf16 pairs straight from memory into float32 sums (bf16_dot_slice), no
// widening, which is where the widening path above is slowest and torch's own bf16 product is used
// instead.  bf16 with up to 16 rows on a CPU with AMX (the AVX-512 build on Linux) takes neither: tile
// products with the weight rows as the left operand, loaded straight from memory (amx_slice), so nothing but
// x is packed.  Over Qwen3-0.6B's matrices (2 cores) they measured 1.2x the dot-product and one-row paths at
// 1-4 rows and 1.2-1.45x torch's own AMX product at 1-16 rows, in one process, in turn.
#include "cpu_common.h"

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#include <immintrin.h>
#define GPTFAST_BF16_DOT 1
#define GPTFAST_TARGET_BF16 __attribute__((target("avx512bf16")))
#else
#define GPTFAST_BF16_DOT 0
#endif

// AMX needs the kernel's leave to use the tile registers (Linux 5.16+, arch_prctl) and a compiler
// with its intrinsics (GCC 11, clang 12).
#if GPTFAST_BF16_DOT && defined(__linux__) && defined(__x86_64__) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11))
#include <sys/syscall.h>
#include <unistd.h>
#define GPTFAST_AMX 1
#define GPTFAST_TARGET_AMX __attribute__((target("amx-tile,amx-bf16,avx512bf16")))
#else
#define GPTFAST_AMX 0
#endif

#include "ops.h"

namespace gptfast_cpu {
namespace {

using Vf = Vectorized<float>;

bool cpu_has_bf16_dot();
bool cpu_has_amx_bf16();

// out[m][r] (float32, not yet rounded) = dot(x row m0 + m, weight row n0 + r) for an R x MT tile.
template <typename scalar_t, int R, int MT>
void tile(const float* x, const scalar_t* w, int64_t K, int64_t n0, int64_t m0, float* acc_out, int64_t N) {
  constexpr int64_t S = 2 * Vf::size();  // elements per step (one Vectorized<scalar_t> of 16-bit values)
  static_assert(S == Vectorized<float>::size() * 2, "step");
  Vf acc[R][MT][2];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m][0] = acc[r][m][1] = Vf(0.0f);
  const scalar_t* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = w + (n0 + r) * K;
  const float* xm[MT];
  for (int m = 0; m < MT; ++m) xm[m] = x + (m0 + m) * K;
  int64_t k = 0;
  if constexpr (std::is_same_v<scalar_t, float> || Vectorized<scalar_t>::size() == S) {
    for (; k + S <= K; k += S) {
      Vf xlo[MT], xhi[MT];
      for (int m = 0; m < MT; ++m) {
        xlo[m] = Vf::loadu(xm[m] + k);
        xhi[m] = Vf::loadu(xm[m] + k + Vf::size());
      }
      for (int r = 0; r < R; ++r) {
        const auto [wlo, whi] = load_pair<float>(wr[r] + k);
        for (int m = 0; m < MT; ++m) {
          acc[r][m][0] = at::vec::fmadd(wlo, xlo[m], acc[r][m][0]);
          acc[r][m][1] = at::vec::fmadd(whi, xhi[m], acc[r][m][1]);
        }
      }
    }
  }
  // Unrolled so that every acc index is a constant: with a runtime index here, GCC keeps acc in
  // memory and stores all of it on every step of the loop above (1.25-1.6x slower at M = 4-8).
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) {
      float s = at::vec::vec_reduce_all<float>([](Vf a, Vf b) { return a + b; }, acc[r][m][0] + acc[r][m][1]);
      for (int64_t j = k; j < K; ++j) s += static_cast<float>(wr[r][j]) * xm[m][j];  // the K tail
      acc_out[(m0 + m) * N + n0 + r] = s;
    }
  }
}

// One row of x against weight rows [n_begin, n_end), R weight rows at a time with one accumulator
// each (the low and high halves of a 16-bit step go into the same one): R concurrent streams through
// the weights and no register spills.  This measured 1.37x the tiled path below for one row
// (18 vs 13 GB/s over a GPT-2 124M's weights on 2 cores, 2.1x F.linear): the tiles' two
// accumulators per pair leave room for only 4 weight rows in flight.
//
// 16-bit weights also prefetch the next R rows (contiguous in memory), a few cache lines per step:
// their rows are half as long, and the hardware prefetchers alone read them at 9-10 GB/s where
// this reads 10-14.5 (2 cores, Qwen3-0.6B's matrices and head, bf16).  Float32 rows measured
// faster without (17.6 against 14.8 GB/s).
template <typename scalar_t, int R>
void single_row_block(const float* x, const scalar_t* w, int64_t K, int64_t n_begin, int64_t n_end, float* out) {
  constexpr int64_t S = 2 * Vf::size();
  constexpr bool kPrefetch = !std::is_same_v<scalar_t, float>;
  constexpr int64_t kLine = 64;
  const int64_t steps = std::max<int64_t>(1, K / S);  // the next block's lines, spread evenly over these steps
  const int64_t lines_per_step = (R * K * static_cast<int64_t>(sizeof(scalar_t)) / kLine + steps - 1) / steps;
  int64_t n = n_begin;
  for (; n + R <= n_end; n += R) {
    Vf acc[R];
    for (int r = 0; r < R; ++r) acc[r] = Vf(0.0f);
    const char* next = reinterpret_cast<const char*>(w + std::min(n_end, n + R) * K);
    const char* const next_end = reinterpret_cast<const char*>(w + std::min(n_end, n + 2 * R) * K);
    int64_t k = 0;
    if constexpr (std::is_same_v<scalar_t, float> || Vectorized<scalar_t>::size() == S) {
      for (; k + S <= K; k += S) {
        if constexpr (kPrefetch) {
          for (int64_t l = 0; l < lines_per_step && next < next_end; ++l, next += kLine) __builtin_prefetch(next);
        }
        const Vf xlo = Vf::loadu(x + k), xhi = Vf::loadu(x + k + Vf::size());
        for (int r = 0; r < R; ++r) {
          const auto [wlo, whi] = load_pair<float>(w + (n + r) * K + k);
          acc[r] = at::vec::fmadd(whi, xhi, at::vec::fmadd(wlo, xlo, acc[r]));
        }
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {  // unrolled for the reason given in tile()
      float s = at::vec::vec_reduce_all<float>([](Vf a, Vf b) { return a + b; }, acc[r]);
      const scalar_t* wr = w + (n + r) * K;
      for (int64_t j = k; j < K; ++j) s += static_cast<float>(wr[j]) * x[j];  // the K tail
      out[n + r] = s;
    }
  }
  if constexpr (R > 1) {
    if (n < n_end) single_row_block<scalar_t, 1>(x, w, K, n, n_end, out);
  }
}

// All M rows of x against weight rows [n_begin, n_end): R rows at a time, x in chunks of MT <= 4.
template <typename scalar_t, int R>
void rows_block(const float* x, const scalar_t* w, int64_t M, int64_t K, int64_t N, int64_t n_begin, int64_t n_end,
                float* acc_out) {
  for (int64_t n = n_begin; n < n_end; n += R) {
    if (n + R > n_end) {  // the last rows of the slice, one at a time
      for (int64_t n1 = n; n1 < n_end; ++n1)
        for (int64_t m = 0; m < M; ++m) tile<scalar_t, 1, 1>(x, w, K, n1, m, acc_out, N);
      break;
    }
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) tile<scalar_t, R, 4>(x, w, K, n, m, acc_out, N);
    switch (M - m) {
      case 3: tile<scalar_t, R, 3>(x, w, K, n, m, acc_out, N); break;
      case 2: tile<scalar_t, R, 2>(x, w, K, n, m, acc_out, N); break;
      case 1: tile<scalar_t, R, 1>(x, w, K, n, m, acc_out, N); break;
      default: break;
    }
  }
}

// Five to sixteen float32 rows of x, with the weight as the broadcast operand: x is transposed
// once into xt (K x 8V, zero padded, one or two vectors per k), and each step of k multiplies the
// broadcast weight element of each of R rows into the x vector(s) at k.  Every weight element is
// loaded once and xt once per R weight rows, where tile() loads x once per weight row and pass:
// 1.2-1.7x tile()'s GB/s at M = 8-16 on Qwen3-shaped matrices (2 cores, AVX2); at M <= 4 the
// tiles are as fast and keep the idle lanes out.  The sum over k runs in order, in float32.
template <int R, int V>
void broadcast_rows(const float* xt, const float* w, int64_t K, int64_t n0, int64_t M, int64_t N, float* acc_out) {
  constexpr int64_t L = Vf::size();
  Vf acc[R][V];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) acc[r][v] = Vf(0.0f);
  const float* wr = w + n0 * K;
  for (int64_t k = 0; k < K; ++k) {
    Vf xv[V];
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) xv[v] = Vf::loadu(xt + (k * V + v) * L);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const Vf wv(wr[r * K + k]);
#pragma GCC unroll 2
      for (int v = 0; v < V; ++v) acc[r][v] = at::vec::fmadd(wv, xv[v], acc[r][v]);
    }
  }
  alignas(64) float lanes[V * L];
#pragma GCC unroll 16  // constant indices keep acc in registers (see tile())
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) acc[r][v].store(lanes + v * L);
    for (int64_t m = 0; m < M; ++m) acc_out[m * N + n0 + r] = lanes[m];
  }
}

// broadcast_rows over weight rows [n_begin, n_end): R rows at a time, then the last few in smaller steps.
template <int R, int V>
void broadcast_block(const float* xt, const float* w, int64_t K, int64_t M, int64_t N, int64_t n_begin, int64_t n_end,
                     float* acc_out) {
  int64_t n = n_begin;
  for (; n + R <= n_end; n += R) broadcast_rows<R, V>(xt, w, K, n, M, N, acc_out);
  for (; n + 2 <= n_end; n += 2) broadcast_rows<2, V>(xt, w, K, n, M, N, acc_out);
  if (n < n_end) broadcast_rows<1, V>(xt, w, K, n, M, N, acc_out);
}

// One thread's slice [n_begin, n_end) on the broadcast path (float32 weights only).
void broadcast_slice(const float* xt, int64_t vectors, const float* w, int64_t K, int64_t M, int64_t N,
                     int64_t n_begin, int64_t n_end, float* acc_out) {
  if (vectors == 1) {
    broadcast_block<8, 1>(xt, w, K, M, N, n_begin, n_end, acc_out);
  } else {
    broadcast_block<6, 2>(xt, w, K, M, N, n_begin, n_end, acc_out);
  }
}

#if GPTFAST_BF16_DOT
// out[m][n + r] (float32) = dot(x row m0 + m, weight row n + r), bf16 pairs by the AVX512-BF16
// dot-product instruction: each 32-element step of each of the R weight rows is loaded once and
// multiplied into MT rows of x (R * MT accumulators).  The K tail is a masked, zero-filled step.
// Float32 sums in order of k within each lane, the 16 lanes added at the end; denormal inputs count
// as zero (the instruction's rule), a difference far below bf16's rounding.  The next R weight rows
// are prefetched a few lines per step, as single_row_block() does for 16-bit rows.
template <int R, int MT>
GPTFAST_TARGET_BF16 void bf16_dot_tile(const uint16_t* x, const uint16_t* w, int64_t K, int64_t n, int64_t m0,
                                       float* acc_out, int64_t N, const char* next, const char* next_end,
                                       int64_t lines_per_step) {
  constexpr int64_t S = 32;  // bf16 elements per 512-bit step
  __m512 acc[R][MT];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k < K; k += S) {
    const __mmask32 mask = K - k >= S ? ~__mmask32{0} : static_cast<__mmask32>((uint64_t{1} << (K - k)) - 1);
    for (int64_t l = 0; l < lines_per_step && next < next_end; ++l, next += 64) __builtin_prefetch(next);
    __m512i wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) wv[r] = _mm512_maskz_loadu_epi16(mask, w + (n + r) * K + k);
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) {
      const __m512i xv = _mm512_maskz_loadu_epi16(mask, x + (m0 + m) * K + k);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)xv, (__m512bh)wv[r]);
    }
  }
#pragma GCC unroll 8  // constant indices keep acc in registers (see tile())
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) acc_out[(m0 + m) * N + n + r] = _mm512_reduce_add_ps(acc[r][m]);
}

// bf16_dot_tile over weight rows [n_begin, n_end) for all M (<= kBf16DotMaxRows) rows of x: two weight
// rows by up to four x rows per tile.  Over Qwen3-0.6B's matrices streamed from memory (2 cores, AMX
// CPU) this measured 1.42-1.45x torch's bf16 product at 2-3 rows and 1.33x at 4, but 1.08x at 6 and
// 0.88x at 8 (two 4-row tiles; one 8-row tile measured 0.97-1.3x): the dot-product instruction's
// throughput, not memory, bounds it from there, so the path stops at 4 rows.
GPTFAST_TARGET_BF16 void bf16_dot_slice(const uint16_t* x, const uint16_t* w, int64_t M, int64_t K, int64_t N,
                                        int64_t n_begin, int64_t n_end, float* acc_out) {
  constexpr int R = 2;
  const int64_t steps = std::max<int64_t>(1, (K + 31) / 32);
  const int64_t lines_per_step = (R * K * 2 / 64 + steps - 1) / steps;
  for (int64_t n = n_begin; n < n_end; n += R) {
    const char* next = reinterpret_cast<const char*>(w + std::min(n_end, n + R) * K);
    const char* next_end = reinterpret_cast<const char*>(w + std::min(n_end, n + 2 * R) * K);
    if (n + R > n_end) {  // an odd last row
      for (int64_t m = 0; m < M; ++m) bf16_dot_tile<1, 1>(x, w, K, n, m, acc_out, N, next, next, 0);
      break;
    }
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) bf16_dot_tile<R, 4>(x, w, K, n, m, acc_out, N, next, next_end, lines_per_step);
    switch (M - m) {  // the remaining rows in one tile (the weight rows are in L1 by now)
      case 3: bf16_dot_tile<R, 3>(x, w, K, n, m, acc_out, N, next, next_end, lines_per_step); break;
      case 2: bf16_dot_tile<R, 2>(x, w, K, n, m, acc_out, N, next, next_end, lines_per_step); break;
      case 1: bf16_dot_tile<R, 1>(x, w, K, n, m, acc_out, N, next, next_end, lines_per_step); break;
      default: break;
    }
  }
}

#if GPTFAST_AMX
// Tile products for bf16 rows of x (up to 16).  The product is out^T = W x^T: the left operand is 16
// weight rows by 32 k (64 bytes of each row, loaded in place with the row stride), the right one 16
// pairs of k by M rows of x in the pairwise layout the instruction reads (x_pairs: the 32-bit word
// [k / 2][m] holds x[m][k], x[m][k + 1]), packed once per call.  Each instruction multiplies 16 x M x
// 32 and reads 1 KiB of weights; memory, not the tile unit, sets the pace.  Float32 sums, denormals as
// zero (the instruction's rule).
//
// One result tile, 16 weight rows at a time, each row's lines prefetched into L2 eight steps ahead
// (into the next 16 rows near the end of K): over Qwen3-0.6B's matrices on 2 cores at 8 rows of x this
// read 21 GB/s, against 19 without the prefetch and 13-15 with four result tiles (64 rows, the other
// layout tried), whose 64 strided streams the prefetchers and L1 did not keep up with.
constexpr int64_t kAmxRows = 16, kAmxK = 32, kAmxPrefetchSteps = 8;

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tile 0: results (16 weight rows x M float32); 1: weights (16 rows x 32 bf16); 2: x pairs (16 x M).
GPTFAST_TARGET_AMX void amx_configure(int64_t M) {
  TileConfig config;
  for (int t = 0; t < 3; ++t) {
    config.rows[t] = kAmxRows;
    config.colsb[t] = static_cast<uint16_t>(t == 1 ? kAmxK * 2 : M * 4);
  }
  _tile_loadconfig(&config);
}

// Results for weight rows [n, n + 16) over k in [0, K32) (K32 a multiple of 32), written to acc_out.
// Prefetches stay within [n, n_end), the caller's slice.
GPTFAST_TARGET_AMX void amx_block(const uint32_t* x_pairs, const uint16_t* w, int64_t M, int64_t K, int64_t K32,
                                  int64_t n, int64_t n_end, float* acc_out, int64_t N) {
  const int64_t stride = K * 2;
  const uint16_t* rows = w + n * K;
  const bool next_rows = n + 2 * kAmxRows <= n_end;
  _tile_zero(0);
  for (int64_t k = 0; k < K32; k += kAmxK) {
    const int64_t ahead = k + kAmxPrefetchSteps * kAmxK;
    // Past the end of K the lines ahead are the next 16 rows' first ones; for K < 8 * 32 they would lie
    // further on than those rows, so nothing is prefetched there.
    const uint16_t* line = nullptr;
    if (ahead < K)
      line = rows + ahead;
    else if (next_rows && ahead - K < K)
      line = rows + kAmxRows * K + (ahead - K);
    if (line != nullptr)
      for (int64_t i = 0; i < kAmxRows; ++i) _mm_prefetch(reinterpret_cast<const char*>(line + i * K), _MM_HINT_T1);
    _tile_loadd(2, x_pairs + (k / 2) * M, M * 4);
    _tile_loadd(1, rows + k, stride);
    _tile_dpbf16ps(0, 1, 2);
  }
  alignas(64) float result[kAmxRows][16];
  _tile_stored(0, result, 64);
  for (int64_t i = 0; i < kAmxRows; ++i)
    for (int64_t m = 0; m < M; ++m) acc_out[m * N + n + i] = result[i][m];
}

// bf16_dot_tile's sums over k in [k0, K), K - k0 < 32, added to acc_out for weight rows [n_begin, n_end)
// and all M rows of x: the K tail of amx_block().
GPTFAST_TARGET_BF16 void bf16_dot_tail(const uint16_t* x, const uint16_t* w, int64_t M, int64_t K, int64_t k0,
                                       int64_t n_begin, int64_t n_end, float* acc_out, int64_t N) {
  const __mmask32 mask = static_cast<__mmask32>((uint64_t{1} << (K - k0)) - 1);
  for (int64_t n = n_begin; n < n_end; ++n) {
    const __m512i wv = _mm512_maskz_loadu_epi16(mask, w + n * K + k0);
    for (int64_t m = 0; m < M; ++m) {
      const __m512i xv = _mm512_maskz_loadu_epi16(mask, x + m * K + k0);
      acc_out[m * N + n] += _mm512_reduce_add_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)xv, (__m512bh)wv));
    }
  }
}

// All M rows of x against weight rows [n_begin, n_end): 16 rows at a time, the K tail (K mod 32) by dot
// products, and the last rows (fewer than 16) by bf16_dot_tile.
GPTFAST_TARGET_AMX void amx_slice(const uint16_t* x, const uint32_t* x_pairs, const uint16_t* w, int64_t M,
                                  int64_t K, int64_t N, int64_t n_begin, int64_t n_end, float* acc_out) {
  const int64_t K32 = K / kAmxK * kAmxK;
  amx_configure(M);
  int64_t n = n_begin;
  for (; n + kAmxRows <= n_end; n += kAmxRows) amx_block(x_pairs, w, M, K, K32, n, n_end, acc_out, N);
  _tile_release();
  if (K32 < K) bf16_dot_tail(x, w, M, K, K32, n_begin, n, acc_out, N);
  for (; n < n_end; ++n) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) bf16_dot_tile<1, 4>(x, w, K, n, m, acc_out, N, nullptr, nullptr, 0);
    for (; m < M; ++m) bf16_dot_tile<1, 1>(x, w, K, n, m, acc_out, N, nullptr, nullptr, 0);
  }
}

// x (M x K bf16) in the pairwise layout of amx_block's right operand, over k < K - K mod 32.
std::vector<uint32_t> amx_x_pairs(const uint16_t* x, int64_t M, int64_t K) {
  const int64_t pairs = K / kAmxK * kAmxK / 2;
  std::vector<uint32_t> packed(static_cast<size_t>(pairs * M));
  for (int64_t p = 0; p < pairs; ++p)
    for (int64_t m = 0; m < M; ++m)
      packed[p * M + m] = uint32_t{x[m * K + 2 * p]} | (uint32_t{x[m * K + 2 * p + 1]} << 16);
  return packed;
}

// CPUID leaf 7 subleaf 0, EDX bits 22 (AMX-BF16) and 24 (AMX-TILE), and Linux's leave for this
// process to use the tile data registers (ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA, feature 18).
// GPTFAST_CPU_AMX=0 in the environment turns the tile path off (the dot-product paths then serve bf16),
// so those paths can be run and tested on a CPU with AMX too.
bool cpu_has_amx_bf16() {
  static const bool has = [] {
    const char* wanted = std::getenv("GPTFAST_CPU_AMX");
    if (wanted != nullptr && std::string(wanted) == "0") return false;
    // The tile path's K tail and last rows run AVX512-BF16 dot products: a CPU (or a VM's CPUID) with the
    // tiles but without those instructions keeps the other paths.
    if (!cpu_has_bf16_dot()) return false;
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !(edx & (1u << 22)) || !(edx & (1u << 24)))
      return false;
    constexpr long kRequestPermission = 0x1023, kTileData = 18;
    return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return has;
}
#else
bool cpu_has_amx_bf16() { return false; }
#endif

// CPUID leaf 7 subleaf 1, EAX bit 5: AVX512_BF16.  This build loads only where torch found AVX-512 usable
// (the OS saves its registers), so the instruction set is all that is left to ask.
bool cpu_has_bf16_dot() {
  static const bool has = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    return __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) && (eax & (1u << 5)) != 0;
  }();
  return has;
}
#else
bool cpu_has_bf16_dot() { return false; }
bool cpu_has_amx_bf16() { return false; }
#endif

// x (M x K float32) transposed into (K x lanes) float32 with zero lanes past M.
at::Tensor transposed_lanes(const at::Tensor& x, int64_t lanes) {
  at::Tensor xt = at::zeros({x.size(1), lanes}, x.options().dtype(at::kFloat));
  xt.narrow(1, 0, x.size(0)).copy_(x.t());
  return xt;
}

template <typename scalar_t>
void decode_linear_impl(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                        at::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  constexpr bool kBf16 = std::is_same_v<scalar_t, at::BFloat16>;
  const bool amx = kBf16 && M <= kBf16TileMaxRows && cpu_has_amx_bf16();
  const bool bf16_dot = kBf16 && M >= 2 && M <= kBf16DotMaxRows && cpu_has_bf16_dot();
  // Read only by the AMX and AVX512-BF16 paths, compiled out of builds without them.
  [[maybe_unused]] const uint16_t* x16 =
      kBf16 ? reinterpret_cast<const uint16_t*>(x.const_data_ptr<scalar_t>()) : nullptr;
  // x widened once (M * K floats, small); float32 x is read in place, bf16 x by the dot and tile paths too.
  const at::Tensor x32 = x.scalar_type() == at::kFloat || bf16_dot || amx ? x : x.to(at::kFloat);
  const float* xp = bf16_dot || amx ? nullptr : x32.const_data_ptr<float>();
  const scalar_t* wp = weight.const_data_ptr<scalar_t>();
  const bool f32_out = out.scalar_type() == at::kFloat;
  at::Tensor acc = f32_out ? out : at::empty({M, N}, out.options().dtype(at::kFloat));
  float* ap = acc.data_ptr<float>();
  // float32 weights and 5-16 rows: the broadcast path (8 weight rows at a time for one vector of x
  // rows, 6 for two: the accumulators, x and the broadcast fill the 16 vector registers of AVX2).
  constexpr int64_t kBroadcastMin = 5, kBroadcastMax = 2 * Vf::size();
  const bool broadcast = std::is_same_v<scalar_t, float> && M >= kBroadcastMin && M <= kBroadcastMax;
  const int64_t vectors = M > Vf::size() ? 2 : 1;
  const at::Tensor xt = broadcast ? transposed_lanes(x32, vectors * Vf::size()) : at::Tensor();
#if GPTFAST_AMX
  const std::vector<uint32_t> x_pairs = amx ? amx_x_pairs(x16, M, K) : std::vector<uint32_t>();
#endif
  // Slices of whole row groups; about 64 KiB of weights per slice at least, so a small layer stays on one thread.
  // Whole 24-row groups: the one-row path streams 8 weight rows at a time, the broadcast path 8 or 6; the
  // tile path 16-row groups (one result tile).
  const int64_t group_rows = amx ? 16 : 24;
  const int64_t groups = (N + group_rows - 1) / group_rows;
  const int64_t grain =
      std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, K * group_rows * sizeof(scalar_t)));
  at::parallel_for(0, groups, grain, [&](int64_t g_begin, int64_t g_end) {
    const int64_t n_begin = g_begin * group_rows, n_end = std::min(N, g_end * group_rows);
    if (amx) {
#if GPTFAST_AMX
      amx_slice(x16, x_pairs.data(), reinterpret_cast<const uint16_t*>(wp), M, K, N, n_begin, n_end, ap);
#endif
    } else if (bf16_dot) {
#if GPTFAST_BF16_DOT
      bf16_dot_slice(x16, reinterpret_cast<const uint16_t*>(wp), M, K, N, n_begin, n_end, ap);
#endif
    } else if (broadcast) {
      if constexpr (std::is_same_v<scalar_t, float>)  // always: broadcast is false for 16-bit weights
        broadcast_slice(xt.const_data_ptr<float>(), vectors, wp, K, M, N, n_begin, n_end, ap);
    } else if (M == 1) {
      single_row_block<scalar_t, 8>(xp, wp, K, n_begin, n_end, ap);
    } else if (M == 2) {
      rows_block<scalar_t, 2>(xp, wp, M, K, N, n_begin, n_end, ap);
    } else {
      rows_block<scalar_t, 1>(xp, wp, M, K, N, n_begin, n_end, ap);
    }
    // Bias and rounding for this slice's columns, in float32, rounded once.
    if (bias.has_value()) {
      const scalar_t* bp = bias->const_data_ptr<scalar_t>();
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = n_begin; n < n_end; ++n) ap[m * N + n] += static_cast<float>(bp[n]);
    }
    if (!f32_out) {
      scalar_t* op = out.data_ptr<scalar_t>();
      for (int64_t m = 0; m < M; ++m)
        at::vec::convert(ap + m * N + n_begin, op + m * N + n_begin, n_end - n_begin);
    }
  });
}

}  // namespace

int64_t decode_linear_bf16_native_rows() {
  return cpu_has_amx_bf16() ? kBf16TileMaxRows : cpu_has_bf16_dot() ? kBf16DotMaxRows : 0;
}

at::Tensor decode_linear(const at::Tensor& x_in, const at::Tensor& weight_in, const c10::optional<at::Tensor>& bias_in) {
  TORCH_CHECK(x_in.dim() == 2, "gptfast_cpu decode_linear: x must be (M, K), got ", x_in.sizes());
  TORCH_CHECK(weight_in.dim() == 2 && weight_in.size(1) == x_in.size(1),
              "gptfast_cpu decode_linear: weight must be (N, ", x_in.size(1), "), got ", weight_in.sizes());
  TORCH_CHECK(x_in.device().is_cpu() && weight_in.device().is_cpu(), "gptfast_cpu decode_linear: x and weight must be on the CPU");
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "gptfast_cpu decode_linear: x must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(weight_in.scalar_type() == dtype, "gptfast_cpu decode_linear: weight must have x's dtype ", dtype,
              ", got ", weight_in.scalar_type());
  c10::optional<at::Tensor> bias;
  if (bias_in.has_value()) {
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == weight_in.size(0) && bias_in->device().is_cpu() &&
                    bias_in->scalar_type() == dtype,
                "gptfast_cpu decode_linear: bias must be a (", weight_in.size(0), ",) CPU tensor of x's dtype");
    bias = bias_in->contiguous();
  }
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();  // no copy when already contiguous
  at::Tensor out = at::empty({x.size(0), weight.size(0)}, x.options());
  if (out.numel() == 0) return out;
  if (x.size(1) == 0) return bias.has_value() ? out.copy_(bias->unsqueeze(0).expand_as(out)) : out.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "gptfast_cpu_decode_linear", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "gptfast_cpu decode_linear: float64 is not served");
    } else {
      decode_linear_impl<scalar_t>(x, weight, bias, out);
    }
  });
  return out;
}

}  // namespace gptfast_cpu
