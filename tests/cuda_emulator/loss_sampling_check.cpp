// Checks cross_entropy.cu and sampling.cu through their host launchers on the CPU
// emulator (emu.h): every result is compared with a double-precision reference
// computed here.  Plain host code: build.py links it with the emulated kernels.
// Usage: loss_sampling_check {cross_entropy|sampling} {quick|full}; prints "FAIL ..."
// lines and "N failures", exits non-zero on any mismatch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "check_main.h"
#include "loss_sampling_launch.h"

using namespace gptfast;

static int failures = 0;
#define CHECK(cond, ...)                                      \
  do {                                                        \
    if (!(cond)) {                                            \
      if (++failures < 40) {                                  \
        std::printf("FAIL %s:%d: ", __FILE__, __LINE__);      \
        std::printf(__VA_ARGS__);                             \
        std::printf("\n");                                    \
      }                                                       \
    }                                                         \
  } while (0)

template <typename T> T from_f(float x);
template <> float from_f<float>(float x) { return x; }
template <> __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
static float to_f(float x) { return x; }
static float to_f(__half x) { return __half2float(x); }
static float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> FloatType ftype();
template <> FloatType ftype<float>() { return FloatType::kFloat32; }
template <> FloatType ftype<__half>() { return FloatType::kFloat16; }
template <> FloatType ftype<__nv_bfloat16>() { return FloatType::kBFloat16; }
template <typename T> const char* tname();
template <> const char* tname<float>() { return "f32"; }
template <> const char* tname<__half>() { return "f16"; }
template <> const char* tname<__nv_bfloat16>() { return "bf16"; }
template <typename T> double grad_tol();
template <> double grad_tol<float>() { return 2e-6; }
template <> double grad_tol<__half>() { return 1e-3; }
template <> double grad_tol<__nv_bfloat16>() { return 8e-3; }

// ------------------------------------------------------------------ cross-entropy

