// Fused causal attention for CPU, forward and backward (flash-attention style).
//
// Forward: every (batch, head, query tile) is one task.  The task walks the key tiles its
// queries may see, keeps a running row max and row sum (online softmax), and accumulates
// P @ V in a tile-sized buffer, so the Tq x Tk score matrix never exists.  It saves the
// output and the per-row log-sum-exp; backward recomputes P from them.  A decode call (one
// or two query rows) instead runs one task per (batch, kv head): its query heads score each
// key together, so every key and value row is read once per kv head.
//
// Dropout: the keep/drop decision of score (bh, i, j) is a hash of (seed, counter),
// so backward regenerates exactly the forward's mask without storing it.
//
// Grouped-query attention: k/v have H_kv heads, H_kv dividing H; query head h reads kv
// head h / (H / H_kv) in place (no expanded copy).  Backward runs one task per (batch, kv
// head, slice of its query heads), so each task owns its dK/dV rows: the group's sum needs no
// atomics, and partial sums of the slices (only when there are fewer kv heads than threads)
// are added afterwards.
//
// All arithmetic is in acc_t (fp32, or fp64 for double inputs); bf16/fp16 inputs are
// widened when a tile is loaded.  Tile products use the small register-blocked GEMM
// below on scratch buffers whose widths are padded to the vector length.
#include "../dropout_hash.h"
#include "cpu_common.h"

#include <limits>
#include <optional>
#include <tuple>