template <typename T, typename Index>
void test_cross_entropy(int64_t rows, int64_t vocab, int64_t offset, int64_t pad, int grad_mode, unsigned seed) {
  // grad_mode 0: no grad, 1: separate buffer (offset by one element when pad is odd), 2: in place
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  const int64_t stride = vocab + pad;
  std::vector<T> buf(offset + (rows - 1) * stride + vocab);  // exact size: ASan catches reads past the end
  for (auto& v : buf) v = from_f<T>(normal(rng));
  const std::vector<T> original = buf;
  std::vector<Index> targets(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const int kind = static_cast<int>(r % 7);
    targets[r] = static_cast<Index>(kind == 3 ? -100 : kind == 5 ? vocab : kind == 6 && rows > 6 ? -7
                                                                     : static_cast<int64_t>(rng() % vocab));
  }
  std::vector<float> loss(rows, -1.0f);
  const int64_t goff = pad % 2;
  std::vector<T> gbuf(grad_mode == 1 ? goff + rows * vocab : 0);
  void* grad = grad_mode == 0 ? nullptr : grad_mode == 1 ? static_cast<void*>(gbuf.data() + goff)
                                                          : static_cast<void*>(buf.data() + offset);
  const int64_t grad_stride = grad_mode == 2 ? stride : vocab;
  const cudaError_t status =
      launch_cross_entropy_fwd(buf.data() + offset, stride, ftype<T>(), targets.data(), sizeof(Index) == 8, rows,
                               vocab, -100, loss.data(), grad, grad_stride, nullptr);
  CHECK(status == cudaSuccess, "launch failed");
  for (int64_t r = 0; r < rows; ++r) {
    const T* x = original.data() + offset + r * stride;
    const int64_t t = static_cast<int64_t>(targets[r]);
    const bool ignored = t == -100, bad = !ignored && (t < 0 || t >= vocab);
    double m = -INFINITY, s = 0;
    for (int64_t j = 0; j < vocab; ++j) m = std::max(m, static_cast<double>(to_f(x[j])));
    for (int64_t j = 0; j < vocab; ++j) s += std::exp(to_f(x[j]) - m);
    const double lse = m + std::log(s);
    const double ref = ignored ? 0.0 : bad ? NAN : lse - to_f(x[t]);
    if (bad) {
      CHECK(std::isnan(loss[r]), "%s ce V=%lld row %lld bad target: loss %g not NaN", tname<T>(), (long long)vocab,
            (long long)r, loss[r]);
    } else {
      CHECK(std::fabs(loss[r] - ref) <= 2e-5 * std::max(1.0, std::fabs(ref)),
            "%s ce V=%lld off=%lld row %lld: loss %.7g vs %.7g", tname<T>(), (long long)vocab, (long long)offset,
            (long long)r, loss[r], ref);
    }
    if (grad_mode == 0) continue;
    const T* g = grad_mode == 1 ? gbuf.data() + goff + r * vocab : buf.data() + offset + r * stride;
    int bad_count = 0;
    for (int64_t j = 0; j < vocab; ++j) {
      const double expected = ignored ? 0.0 : std::exp(to_f(x[j]) - lse) - (j == t ? 1.0 : 0.0);
      const double got = to_f(g[j]);
      const bool ok = bad ? std::isnan(got) : std::fabs(got - expected) <= grad_tol<T>() * (1 + std::fabs(expected));
      if (!ok && bad_count++ < 3)
        CHECK(false, "%s ce grad V=%lld off=%lld mode=%d row %lld col %lld: %g vs %g", tname<T>(), (long long)vocab,
              (long long)offset, grad_mode, (long long)r, (long long)j, got, expected);
    }
  }
  if (grad_mode == 2) {  // the padding between rows must be untouched
    for (int64_t r = 0; r + 1 < rows; ++r)
      for (int64_t j = vocab; j < stride; ++j) {
        const int64_t i = offset + r * stride + j;
        CHECK(to_f(buf[i]) == to_f(original[i]) || (std::isnan(to_f(buf[i])) && std::isnan(to_f(original[i]))),
              "in-place grad wrote into the padding");
      }
  }
}

// Rows the random ones never hold, one kind per row (V = 37, target 5 unless ignored):
// 0 NaN first, 1 +inf last, 2 all -inf (loss and gradient NaN: no softmax); 3 a -inf target
// (loss +inf, gradient finite); 4 ignored with a NaN (loss 0, gradient NaN as in PyTorch);
// 5 ignored (loss 0, gradient 0); 6 confident with large logits: a loss of ~5e-5 next to a max
// of 1000 must keep its digits (a relative check; the random rows' check is absolute there).
template <typename T>
void test_cross_entropy_special_rows() {
  constexpr int64_t rows = 7, vocab = 37, target = 5;
  std::vector<T> x(rows * vocab);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < vocab; ++j) x[r * vocab + j] = from_f<T>(0.25f * static_cast<float>((j * 7 + r) % 11) - 1.0f);
  const float inf = std::numeric_limits<float>::infinity();
  x[0 * vocab + 0] = from_f<T>(NAN);
  x[1 * vocab + vocab - 1] = from_f<T>(inf);
  for (int64_t j = 0; j < vocab; ++j) x[2 * vocab + j] = from_f<T>(-inf);
  x[3 * vocab + target] = from_f<T>(-inf);
  x[4 * vocab + 9] = from_f<T>(NAN);
  for (int64_t j = 0; j < vocab; ++j) x[6 * vocab + j] = from_f<T>(j == target ? 1000.0f : 988.0f - static_cast<float>(j % 3));
  std::vector<int64_t> targets = {target, target, target, target, -100, -100, target};
  std::vector<float> loss(rows, -1.0f);
  std::vector<T> g(rows * vocab);
  CHECK(launch_cross_entropy_fwd(x.data(), vocab, ftype<T>(), targets.data(), true, rows, vocab, -100, loss.data(),
                                 g.data(), vocab, nullptr) == cudaSuccess, "launch failed");
  auto all_nan = [&](int64_t r) {
    for (int64_t j = 0; j < vocab; ++j) if (!std::isnan(to_f(g[r * vocab + j]))) return false;
    return true;
  };
  for (int64_t r : {0, 1, 2}) CHECK(std::isnan(loss[r]) && all_nan(r), "%s ce special row %lld: loss %g", tname<T>(), (long long)r, loss[r]);
  CHECK(loss[3] == inf && to_f(g[3 * vocab + target]) == -1.0f, "%s ce -inf target: loss %g grad %g", tname<T>(), loss[3],
        to_f(g[3 * vocab + target]));
  CHECK(loss[4] == 0.0f && all_nan(4), "%s ce ignored NaN row: loss %g", tname<T>(), loss[4]);
  bool zero = loss[5] == 0.0f;
  for (int64_t j = 0; j < vocab; ++j) zero &= to_f(g[5 * vocab + j]) == 0.0f;
  CHECK(zero, "%s ce ignored row: loss %g or a gradient not 0", tname<T>(), loss[5]);
  double m = -INFINITY, s = 0;
  for (int64_t j = 0; j < vocab; ++j) m = std::max(m, static_cast<double>(to_f(x[6 * vocab + j])));
  for (int64_t j = 0; j < vocab; ++j) s += std::exp(to_f(x[6 * vocab + j]) - m);
  const double ref = (m - to_f(x[6 * vocab + target])) + std::log(s);
  CHECK(ref < 1e-3 && std::fabs(loss[6] - ref) <= 1e-2 * ref, "%s ce confident row: loss %.7g vs %.7g", tname<T>(),
        loss[6], ref);
}

// ------------------------------------------------------------------ sampling

struct SampleArgs {
  std::vector<float> temps;  // empty: temperature_value for all rows
  float temperature_value = 1.0f;
  std::vector<int64_t> ks;  // empty: top_k_value
  int64_t top_k_value = 0;
  uint64_t seed = 42, offset = 0;
  bool captured = false;
};

template <typename T>
std::vector<int64_t> sample(const std::vector<T>& buf, int64_t offset, int64_t stride, int64_t rows, int64_t vocab,
                            const SampleArgs& a) {
  std::vector<int64_t> out(rows, -1);
  PhiloxLaunchArgs rng{};
  int64_t seed_cell = static_cast<int64_t>(a.seed), offset_cell = static_cast<int64_t>(a.offset) - 8;
  if (a.captured) {
    rng.captured = true;
    rng.seed_ptr = &seed_cell;
    rng.offset_ptr = &offset_cell;
    rng.offset_intragraph = 8;
  } else {
    rng.seed = a.seed;
    rng.offset = a.offset;
  }
  const cudaError_t status = launch_sample_next_token(
      buf.data() + offset, stride, ftype<T>(), rows, vocab, a.temps.empty() ? nullptr : a.temps.data(),
      a.temperature_value, a.ks.empty() ? nullptr : a.ks.data(), a.top_k_value, rng, out.data(), nullptr);
  CHECK(status == cudaSuccess, "sampling launch failed");
  for (int64_t r = 0; r < rows; ++r)
    CHECK(out[r] >= 0 && out[r] < vocab, "token %lld out of range [0, %lld)", (long long)out[r], (long long)vocab);
  return out;
}

static int64_t ref_argmax(const std::vector<float>& x) {
  int64_t best = 0;
  for (int64_t j = 1; j < static_cast<int64_t>(x.size()); ++j) {
    const bool jn = std::isnan(x[j]), bn = std::isnan(x[best]);
    if (bn) break;
    if (jn || x[j] > x[best]) best = j;
  }
  return best;
}

static float kth_largest(std::vector<float> x, int64_t k) {
  std::sort(x.begin(), x.end(), [](float a, float b) { return a > b; });
  return x[k - 1];
}