namespace gptfast_cpu {
namespace {

constexpr int64_t kQueryTile = 64;
constexpr int64_t kKeyTile = 64;
constexpr int kMaxRows = 6;  // rows per micro-kernel (see kPanelVectors)

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Tasks per thread chunk so that a chunk holds at least ~2^20 multiply-adds (2^17 for decode rows, whose
// direct path does several times fewer per second than the tile products): a decode step of one row
// and a short cache is too small to pay for a parallel region, a batch of rows or a longer cache is not
// (Qwen3-0.6B's bf16 attention on 2 cores, with the vectorised exp below: 8 rows over 80 / 144 keys 188-236 /
// 284-361 us against 274 / 485 before both changes, one row over 80 keys 47-51 against 101).
inline int64_t grain_for(int64_t madds_per_task, bool decode_rows) {
  const int64_t chunk = int64_t{1} << (decode_rows ? 17 : 20);
  return std::max<int64_t>(1, chunk / std::max<int64_t>(1, madds_per_task));
}

// ------------------------------------------------------------------ tile GEMM

// Vectors per column panel of the micro-kernel: R x kPanelVectors accumulators, the panel's B
// vectors and one broadcast must fit the register file (32 registers with AVX-512, 16 with AVX2).
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kPanelVectors = 4;
#else
constexpr int kPanelVectors = 2;
#endif

// A's element (r, p): A[r * lda + p], or A[p * lda + r] when TransA (so P^T and dS^T products
// read P and dS as they are, with no transposed copy).
template <typename T, bool TransA>
inline T a_at(const T* A, int64_t lda, int r, int64_t p) {
  return TransA ? A[p * lda + r] : A[r * lda + p];
}

// C[R x NV vectors] (+)= A[R x k] * B[k x NV vectors]; row-major.
template <typename T, int R, int NV, bool TransA>
inline void gemm_panel(int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc,
                       bool accumulate) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  V c[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) c[r][v] = V(T(0));
  for (int64_t p = 0; p < k; ++p) {
    V b[NV];
    for (int v = 0; v < NV; ++v) b[v] = V::loadu(B + p * ldb + v * L);
    for (int r = 0; r < R; ++r) {
      const V a(a_at<T, TransA>(A, lda, r, p));
      for (int v = 0; v < NV; ++v) c[r][v] = at::vec::fmadd(a, b[v], c[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) {
      T* dst = C + r * ldc + v * L;
      if (accumulate) c[r][v] = c[r][v] + V::loadu(dst);
      c[r][v].store(dst);
    }
}

// C[R x n] (+)= A[R x k] * B[k x n]; n a multiple of the vector length.
template <typename T, int R, bool TransA>
inline void gemm_block(int64_t n, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                       int64_t ldc, bool accumulate) {
  constexpr int64_t L = Vectorized<T>::size();
  int64_t j = 0;
  for (; j + kPanelVectors * L <= n; j += kPanelVectors * L)
    gemm_panel<T, R, kPanelVectors, TransA>(k, A, lda, B + j, ldb, C + j, ldc, accumulate);
  if (kPanelVectors > 2 && j + 2 * L <= n) {
    gemm_panel<T, R, 2, TransA>(k, A, lda, B + j, ldb, C + j, ldc, accumulate);
    j += 2 * L;
  }
  if (j < n) gemm_panel<T, R, 1, TransA>(k, A, lda, B + j, ldb, C + j, ldc, accumulate);
}

// C[m x n] (+)= op(A)[m x k] * B[k x n], row-major with leading dimensions; op(A) is A, or the
// transpose of a (k x m) A when TransA.
template <typename T, bool TransA = false>
void tile_gemm(int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
               int64_t ldc, bool accumulate) {
  TORCH_INTERNAL_ASSERT(n % Vectorized<T>::size() == 0);
  const auto rows_at = [&](int64_t i) { return TransA ? A + i : A + i * lda; };
  int64_t i = 0;
  for (; i + kMaxRows <= m; i += kMaxRows)
    gemm_block<T, kMaxRows, TransA>(n, k, rows_at(i), lda, B, ldb, C + i * ldc, ldc, accumulate);
  const T* a = rows_at(i);
  T* c = C + i * ldc;
  switch (m - i) {
    case 5: gemm_block<T, 5, TransA>(n, k, a, lda, B, ldb, c, ldc, accumulate); break;
    case 4: gemm_block<T, 4, TransA>(n, k, a, lda, B, ldb, c, ldc, accumulate); break;
    case 3: gemm_block<T, 3, TransA>(n, k, a, lda, B, ldb, c, ldc, accumulate); break;
    case 2: gemm_block<T, 2, TransA>(n, k, a, lda, B, ldb, c, ldc, accumulate); break;
    case 1: gemm_block<T, 1, TransA>(n, k, a, lda, B, ldb, c, ldc, accumulate); break;
    default: break;
  }
}

// ------------------------------------------------------------------ dropout mask

// The draw is csrc/dropout_hash.h's counter-based hash (the dropout op's too), keyed by the score's index.

struct Dropout {
  bool active = false;
  uint64_t seed = 0;
  uint64_t threshold = 0;  // drop when the 24-bit draw is below this (round(p * 2^24))
  double keep_scale = 1.0;

  Dropout(double p, int64_t seed_value) {
    active = p > 0.0;
    seed = static_cast<uint64_t>(seed_value);
    threshold = gptfast_dropout::draw_threshold(p);
    keep_scale = gptfast_dropout::keep_scale(p);
  }
  // Whether score number `counter` ((bh * Tq + i) * Tk + j) survives.
  bool keep(uint64_t counter) const { return gptfast_dropout::keeps(seed, counter, threshold); }
  // mask / (1 - p) for score number `counter`: a factor to multiply by, not a choice between the
  // weight and 0, so a NaN weight stays NaN when dropped, as in torch's dropout (x * mask * scale).
  template <typename T>
  T factor(uint64_t counter) const {
    return keep(counter) ? static_cast<T>(keep_scale) : T(0);
  }
  // Multiplies row[0..n) (keys j0.. of query counter_base) by mask / (1 - p).
  template <typename T>
  void apply(T* row, int64_t n, uint64_t counter_base) const {
    for (int64_t j = 0; j < n; ++j) row[j] *= factor<T>(counter_base + j);
  }
};

// ------------------------------------------------------------------ shapes and loads

struct Dims {
  int64_t B, H, Hkv, Tq, Tk, D, Dp, offset;  // offset = Tk - Tq: query i sits at position offset + i
  int64_t group() const { return Hkv > 0 ? H / Hkv : 1; }  // query heads per kv head (H = H_kv = 0: 1)
};

// Reads an (rows x D) block of a (B, H, T, D) tensor with unit last stride into acc buffer dst
// (leading dimension ld), multiplied by `factor`.
template <typename scalar_t, typename T>
void load_rows(const at::Tensor& t, int64_t b, int64_t h, int64_t row0, int64_t rows, int64_t D, T factor,
               T* dst, int64_t ld) {
  const scalar_t* base = t.const_data_ptr<scalar_t>() + b * t.stride(0) + h * t.stride(1) + row0 * t.stride(2);
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* src = base + r * t.stride(2);
    for (int64_t d = 0; d < D; ++d) dst[r * ld + d] = static_cast<T>(src[d]) * factor;
  }
}

// Same, written transposed: dst[d * ld + r].
template <typename scalar_t, typename T>
void load_rows_transposed(const at::Tensor& t, int64_t b, int64_t h, int64_t row0, int64_t rows, int64_t D,
                          T* dst, int64_t ld) {
  const scalar_t* base = t.const_data_ptr<scalar_t>() + b * t.stride(0) + h * t.stride(1) + row0 * t.stride(2);
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* src = base + r * t.stride(2);
    for (int64_t d = 0; d < D; ++d) dst[d * ld + r] = static_cast<T>(src[d]);
  }
}

// Number of keys in tile [j0, j0 + nk) visible to query i (may be <= 0).
inline int64_t visible_keys(const Dims& s, int64_t i, int64_t j0, int64_t nk) {
  return std::min(nk, s.offset + i - j0 + 1);
}

// How many slices the query heads of one kv head are cut into: one, unless there are fewer
// (batch, kv head) pairs than threads, then enough slices to keep every thread busy.
inline int64_t group_slices(const Dims& s) {
  const int64_t pairs = s.B * s.Hkv, threads = at::get_num_threads();
  if (s.group() == 1 || pairs == 0 || pairs >= threads) return 1;  // (an empty batch has no tasks)
  const int64_t wanted = std::min(s.group(), (threads + pairs - 1) / pairs);
  const int64_t per_slice = (s.group() + wanted - 1) / wanted;
  return (s.group() + per_slice - 1) / per_slice;
}

// ------------------------------------------------------------------ forward

// p[j] = exp(p[j] - mx) for j < n, a vector at a time, NaN kept; returns their sum.  The tile path's online
// softmax and the decode rows' direct path both take it (a decode row's scores are one per key).
template <typename T>
T exp_and_sum(T* p, int64_t n, T mx) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const V vm(mx);
  V vsum(T(0));
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    const V e = exp_keep_nan(V::loadu(p + j) - vm);
    e.store(p + j);
    vsum = vsum + e;
  }
  if (j < n) {
    const V e = V::set(V(T(0)), exp_keep_nan(V::loadu(p + j, n - j) - vm), n - j);
    e.store(p + j, n - j);
    vsum = vsum + e;
  }
  return at::vec::vec_reduce_all<T>([](V x, V y) { return x + y; }, vsum);
}

// Online-softmax update of one score row: turns row[0..nk) into probabilities relative to
// the new running max (zero where masked), rescales the running sum and output row.
template <typename T>
void online_softmax_row(T* row, int64_t valid, int64_t nk, T& m, T& l, T* out_row, int64_t Dp) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  if (valid <= 0) {
    std::fill(row, row + nk, T(0));
    return;
  }
  const T row_max = vec_max(row, valid);  // NaN if the row holds one: it then stays NaN
  const T m_new = std::isnan(row_max) ? row_max : std::max(m, row_max);
  // Shift by 0 while every score seen is -inf (overflowed or -inf keys): (-inf) - (-inf) would put a NaN
  // into the sum and the output row that a later tile's finite scores could never take out.
  const T shift = m_new == -std::numeric_limits<T>::infinity() ? T(0) : m_new;
  // 0 on the first tile (m = -inf); 1 without an exp call when the max did not move
  const T alpha = m_new == m ? T(1) : std::exp(m - shift);
  const T sum = exp_and_sum(row, valid, shift);
  std::fill(row + valid, row + nk, T(0));  // the diagonal tile's masked keys
  l = l * alpha + sum;
  m = m_new;
  if (alpha != T(1)) {
    for (int64_t d = 0; d < Dp; d += L) (V::loadu(out_row + d) * V(alpha)).store(out_row + d);
  }
}