template <typename T>
std::vector<float> row_values(const std::vector<T>& buf, int64_t offset, int64_t stride, int64_t r, int64_t vocab) {
  std::vector<float> x(vocab);
  for (int64_t j = 0; j < vocab; ++j) x[j] = to_f(buf[offset + r * stride + j]);
  return x;
}

template <typename T>
void test_greedy(int64_t rows, int64_t vocab, int64_t offset, int64_t pad, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> small(-3, 3);
  const int64_t stride = vocab + pad;
  std::vector<T> buf(offset + (rows - 1) * stride + vocab);
  for (auto& v : buf) v = from_f<T>(static_cast<float>(small(rng)) * 0.5f);  // many ties
  if (rows > 2 && vocab > 3) {
    buf[offset + 1 * stride + vocab / 2] = from_f<T>(NAN);  // NaN wins, first NaN
    buf[offset + 1 * stride + vocab - 1] = from_f<T>(NAN);
    for (int64_t j = 0; j < vocab; ++j) buf[offset + 2 * stride + j] = from_f<T>(-INFINITY);
  }
  for (int variant = 0; variant < 3; ++variant) {
    SampleArgs a;
    a.temperature_value = 0.0f;
    a.top_k_value = variant == 0 ? vocab : variant == 1 ? 1 : 3;
    if (variant == 2) {  // per-row temperatures that all mean greedy
      a.temps.assign(rows, 0.0f);
      for (int64_t r = 0; r < rows; ++r) a.temps[r] = r % 3 == 0 ? -1.0f : r % 3 == 1 ? NAN : 0.0f;
    }
    const auto out = sample(buf, offset, stride, rows, vocab, a);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t expected = ref_argmax(row_values(buf, offset, stride, r, vocab));
      CHECK(out[r] == expected, "%s greedy V=%lld off=%lld variant %d row %lld: %lld vs %lld", tname<T>(),
            (long long)vocab, (long long)offset, variant, (long long)r, (long long)out[r], (long long)expected);
    }
  }
}

// Many draws of one row: tokens stay in the top-k support (ties kept) and, at a huge
// temperature, every supported token shows up.
template <typename T>
void test_support(int64_t vocab, int64_t k, int64_t draws, int levels, unsigned seed, int64_t offset) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> level(0, levels - 1);
  std::vector<float> row(vocab);
  for (auto& v : row) v = static_cast<float>(level(rng)) - levels / 2.0f + (rng() % 2 ? 0.0f : -0.0f);
  std::vector<T> buf(offset + draws * vocab);
  for (int64_t r = 0; r < draws; ++r)
    for (int64_t j = 0; j < vocab; ++j) buf[offset + r * vocab + j] = from_f<T>(row[j]);
  std::vector<float> quantized = row_values(buf, offset, vocab, 0, vocab);
  const float kth = kth_largest(quantized, std::min<int64_t>(std::max<int64_t>(k, 1), vocab));
  SampleArgs a;
  a.temperature_value = 1e4f;
  a.top_k_value = k;
  a.seed = seed;
  a.offset = 4 * 1000;
  const auto out = sample(buf, offset, vocab, draws, vocab, a);
  std::set<int64_t> seen(out.begin(), out.end()), support;
  for (int64_t j = 0; j < vocab; ++j)
    if (quantized[j] >= kth) support.insert(j);
  for (int64_t t : seen)
    CHECK(support.count(t), "%s support V=%lld k=%lld: token %lld (value %g) below the k-th value %g", tname<T>(),
          (long long)vocab, (long long)k, (long long)t, quantized[t], kth);
  if (support.size() * 12 <= static_cast<size_t>(draws))
    CHECK(seen.size() == support.size(), "%s support V=%lld k=%lld: saw %zu of %zu kept tokens", tname<T>(),
          (long long)vocab, (long long)k, seen.size(), support.size());
}