// Decode-sized tasks (one or two query rows): a tile GEMM would spend its time transposing
// K, so score each key with a dot product straight from the (unit-stride) K and V rows.
// 16-bit K and V are widened in registers as they are read (a widened tile copy per task
// measured 3-4x slower than float32 here: the decode step reads each key once).
constexpr int64_t kDirectRows = 2;

// sum over d of a[d] * b[d]; a in T, b in its own dtype (widened as read).
template <typename T, typename scalar_t>
T dot(const T* a, const scalar_t* b, int64_t n) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  V acc0(T(0)), acc1(T(0));
  int64_t d = 0;
  for (; d + 2 * L <= n; d += 2 * L) {
    const auto [lo, hi] = load_pair<T>(b + d);
    acc0 = at::vec::fmadd(V::loadu(a + d), lo, acc0);
    acc1 = at::vec::fmadd(V::loadu(a + d + L), hi, acc1);
  }
  T sum = at::vec::vec_reduce_all<T>([](V x, V y) { return x + y; }, acc0 + acc1);
  for (; d < n; ++d) sum += a[d] * static_cast<T>(b[d]);
  return sum;
}

// out[0..n) += w * x[0..n); x in its own dtype (widened as read).
template <typename T, typename scalar_t>
void axpy(T w, const scalar_t* x, T* out, int64_t n) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const V vw(w);
  int64_t d = 0;
  for (; d + 2 * L <= n; d += 2 * L) {
    const auto [lo, hi] = load_pair<T>(x + d);
    at::vec::fmadd(vw, lo, V::loadu(out + d)).store(out + d);
    at::vec::fmadd(vw, hi, V::loadu(out + d + L)).store(out + d + L);
  }
  for (; d < n; ++d) out[d] += w * static_cast<T>(x[d]);
}

// 16-bit query rows scored together against one kv head's keys: each key and value row is then read and
// widened once for the rows (query heads sharing the kv head), not once per row.  Float rows keep one head
// at a time: with nothing to widen, grouping them measured 1.07-1.18x faster on a warm cache but 0.86-0.96x
// on the cold one a decode step reads (Qwen3-0.6B and Llama 3.2 1B shapes, 2 cores), where 16-bit rows
// gained 1.14-1.27x cold and 1.16-1.36x warm.
constexpr int kGroupRows = 4;

// Vector sums the score loop keeps (two per query row and key): with the row and key vectors they fill
// AVX-512's 32 registers, half of them AVX2's 16.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kScoreSums = 16;
#else
constexpr int kScoreSums = 8;
#endif

// Query rows a decode task scores together for inputs of scalar_t.
template <typename scalar_t>
constexpr int group_rows() {
  return std::is_same_v<scalar_t, acc_t<scalar_t>> ? 1 : kGroupRows;
}

// scores[r * lds + j] = q_r . k_j for NQ query rows (row stride ldq) and the n keys at kbase (row stride
// ks), up to four keys per step: the independent sums keep the FMA units busy where one key's chain of
// D / L multiply-adds would wait on itself, and the keys' rows stream in together.  Every score's sum
// runs in the order of dot(), so it depends neither on NQ nor on which step its key falls in.
template <typename T, typename scalar_t, int NQ>
void score_keys_rows(const T* q, int64_t ldq, const scalar_t* kbase, int64_t ks, int64_t n, int64_t D, T* scores,
                     int64_t lds) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  constexpr int KB = std::min(4, kScoreSums / (2 * NQ));
  const int64_t D2 = D / (2 * L) * (2 * L);
  int64_t j = 0;
  for (; j + KB <= n; j += KB) {
    const scalar_t* k0 = kbase + j * ks;
    V lo[NQ][KB], hi[NQ][KB];
#pragma GCC unroll 4
    for (int r = 0; r < NQ; ++r) {
#pragma GCC unroll 4
      for (int c = 0; c < KB; ++c) lo[r][c] = hi[r][c] = V(T(0));
    }
    for (int64_t d = 0; d < D2; d += 2 * L) {
      V k_lo[KB], k_hi[KB];
#pragma GCC unroll 4
      for (int c = 0; c < KB; ++c) std::tie(k_lo[c], k_hi[c]) = load_pair<T>(k0 + c * ks + d);
#pragma GCC unroll 4  // constant indices keep the sums in registers
      for (int r = 0; r < NQ; ++r) {
        const V q_lo = V::loadu(q + r * ldq + d), q_hi = V::loadu(q + r * ldq + d + L);
#pragma GCC unroll 4
        for (int c = 0; c < KB; ++c) {
          lo[r][c] = at::vec::fmadd(q_lo, k_lo[c], lo[r][c]);
          hi[r][c] = at::vec::fmadd(q_hi, k_hi[c], hi[r][c]);
        }
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < NQ; ++r) {
#pragma GCC unroll 4
      for (int c = 0; c < KB; ++c) {
        T sum = at::vec::vec_reduce_all<T>([](V x, V y) { return x + y; }, lo[r][c] + hi[r][c]);
        for (int64_t d = D2; d < D; ++d) sum += q[r * ldq + d] * static_cast<T>(k0[c * ks + d]);
        scores[r * lds + j + c] = sum;
      }
    }
  }
  for (; j < n; ++j) {
    for (int r = 0; r < NQ; ++r) scores[r * lds + j] = dot<T>(q + r * ldq, kbase + j * ks, D);
  }
}