// Frequencies of one row sampled `draws` times vs softmax(x / T) over the top-k set.
template <typename T>
void test_distribution(int64_t vocab, int64_t k, float temperature, int64_t draws, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::vector<float> row(vocab);
  for (auto& v : row) v = normal(rng);
  std::vector<T> buf(draws * vocab);
  for (int64_t r = 0; r < draws; ++r)
    for (int64_t j = 0; j < vocab; ++j) buf[r * vocab + j] = from_f<T>(row[j]);
  const auto q = row_values(buf, 0, vocab, 0, vocab);
  const float kth = kth_largest(q, k);
  SampleArgs a;
  a.temperature_value = temperature;
  a.top_k_value = k;
  a.seed = seed * 7919u + 1;
  const auto out = sample(buf, 0, vocab, draws, vocab, a);
  std::vector<double> p(vocab, 0.0), counts(vocab, 0.0);
  double z = 0;
  for (int64_t j = 0; j < vocab; ++j)
    if (q[j] >= kth) z += p[j] = std::exp(q[j] / temperature);
  for (int64_t t : out) counts[t] += 1;
  double chi2 = 0;
  int dof = -1;
  for (int64_t j = 0; j < vocab; ++j) {
    if (p[j] == 0) {
      CHECK(counts[j] == 0, "%s distribution: token %lld outside the top-k set drawn", tname<T>(), (long long)j);
      continue;
    }
    const double expected = p[j] / z * draws;
    chi2 += (counts[j] - expected) * (counts[j] - expected) / expected;
    ++dof;
  }
  // Wilson-Hilferty 99.99% quantile
  const double zq = 3.719, bound = dof * std::pow(1 - 2.0 / (9 * dof) + zq * std::sqrt(2.0 / (9 * dof)), 3);
  CHECK(chi2 < bound, "%s distribution V=%lld k=%lld T=%g: chi2 %.1f > %.1f", tname<T>(), (long long)vocab,
        (long long)k, temperature, chi2, bound);
}

template <typename T>
void test_rng_plumbing(int64_t rows, int64_t vocab) {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<T> buf(rows * vocab);
  for (auto& v : buf) v = from_f<T>(normal(rng));
  SampleArgs a;
  a.temperature_value = 1.0f;
  a.top_k_value = vocab;
  a.seed = 1234;
  a.offset = 400;
  const auto first = sample(buf, 0, vocab, rows, vocab, a);
  CHECK(sample(buf, 0, vocab, rows, vocab, a) == first, "same seed/offset, different tokens");
  a.captured = true;
  CHECK(sample(buf, 0, vocab, rows, vocab, a) == first, "graph-captured seed/offset pointers disagree");
  a.captured = false;
  a.offset += 4 * sampling_philox_counters(vocab);
  CHECK(sample(buf, 0, vocab, rows, vocab, a) != first, "next offset, same tokens");
  a.offset -= 4 * sampling_philox_counters(vocab);
  a.seed += 1;
  CHECK(sample(buf, 0, vocab, rows, vocab, a) != first, "next seed, same tokens");
}

template <typename T>
void test_per_row_clamping(int64_t vocab) {
  const int64_t rows = 6;
  std::vector<T> buf(rows * vocab);
  std::mt19937 rng(9);
  for (auto& v : buf) v = from_f<T>(static_cast<float>(rng() % 5));
  SampleArgs a;
  a.temps = {1.0f, 1.0f, 1.0f, 1.0f, 0.0f, std::numeric_limits<float>::denorm_min()};
  a.ks = {0, -5, vocab + 10, 1, 2, 3};  // 0 and -5 -> 1 (ties at the max), vocab + 10 -> vocab
  for (unsigned s = 0; s < 8; ++s) {
    a.seed = s;
    const auto out = sample(buf, 0, vocab, rows, vocab, a);
    for (int64_t r : {0, 1, 3}) {
      const auto x = row_values(buf, 0, vocab, r, vocab);
      CHECK(x[out[r]] == *std::max_element(x.begin(), x.end()), "top_k<=1 row %lld drew a non-maximal token",
            (long long)r);
    }
    CHECK(out[4] == ref_argmax(row_values(buf, 0, vocab, 4, vocab)), "temperature 0 row not greedy");
    CHECK(out[5] == ref_argmax(row_values(buf, 0, vocab, 5, vocab)), "denormal temperature row not greedy");
  }
}