// acc[r * lda + d] = sum over j of p[r * ldp + j] * v_j[d] for NQ rows of weights and the n value rows at
// vbase (row stride vs), each element summed over the keys in order, whatever NQ.  Keys whose weight is 0
// are multiplied too (an infinite value there gives NaN, as the dense product P V does).  The output
// vectors of a slice of D stay in registers over all keys (four per row, two for four rows) rather than a
// load and a store of the output row per key.
template <typename T, typename scalar_t, int NQ>
void weigh_values_rows(const T* p, int64_t ldp, const scalar_t* vbase, int64_t vs, int64_t n, int64_t D, T* acc,
                       int64_t lda) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  constexpr int VP = NQ <= 2 ? 4 : 2;  // vectors of the output per row and pass (VP / 2 pairs)
  int64_t d = 0;
  for (; d + VP * L <= D; d += VP * L) {
    V a[NQ][VP];
#pragma GCC unroll 4
    for (int r = 0; r < NQ; ++r) {
#pragma GCC unroll 4
      for (int c = 0; c < VP; ++c) a[r][c] = V(T(0));
    }
    for (int64_t j = 0; j < n; ++j) {
      const scalar_t* row = vbase + j * vs + d;
      V v[VP];
#pragma GCC unroll 2
      for (int c = 0; c < VP; c += 2) std::tie(v[c], v[c + 1]) = load_pair<T>(row + c * L);
#pragma GCC unroll 4
      for (int r = 0; r < NQ; ++r) {
        const V w(p[r * ldp + j]);
#pragma GCC unroll 4
        for (int c = 0; c < VP; ++c) a[r][c] = at::vec::fmadd(w, v[c], a[r][c]);
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < NQ; ++r) {
#pragma GCC unroll 4
      for (int c = 0; c < VP; ++c) a[r][c].store(acc + r * lda + d + c * L);
    }
  }
  if (d == D) return;
  for (int r = 0; r < NQ; ++r) {
    std::fill(acc + r * lda + d, acc + r * lda + D, T(0));
    for (int64_t j = 0; j < n; ++j) axpy<T>(p[r * ldp + j], vbase + j * vs + d, acc + r * lda + d, D - d);
  }
}

// Scratch of one thread's decode tasks: up to kGroupRows query rows, their scores and output sums.
template <typename T>
struct DecodeScratch {
  std::vector<T> qs, probs, acc;
  DecodeScratch(const Dims& s) : qs(kGroupRows * s.Dp, T(0)), probs(kGroupRows * s.Tk), acc(kGroupRows * s.Dp) {}
};

// NQ query heads h0.. of batch row b at query index i (already loaded into w.qs, scaled) against their kv
// head's `valid` visible keys: softmax, dropout, P V; writes each head's output row (rounded once to
// scalar_t) and lse.
template <typename T, typename scalar_t, int NQ>
void attend_rows_direct(const scalar_t* kbase, int64_t k_stride, const scalar_t* vbase, int64_t v_stride,
                        int64_t valid, const Dims& s, int64_t b, int64_t h0, int64_t i, const Dropout& dropout,
                        DecodeScratch<T>& w, scalar_t* out_data, T* lse_data) {
  score_keys_rows<T, scalar_t, NQ>(w.qs.data(), s.Dp, kbase, k_stride, valid, s.D, w.probs.data(), s.Tk);
  T mx[NQ], sum[NQ];
  for (int r = 0; r < NQ; ++r) {
    T* probs = w.probs.data() + r * s.Tk;
    const int64_t bh = b * s.H + h0 + r;
    mx[r] = vec_max(probs, valid);
    sum[r] = exp_and_sum(probs, valid, mx[r]);
    if (dropout.active) dropout.apply(probs, valid, static_cast<uint64_t>((bh * s.Tq + i) * s.Tk));
  }
  weigh_values_rows<T, scalar_t, NQ>(w.probs.data(), s.Tk, vbase, v_stride, valid, s.D, w.acc.data(), s.Dp);
  for (int r = 0; r < NQ; ++r) {
    const int64_t bh = b * s.H + h0 + r;
    const T inv = T(1) / sum[r];
    const T* acc = w.acc.data() + r * s.Dp;
    scalar_t* out_row = out_data + (bh * s.Tq + i) * s.D;
    for (int64_t d = 0; d < s.D; ++d) out_row[d] = static_cast<scalar_t>(acc[d] * inv);
    lse_data[bh * s.Tq + i] = mx[r] + std::log(sum[r]);
  }
}

// The keys (transposed) and values of one kv head, widened to acc_t, up to the furthest key a
// task has needed so far.  A thread's chunk takes its tasks in order (query tiles of one head,
// then the heads sharing its kv head), so each k/v row is copied once per chunk rather than
// once per query tile that sees it.
template <typename T>
struct KeyCache {
  std::vector<T> kt, vs;  // (Dp x ld) and (Tk x Dp); allocated on first use (decode tasks never use them)
  int64_t ld = 0, kv = -1, rows = 0;

  template <typename scalar_t>
  void cover(const at::Tensor& k, const at::Tensor& v, int64_t b, int64_t hk, int64_t needed, const Dims& s) {
    if (kt.empty()) {
      ld = round_up(s.Tk, Vectorized<T>::size());
      kt.assign(s.Dp * ld, T(0));
      vs.assign(s.Tk * s.Dp, T(0));
    }
    const int64_t id = b * s.Hkv + hk;
    if (id != kv) {
      kv = id;
      rows = 0;
    }
    if (needed <= rows) return;
    load_rows_transposed<scalar_t, T>(k, b, hk, rows, needed - rows, s.D, kt.data() + rows, ld);
    load_rows<scalar_t, T>(v, b, hk, rows, needed - rows, s.D, T(1), vs.data() + rows * s.Dp, s.Dp);
    rows = needed;
  }
};

// Query heads [h0, h1) of batch row b, all reading one kv head, at query index i: each head's row of q loaded
// (scaled) and attended key by key, group_rows() heads at a time, then two, then one.
template <typename T, typename scalar_t>
void attend_heads(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Dims& s, int64_t b,
                  int64_t h0, int64_t h1, int64_t i, T scale, const Dropout& dropout, DecodeScratch<T>& w,
                  scalar_t* out_data, T* lse_data) {
  constexpr int most = group_rows<scalar_t>();
  const int64_t hk = h0 / s.group(), valid = s.offset + i + 1;
  const scalar_t* kbase = k.const_data_ptr<scalar_t>() + b * k.stride(0) + hk * k.stride(1);
  const scalar_t* vbase = v.const_data_ptr<scalar_t>() + b * v.stride(0) + hk * v.stride(1);
  const auto attend = [&](auto rows) {
    attend_rows_direct<T, scalar_t, decltype(rows)::value>(kbase, k.stride(2), vbase, v.stride(2), valid, s, b, h0,
                                                           i, dropout, w, out_data, lse_data);
  };
  while (h0 < h1) {
    const int nq = h1 - h0 >= most ? most : (h1 - h0 >= 2 && most >= 2 ? 2 : 1);
    for (int r = 0; r < nq; ++r) load_rows<scalar_t, T>(q, b, h0 + r, i, 1, s.D, scale, w.qs.data() + r * s.Dp, s.Dp);
    if constexpr (most > 1) {
      if (nq == kGroupRows) attend(std::integral_constant<int, kGroupRows>{});
      else if (nq == 2) attend(std::integral_constant<int, 2>{});
      else attend(std::integral_constant<int, 1>{});
    } else {
      attend(std::integral_constant<int, 1>{});
    }
    h0 += nq;
  }
}

// Decode-sized calls (Tq <= kDirectRows): one task per (batch row, kv head, slice of its query heads).
template <typename scalar_t>
void decode_forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                         at::Tensor& lse, double scale, const Dropout& dropout, const Dims& s) {
  using T = acc_t<scalar_t>;
  const int64_t slices = group_slices(s), per_slice = (s.group() + slices - 1) / slices;
  scalar_t* out_data = out.data_ptr<scalar_t>();
  T* lse_data = lse.data_ptr<T>();
  at::parallel_for(0, s.B * s.Hkv * slices, grain_for(per_slice * s.Tq * s.Tk * s.Dp, true),
                   [&](int64_t begin, int64_t end) {
    DecodeScratch<T> w(s);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t pair = task / slices, b = pair / s.Hkv, hk = pair % s.Hkv;
      const int64_t first = hk * s.group() + (task % slices) * per_slice;
      const int64_t last = std::min(first + per_slice, (hk + 1) * s.group());
      for (int64_t i = 0; i < s.Tq; ++i)
        attend_heads<T, scalar_t>(q, k, v, s, b, first, last, i, static_cast<T>(scale), dropout, w, out_data, lse_data);
    }
  });
}

template <typename scalar_t>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                  at::Tensor& lse, double scale, const Dropout& dropout, const Dims& s) {
  using T = acc_t<scalar_t>;
  constexpr int64_t L = Vectorized<T>::size();
  if (s.Tq <= kDirectRows) {
    decode_forward_impl<scalar_t>(q, k, v, out, lse, scale, dropout, s);
    return;
  }
  const int64_t n_qtiles = (s.Tq + kQueryTile - 1) / kQueryTile;
  scalar_t* out_data = out.data_ptr<scalar_t>();
  T* lse_data = lse.data_ptr<T>();

  at::parallel_for(0, s.B * s.H * n_qtiles, grain_for(std::min(kQueryTile, s.Tq) * s.Tk * s.Dp, false),
                   [&](int64_t begin, int64_t end) {
    // Scratch, allocated once per chunk; zero-initialised so padding columns stay zero.
    std::vector<T> qs(kQueryTile * s.Dp, T(0));
    std::vector<T> scores(kQueryTile * kKeyTile), acc(kQueryTile * s.Dp), m(kQueryTile), l(kQueryTile);
    KeyCache<T> keys;
    std::optional<DecodeScratch<T>> rows;  // for a last tile of one or two queries
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / n_qtiles, b = bh / s.H, h = bh % s.H, hk = h / s.group();
      const int64_t i0 = (task % n_qtiles) * kQueryTile, mq = std::min(kQueryTile, s.Tq - i0);
      if (mq <= kDirectRows) {  // a prefill's last one or two rows: scored as decode rows are, key by key
        if (!rows) rows.emplace(s);
        for (int64_t i = i0; i < i0 + mq; ++i)
          attend_heads<T, scalar_t>(q, k, v, s, b, h, h + 1, i, static_cast<T>(scale), dropout, *rows, out_data,
                                    lse_data);
        continue;
      }
      load_rows<scalar_t, T>(q, b, h, i0, mq, s.D, static_cast<T>(scale), qs.data(), s.Dp);
      std::fill(acc.begin(), acc.end(), T(0));
      std::fill(m.begin(), m.end(), neg_inf<T>());
      std::fill(l.begin(), l.end(), T(0));
      const int64_t last_key = s.offset + i0 + mq - 1;  // the last query's last visible key
      keys.template cover<scalar_t>(k, v, b, hk, last_key + 1, s);
      for (int64_t j0 = 0; j0 <= last_key; j0 += kKeyTile) {
        const int64_t nk = std::min(kKeyTile, last_key + 1 - j0), nkp = round_up(nk, L);
        tile_gemm<T>(mq, nkp, s.Dp, qs.data(), s.Dp, keys.kt.data() + j0, keys.ld, scores.data(), kKeyTile, false);
        for (int64_t r = 0; r < mq; ++r) {
          T* row = scores.data() + r * kKeyTile;
          const int64_t valid = visible_keys(s, i0 + r, j0, nk);
          online_softmax_row<T>(row, valid, nk, m[r], l[r], acc.data() + r * s.Dp, s.Dp);
          if (dropout.active && valid > 0)
            dropout.apply(row, valid, static_cast<uint64_t>((bh * s.Tq + i0 + r) * s.Tk + j0));
        }
        tile_gemm<T>(mq, s.Dp, nk, scores.data(), kKeyTile, keys.vs.data() + j0 * s.Dp, s.Dp, acc.data(), s.Dp, true);
      }
      for (int64_t r = 0; r < mq; ++r) {
        const T inv = T(1) / l[r];
        scalar_t* dst = out_data + (bh * s.Tq + i0 + r) * s.D;
        for (int64_t d = 0; d < s.D; ++d) dst[d] = static_cast<scalar_t>(acc[r * s.Dp + d] * inv);
        lse_data[bh * s.Tq + i0 + r] = m[r] + std::log(l[r]);
      }
    }
  });
}