// quick: a subset that still covers every code path (alignment head/body/tail, in-place
// and separate gradients, ignore/bad targets, int32 targets, every block size) for the
// pytest run; full: more vocabularies and offsets.
template <typename T>
void run_cross_entropy(bool quick) {
  std::printf("cross_entropy %s\n", tname<T>());
  std::fflush(stdout);
  const std::vector<int64_t> ce_vocabs = quick ? std::vector<int64_t>{1, 7, 9, 1031, 9000, 50257}
                                               : std::vector<int64_t>{1, 3, 7, 8, 9, 33, 1000, 1031, 4097, 9000,
                                                                      33000, 50257};
  for (int64_t vocab : ce_vocabs)
    for (int64_t offset : {0, 1, 3})
      for (int mode : {0, 1, 2}) {
        if (vocab >= 9000 && (offset == 3 || mode == 0)) continue;  // keep the run short
        if (quick && (offset == 3 || (mode == 0 && vocab > 9))) continue;
        const int64_t rows = vocab >= 9000 ? (quick ? 2 : 3) : 8;
        test_cross_entropy<T, int64_t>(rows, vocab, offset, offset == 1 ? 5 : 0, mode, 11u * vocab + offset);
      }
  test_cross_entropy<T, int32_t>(8, 515, 2, 1, 1, 5);
  test_cross_entropy_special_rows<T>();
}

// quick: greedy (ties, NaN, -inf rows), top-k support with ties (radix select), the
// distribution, RNG plumbing and per-row clamping, with fewer draws than full.
template <typename T>
void run_sampling(bool quick) {
  std::printf("sampling %s\n", tname<T>());
  std::fflush(stdout);
  const int64_t scale = quick ? 3 : 1;
  for (int64_t vocab : {1, 5, 64, 777, 5000})
    for (int64_t offset : {0, 1}) {
      if (quick && (vocab == 5 || vocab == 5000) && offset == 0) continue;
      test_greedy<T>(5, vocab, offset, offset * 3, 17u + vocab);
    }
  if (!quick) test_greedy<T>(2, 50257, 1, 0, 3);
  test_support<T>(40, 1, 300 / scale, 5, 1, 0);
  test_support<T>(40, 3, 300 / scale, 5, 2, 1);
  test_support<T>(40, 17, 400 / scale, 6, 3, 0);
  test_support<T>(40, 39, 300 / scale, 40, 4, 2);
  test_support<T>(300, 5, 300 / scale, 1000, 5, 1);
  if (!quick) test_support<T>(300, 299, 200, 3, 6, 0);
  test_support<T>(6000, 10, 200 / (scale * 2), 100000, 7, 1);
  test_support<T>(50257, 50, quick ? 1 : 4, 1000000, 8, 1);
  test_distribution<T>(50, 7, 0.8f, quick ? 800 : 1200, 1);
  if (!quick) test_distribution<T>(30, 30, 1.3f, 1200, 2);
  test_rng_plumbing<T>(3, quick ? 500 : 5000);
  test_per_row_clamping<T>(300);
}

static void run_cross_entropy_cases(bool full) {
  run_cross_entropy<float>(!full);
  run_cross_entropy<__half>(!full);
  run_cross_entropy<__nv_bfloat16>(!full);
}

static void run_sampling_cases(bool full) {
  run_sampling<float>(!full);
  run_sampling<__half>(!full);
  run_sampling<__nv_bfloat16>(!full);
}

int main(int argc, char** argv) {
  return check_main(argc, argv, "loss_sampling_check", {"cross_entropy", run_cross_entropy_cases},
                    {"sampling", run_sampling_cases}, failures);
}