// ------------------------------------------------------------------ backward

// Per-task scratch for backward: whole-sequence copies in acc_t, padded widths.  k and v
// (ks, kt, vt) and the dK/dV sums belong to the task's kv head; q, dO, delta and dQ to the
// query head being processed.
template <typename T>
struct BackwardScratch {
  std::vector<T> qs, dout, delta, kt, ks, vt, dq, dk, dv, p, dp, pd;
  BackwardScratch(const Dims& s, int64_t Tkp)
      : qs(s.Tq * s.Dp, T(0)), dout(s.Tq * s.Dp, T(0)), delta(s.Tq), kt(s.Dp * Tkp, T(0)),
        ks(s.Tk * s.Dp, T(0)), vt(s.Dp * Tkp, T(0)), dq(s.Tq * s.Dp), dk(s.Tk * s.Dp), dv(s.Tk * s.Dp),
        p(kQueryTile * kKeyTile), dp(kQueryTile * kKeyTile), pd(kQueryTile * kKeyTile) {}
};

// pd = P * mask / (1 - p) for a (mq x nk) tile of P: what multiplied V in the forward (0 past a row's
// visible keys).
template <typename T>
void keep_dropped(const T* p, T* pd, int64_t mq, int64_t nk, int64_t i0, int64_t j0, int64_t bh,
                  const Dropout& dropout, const Dims& s) {
  for (int64_t r = 0; r < mq; ++r) {
    const uint64_t base = static_cast<uint64_t>((bh * s.Tq + i0 + r) * s.Tk + j0);
    const int64_t valid = std::max<int64_t>(0, visible_keys(s, i0 + r, j0, nk));
    for (int64_t jj = 0; jj < nk; ++jj)
      pd[r * kKeyTile + jj] = jj < valid ? p[r * kKeyTile + jj] * dropout.factor<T>(base + jj) : T(0);
  }
}

// Adds query head (b, h)'s contributions to the task's dK/dV sums (w.dk, w.dv, whose k/v rows
// are already loaded) and writes its dQ.
template <typename scalar_t, typename T>
void backward_query_head(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& out, const T* lse_data,
                         at::Tensor& dq, int64_t b, int64_t h, T scale_t, const Dropout& dropout, const Dims& s,
                         int64_t Tkp, BackwardScratch<T>& w) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const int64_t bh = b * s.H + h;
  load_rows<scalar_t, T>(q, b, h, 0, s.Tq, s.D, scale_t, w.qs.data(), s.Dp);
  load_rows<scalar_t, T>(grad_out, b, h, 0, s.Tq, s.D, T(1), w.dout.data(), s.Dp);
  // delta_i = rowsum(dO_i * O_i): the softmax-backward correction term.
  const scalar_t* out_bh = out.const_data_ptr<scalar_t>() + b * out.stride(0) + h * out.stride(1);
  for (int64_t i = 0; i < s.Tq; ++i) w.delta[i] = dot<T>(w.dout.data() + i * s.Dp, out_bh + i * out.stride(2), s.D);
  std::fill(w.dq.begin(), w.dq.end(), T(0));
  const T* lse_bh = lse_data + bh * s.Tq;

  for (int64_t j0 = 0; j0 < s.Tk; j0 += kKeyTile) {
    const int64_t nk = std::min(kKeyTile, s.Tk - j0), nkp = round_up(nk, L);
    const int64_t first_query = std::max<int64_t>(0, j0 - s.offset);  // first query seeing key j0
    for (int64_t i0 = first_query / kQueryTile * kQueryTile; i0 < s.Tq; i0 += kQueryTile) {
      const int64_t mq = std::min(kQueryTile, s.Tq - i0);
      T* p = w.p.data();
      T* dp = w.dp.data();
      // P = exp(S - lse), masked; S = (scale q) k^T
      tile_gemm<T>(mq, nkp, s.Dp, w.qs.data() + i0 * s.Dp, s.Dp, w.kt.data() + j0, Tkp, p, kKeyTile, false);
      // dP_dropped = dO V^T
      tile_gemm<T>(mq, nkp, s.Dp, w.dout.data() + i0 * s.Dp, s.Dp, w.vt.data() + j0, Tkp, dp, kKeyTile, false);
      for (int64_t r = 0; r < mq; ++r) {
        T* prow = p + r * kKeyTile;
        const int64_t valid = std::max<int64_t>(0, visible_keys(s, i0 + r, j0, nk));
        const V vl(lse_bh[i0 + r]);
        int64_t j = 0;
        for (; j + L <= valid; j += L) exp_keep_nan(V::loadu(prow + j) - vl).store(prow + j);
        if (j < valid) {  // partial vector: masked lanes become 0
          V::set(V(T(0)), exp_keep_nan(V::loadu(prow + j, valid - j) - vl), valid - j).store(prow + j);
          j += L;
        }
        if (j < nkp) std::fill(prow + j, prow + nkp, T(0));
      }
      // dV += P_dropped^T dO, read straight from the (queries x keys) buffer. Without dropout
      // P_dropped is P, so it runs before P is overwritten by dS.
      const T* p_dropped = p;
      if (dropout.active) {
        keep_dropped(p, w.pd.data(), mq, nk, i0, j0, bh, dropout, s);
        p_dropped = w.pd.data();
      }
      tile_gemm<T, true>(nk, s.Dp, mq, p_dropped, kKeyTile, w.dout.data() + i0 * s.Dp, s.Dp,
                         w.dv.data() + j0 * s.Dp, s.Dp, true);
      // dS = P * (dP - delta), with dP = dP_dropped * mask / (1 - p), over the keys the row sees (a
      // NaN in dO or delta reaches them as through torch's softmax); 0 behind the causal mask, where
      // the oracle's masked_fill zeroes the gradient whatever dP holds.
      for (int64_t r = 0; r < mq; ++r) {
        T* prow = p + r * kKeyTile;
        const T* dprow = dp + r * kKeyTile;
        const T delta = w.delta[i0 + r];
        const int64_t valid = std::max<int64_t>(0, visible_keys(s, i0 + r, j0, nk));
        if (dropout.active) {
          const T* pdrow = w.pd.data() + r * kKeyTile;
          // P * dP_dropped * mask / (1 - p) is P_dropped * dP_dropped.
          for (int64_t jj = 0; jj < valid; ++jj) prow[jj] = pdrow[jj] * dprow[jj] - prow[jj] * delta;
        } else {
          const V vd(delta);
          int64_t jj = 0;
          for (; jj + L <= valid; jj += L) {
            const V pv = V::loadu(prow + jj);
            (pv * (V::loadu(dprow + jj) - vd)).store(prow + jj);
          }
          for (; jj < valid; ++jj) prow[jj] = prow[jj] * (dprow[jj] - delta);
        }
        std::fill(prow + valid, prow + nk, T(0));
      }
      // dQ += dS K ; dK += dS^T (scale q)  (dQ's scale is applied at the end)
      tile_gemm<T>(mq, s.Dp, nk, p, kKeyTile, w.ks.data() + j0 * s.Dp, s.Dp, w.dq.data() + i0 * s.Dp, s.Dp, true);
      tile_gemm<T, true>(nk, s.Dp, mq, p, kKeyTile, w.qs.data() + i0 * s.Dp, s.Dp, w.dk.data() + j0 * s.Dp, s.Dp,
                         true);
    }
  }
  scalar_t* dq_dst = dq.data_ptr<scalar_t>() + bh * s.Tq * s.D;
  for (int64_t i = 0; i < s.Tq; ++i)
    for (int64_t d = 0; d < s.D; ++d) dq_dst[i * s.D + d] = static_cast<scalar_t>(w.dq[i * s.Dp + d] * scale_t);
}

// Writes rows (Tk x D) of a padded (Tk x Dp) buffer to dst, converting to out_t.
template <typename out_t, typename T>
void store_rows(const std::vector<T>& src, int64_t rows, const Dims& s, out_t* dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < s.D; ++d) dst[r * s.D + d] = static_cast<out_t>(src[r * s.Dp + d]);
}

template <typename scalar_t>
void backward_impl(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                   double scale, const Dropout& dropout, const Dims& s) {
  using T = acc_t<scalar_t>;
  constexpr int64_t L = Vectorized<T>::size();
  const int64_t Tkp = round_up(s.Tk, L) + kKeyTile;  // room for a padded tile at any j0
  const T* lse_data = lse.const_data_ptr<T>();
  const T scale_t = static_cast<T>(scale);
  const int64_t slices = group_slices(s), per_slice = (s.group() + slices - 1) / slices;
  // With several slices per kv head, each writes its partial dK/dV sums here (summed below).
  at::Tensor partial_dk, partial_dv;
  if (slices > 1) {
    partial_dk = at::empty({slices, s.B, s.Hkv, s.Tk, s.D}, lse.options());
    partial_dv = at::empty({slices, s.B, s.Hkv, s.Tk, s.D}, lse.options());
  }

  at::parallel_for(0, s.B * s.Hkv * slices, grain_for(2 * per_slice * s.Tq * s.Tk * s.Dp, false),
                   [&](int64_t begin, int64_t end) {
    BackwardScratch<T> w(s, Tkp);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t slice = task % slices, bkv = task / slices, b = bkv / s.Hkv, hk = bkv % s.Hkv;
      load_rows<scalar_t, T>(k, b, hk, 0, s.Tk, s.D, T(1), w.ks.data(), s.Dp);
      load_rows_transposed<scalar_t, T>(k, b, hk, 0, s.Tk, s.D, w.kt.data(), Tkp);
      load_rows_transposed<scalar_t, T>(v, b, hk, 0, s.Tk, s.D, w.vt.data(), Tkp);
      std::fill(w.dk.begin(), w.dk.end(), T(0));
      std::fill(w.dv.begin(), w.dv.end(), T(0));
      const int64_t g_end = std::min(s.group(), (slice + 1) * per_slice);
      for (int64_t g = slice * per_slice; g < g_end; ++g)
        backward_query_head<scalar_t, T>(grad_out, q, out, lse_data, dq, b, hk * s.group() + g, scale_t, dropout,
                                         s, Tkp, w);
      if (slices == 1) {
        store_rows(w.dk, s.Tk, s, dk.data_ptr<scalar_t>() + bkv * s.Tk * s.D);
        store_rows(w.dv, s.Tk, s, dv.data_ptr<scalar_t>() + bkv * s.Tk * s.D);
      } else {
        const int64_t offset = (slice * s.B * s.Hkv + bkv) * s.Tk * s.D;
        store_rows(w.dk, s.Tk, s, partial_dk.data_ptr<T>() + offset);
        store_rows(w.dv, s.Tk, s, partial_dv.data_ptr<T>() + offset);
      }
    }
  });
  if (slices > 1) {
    dk.copy_(partial_dk.sum(0));
    dv.copy_(partial_dv.sum(0));
  }
}

// ------------------------------------------------------------------ checks and entry points

at::Tensor unit_last_stride(const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); }

Dims check_and_dims(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t vec_len) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "gptfast_cpu attention: q, k, v must be 4-D");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "gptfast_cpu attention: tensors must be on the CPU");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "gptfast_cpu attention: q, k, v must share one dtype");
  TORCH_CHECK(k.sizes() == v.sizes(), "gptfast_cpu attention: k and v shapes differ");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3),
              "gptfast_cpu attention: q and k disagree in batch or head_dim");
  // A group of zero query heads per key/value head would divide by zero in the head loops.
  TORCH_CHECK(k.size(1) == q.size(1) || (k.size(1) >= 1 && q.size(1) >= k.size(1) && q.size(1) % k.size(1) == 0),
              "gptfast_cpu attention: q's heads must be a multiple of k's heads, got ", q.size(1), " and ", k.size(1));
  TORCH_CHECK(q.size(2) >= 1 && q.size(2) <= k.size(2), "gptfast_cpu attention: need 1 <= Tq <= Tk");
  Dims s{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), 0, k.size(2) - q.size(2)};
  s.Dp = round_up(s.D, vec_len);
  return s;
}

int64_t vec_len_for(at::ScalarType dtype) {
  return dtype == at::kDouble ? Vectorized<double>::size() : Vectorized<float>::size();
}

at::ScalarType acc_dtype(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

// The dropout key: the value of the one-element int64 `seed` tensor (required when dropout_p > 0).
int64_t seed_value(double dropout_p, const c10::optional<at::Tensor>& seed) {
  if (dropout_p == 0.0) return 0;
  TORCH_CHECK(seed.has_value(), "gptfast_cpu attention: dropout_p > 0 needs a seed tensor");
  TORCH_CHECK(seed->device().is_cpu() && seed->scalar_type() == at::kLong && seed->numel() >= 1,
              "gptfast_cpu attention: seed must be an int64 CPU tensor with >= 1 element");
  return seed->reshape({-1})[0].item<int64_t>();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q_in, const at::Tensor& k_in,
                                                 const at::Tensor& v_in, double scale, double dropout_p,
                                                 const c10::optional<at::Tensor>& seed) {
  const Dims s = check_and_dims(q_in, k_in, v_in, vec_len_for(q_in.scalar_type()));
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, "gptfast_cpu attention: dropout_p must be in [0, 1]");
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  at::Tensor out = at::empty({s.B, s.H, s.Tq, s.D}, q.options());
  at::Tensor lse = at::empty({s.B, s.H, s.Tq}, q.options().dtype(acc_dtype(q.scalar_type())));
  const Dropout dropout(dropout_p, seed_value(dropout_p, seed));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "gptfast_cpu_attention_forward",
                                  [&] { forward_impl<scalar_t>(q, k, v, out, lse, scale, dropout, s); });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, double scale, double dropout_p,
    const c10::optional<at::Tensor>& seed) {
  const Dims s = check_and_dims(q_in, k_in, v_in, vec_len_for(q_in.scalar_type()));
  TORCH_CHECK(grad_out_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(),
              "gptfast_cpu attention backward: grad_out and out must have q's shape");
  TORCH_CHECK(grad_out_in.scalar_type() == q_in.scalar_type() && out_in.scalar_type() == q_in.scalar_type(),
              "gptfast_cpu attention backward: grad_out and out must have q's dtype");
  TORCH_CHECK(lse_in.dim() == 3 && lse_in.size(0) == s.B && lse_in.size(1) == s.H && lse_in.size(2) == s.Tq &&
                  lse_in.scalar_type() == acc_dtype(q_in.scalar_type()),
              "gptfast_cpu attention backward: lse must be (B, H, Tq) in the accumulation dtype");
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const at::Tensor grad_out = unit_last_stride(grad_out_in), out = unit_last_stride(out_in);
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor dq = at::empty({s.B, s.H, s.Tq, s.D}, q.options());
  at::Tensor dk = at::empty({s.B, s.Hkv, s.Tk, s.D}, q.options());
  at::Tensor dv = at::empty({s.B, s.Hkv, s.Tk, s.D}, q.options());
  const Dropout dropout(dropout_p, seed_value(dropout_p, seed));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "gptfast_cpu_attention_backward", [&] {
    backward_impl<scalar_t>(grad_out, q, k, v, out, lse, dq, dk, dv, scale, dropout, s);
  });
  return {dq, dk, dv};
}

}  // namespace gptfast_cpu
