// Checks rms_norm.cu, layer_norm.cu, swiglu.cu, gelu.cu, dropout.cu, rope.cu and decode_linear.cu through their host
// launchers on the CPU emulator (emu.h): every result is compared with a double-precision reference computed here.
// Usage: layer_ops_check {norms|swiglu_rope|decode_linear} {quick|full} (swiglu_rope runs the GELU and dropout cases
// too); prints "FAIL ..." lines and
// "N failures", exits non-zero on any mismatch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

#include "../../csrc/dropout_hash.h"
#include "check_main.h"
#include "layer_ops_launch.h"

using namespace gptfast;

static int failures = 0;
#define CHECK(cond, ...)                                 \
  do {                                                   \
    if (!(cond)) {                                       \
      if (++failures < 40) {                             \
        std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
        std::printf(__VA_ARGS__);                        \
        std::printf("\n");                               \
      }                                                  \
    }                                                    \
  } while (0)

template <typename T> T from_f(float x);
template <> float from_f<float>(float x) { return x; }
template <> __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
static double to_d(float x) { return x; }
static double to_d(__half x) { return __half2float(x); }
static double to_d(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> FloatType ftype();
template <> FloatType ftype<float>() { return FloatType::kFloat32; }
template <> FloatType ftype<__half>() { return FloatType::kFloat16; }
template <> FloatType ftype<__nv_bfloat16>() { return FloatType::kBFloat16; }
template <typename T> const char* tname();
template <> const char* tname<float>() { return "f32"; }
template <> const char* tname<__half>() { return "f16"; }
template <> const char* tname<__nv_bfloat16>() { return "bf16"; }
// |got - want| <= atol + rtol |want|, a few ulps of the output dtype; NaN must meet NaN.
template <typename T> double rel_tol();
template <> double rel_tol<float>() { return 2e-5; }
template <> double rel_tol<__half>() { return 2e-3; }
template <> double rel_tol<__nv_bfloat16>() { return 1.6e-2; }

template <typename T>
bool close(double got, double want, double scale = 1.0) {
  if (std::isnan(want)) return std::isnan(got);
  if (std::isinf(want)) return got == want;
  const double tol = rel_tol<T>() * scale;
  return std::fabs(got - want) <= tol + tol * std::fabs(want);
}

template <typename T>
std::vector<T> random_values(size_t n, std::mt19937& rng, float sd) {
  std::normal_distribution<float> normal(0.0f, sd);
  std::vector<T> v(n);
  for (auto& e : v) e = from_f<T>(normal(rng));
  return v;
}

// ------------------------------------------------------------------ RMSNorm

template <typename T, typename W>
void test_rms_norm(int64_t rows, int64_t dim, unsigned seed, bool with_nan) {
  std::mt19937 rng(seed);
  std::vector<T> x = random_values<T>(rows * dim, rng, 2.0f), g = random_values<T>(rows * dim, rng, 1.0f);
  std::vector<W> w_typed = random_values<W>(dim, rng, 1.0f);
  if (with_nan && rows > 1) x[dim + dim / 2] = from_f<T>(NAN);  // row 1 turns NaN, the others must not
  std::vector<float> w(dim);
  for (int64_t j = 0; j < dim; ++j) w[j] = static_cast<float>(to_d(w_typed[j]));
  const float eps = 1e-5f;
  std::vector<T> out(rows * dim), dx(rows * dim);
  std::vector<float> rstd(rows);
  std::vector<float> partial(rms_norm_bwd_blocks(rows) * dim);
  std::vector<W> dw(dim);
  CHECK(launch_rms_norm_fwd(x.data(), ftype<T>(), w.data(), rows, dim, eps, out.data(), rstd.data(), nullptr) ==
            cudaSuccess, "rms_norm_fwd launch");
  CHECK(launch_rms_norm_bwd(g.data(), x.data(), ftype<T>(), w.data(), rstd.data(), rows, dim, dx.data(),
                            partial.data(), dw.data(), ftype<W>(), nullptr) == cudaSuccess, "rms_norm_bwd launch");
  std::vector<double> dw_ref(dim, 0.0);
  int bad_out = 0, bad_dx = 0;
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t j = 0; j < dim; ++j) ss += to_d(x[r * dim + j]) * to_d(x[r * dim + j]);
    const double rs = 1.0 / std::sqrt(ss / dim + eps);
    double dot = 0;
    for (int64_t j = 0; j < dim; ++j) dot += to_d(g[r * dim + j]) * w[j] * to_d(x[r * dim + j]) * rs;
    if (!close<float>(rstd[r], rs)) ++bad_out;
    for (int64_t j = 0; j < dim; ++j) {
      const double xh = to_d(x[r * dim + j]) * rs, gj = to_d(g[r * dim + j]);
      if (!close<T>(to_d(out[r * dim + j]), xh * w[j])) ++bad_out;
      // dx carries a cancellation (g w - xhat c): compare against the row's scale
      const double want = rs * (gj * w[j] - xh * dot / dim);
      if (!(std::isnan(want) ? std::isnan(to_d(dx[r * dim + j]))
                             : std::fabs(to_d(dx[r * dim + j]) - want) <= rel_tol<T>() * (4 * rs + std::fabs(want))))
        ++bad_dx;
      dw_ref[j] += gj * xh;
    }
  }
  int bad_dw = 0;
  for (int64_t j = 0; j < dim; ++j)
    if (!close<W>(to_d(dw[j]), dw_ref[j], 2.0 + std::sqrt(static_cast<double>(rows)))) ++bad_dw;
  CHECK(bad_out == 0 && bad_dx == 0 && bad_dw == 0, "rms_norm %s/%s rows=%lld dim=%lld nan=%d: %d out, %d dx, %d dw",
        tname<T>(), tname<W>(), (long long)rows, (long long)dim, (int)with_nan, bad_out, bad_dx, bad_dw);
  // dweight is deterministic: a second backward gives the same bits
  std::vector<W> dw2(dim);
  launch_rms_norm_bwd(g.data(), x.data(), ftype<T>(), w.data(), rstd.data(), rows, dim, dx.data(), partial.data(),
                      dw2.data(), ftype<W>(), nullptr);
  CHECK(std::memcmp(dw.data(), dw2.data(), dim * sizeof(W)) == 0, "rms_norm dweight differs between runs");
}

template <typename T>
void run_rms_norm(bool quick) {
  std::printf("rms_norm %s\n", tname<T>());
  std::fflush(stdout);
  const std::vector<int64_t> dims = quick ? std::vector<int64_t>{1, 7, 130, 1030, 4100}
                                          : std::vector<int64_t>{1, 2, 7, 64, 130, 513, 1030, 2048, 4100, 8200};
  for (int64_t dim : dims)
    for (int64_t rows : {1, 5, 600}) {
      if (rows == 600 && dim > 130) continue;
      test_rms_norm<T, T>(rows, dim, 7u * dim + rows, rows == 5);
    }
  test_rms_norm<T, float>(9, 96, 3, false);
}

// ------------------------------------------------------------------ LayerNorm

template <typename T>
void test_layer_norm(int64_t rows, int64_t dim, unsigned seed, bool with_nan) {
  std::mt19937 rng(seed);
  std::vector<T> x = random_values<T>(rows * dim, rng, 2.0f), g = random_values<T>(rows * dim, rng, 1.0f);
  for (auto& e : x) e = from_f<T>(static_cast<float>(to_d(e)) + 3.0f);  // a mean far from 0
  std::vector<float> w = random_values<float>(dim, rng, 1.0f), b = random_values<float>(dim, rng, 1.0f);
  if (with_nan && rows > 1) x[dim + dim / 2] = from_f<T>(NAN);  // row 1 turns NaN, the others must not
  const float eps = 1e-5f;
  std::vector<T> out(rows * dim), dx(rows * dim);
  std::vector<float> mean(rows), rstd(rows), dw(dim), db(dim);
  std::vector<float> partial(2 * layer_norm_bwd_blocks(rows) * dim);
  CHECK(launch_layer_norm_fwd(x.data(), ftype<T>(), w.data(), b.data(), rows, dim, eps, out.data(), mean.data(),
                              rstd.data(), nullptr) == cudaSuccess, "layer_norm_fwd launch");
  CHECK(launch_layer_norm_bwd(g.data(), x.data(), ftype<T>(), w.data(), mean.data(), rstd.data(), rows, dim,
                              dx.data(), partial.data(), dw.data(), db.data(), nullptr) == cudaSuccess,
        "layer_norm_bwd launch");
  std::vector<double> dw_ref(dim, 0.0), db_ref(dim, 0.0);
  int bad_out = 0, bad_dx = 0;
  for (int64_t r = 0; r < rows; ++r) {
    double s = 0, ss = 0;
    for (int64_t j = 0; j < dim; ++j) s += to_d(x[r * dim + j]);
    const double mu = s / dim;
    for (int64_t j = 0; j < dim; ++j) ss += (to_d(x[r * dim + j]) - mu) * (to_d(x[r * dim + j]) - mu);
    const double rs = 1.0 / std::sqrt(ss / dim + eps);
    double c1 = 0, c2 = 0;
    for (int64_t j = 0; j < dim; ++j) {
      const double gw = to_d(g[r * dim + j]) * w[j];
      c1 += gw;
      c2 += gw * (to_d(x[r * dim + j]) - mu) * rs;
    }
    c1 /= dim;
    c2 /= dim;
    if (!close<float>(mean[r], mu) || !close<float>(rstd[r], rs, 4.0)) ++bad_out;
    for (int64_t j = 0; j < dim; ++j) {
      const double xh = (to_d(x[r * dim + j]) - mu) * rs, gj = to_d(g[r * dim + j]);
      if (!close<T>(to_d(out[r * dim + j]), xh * w[j] + b[j], 4.0)) ++bad_out;
      // dx carries cancellations (g w - c1 - xhat c2): compare against the row's scale
      const double want = rs * (gj * w[j] - c1 - xh * c2);
      if (!(std::isnan(want) ? std::isnan(to_d(dx[r * dim + j]))
                             : std::fabs(to_d(dx[r * dim + j]) - want) <= rel_tol<T>() * (8 * rs + std::fabs(want))))
        ++bad_dx;
      dw_ref[j] += gj * xh;
      db_ref[j] += gj;
    }
  }
  int bad_dw = 0;
  const double grow = 2.0 + std::sqrt(static_cast<double>(rows));
  for (int64_t j = 0; j < dim; ++j)
    if (!close<T>(dw[j], dw_ref[j], grow) || !close<T>(db[j], db_ref[j], grow)) ++bad_dw;
  CHECK(bad_out == 0 && bad_dx == 0 && bad_dw == 0,
        "layer_norm %s rows=%lld dim=%lld nan=%d: %d out, %d dx, %d dweight/dbias", tname<T>(), (long long)rows,
        (long long)dim, (int)with_nan, bad_out, bad_dx, bad_dw);
  // dweight and dbias are deterministic: a second backward gives the same bits
  std::vector<float> dw2(dim), db2(dim);
  launch_layer_norm_bwd(g.data(), x.data(), ftype<T>(), w.data(), mean.data(), rstd.data(), rows, dim, dx.data(),
                        partial.data(), dw2.data(), db2.data(), nullptr);
  CHECK(std::memcmp(dw.data(), dw2.data(), dim * sizeof(float)) == 0 &&
            std::memcmp(db.data(), db2.data(), dim * sizeof(float)) == 0,
        "layer_norm dweight/dbias differ between runs");
}

// A constant row far from 0 normalises to 0: its output is exactly the bias (a mean an ulp off would make every
// deviation that ulp and xhat +-1).
void test_layer_norm_constant_rows(float value, int64_t dim) {
  const int64_t rows = 3;
  std::mt19937 rng(static_cast<unsigned>(dim));
  std::vector<float> x(rows * dim, value), out(rows * dim), mean(rows), rstd(rows);
  std::vector<float> w = random_values<float>(dim, rng, 1.0f), b = random_values<float>(dim, rng, 1.0f);
  CHECK(launch_layer_norm_fwd(x.data(), ftype<float>(), w.data(), b.data(), rows, dim, 1e-5f, out.data(), mean.data(),
                              rstd.data(), nullptr) == cudaSuccess, "layer_norm_fwd launch");
  int bad = 0;
  for (int64_t i = 0; i < rows * dim; ++i) bad += out[i] != b[i % dim];
  CHECK(bad == 0 && mean[0] == value, "layer_norm constant rows of %g, dim=%lld: %d outputs are not the bias",
        static_cast<double>(value), (long long)dim, bad);
}

template <typename T>
void run_layer_norm(bool quick) {
  std::printf("layer_norm %s\n", tname<T>());
  std::fflush(stdout);
  if (std::is_same_v<T, float>)
    for (int64_t dim : {100, 769, 4100}) {
      test_layer_norm_constant_rows(123456.7f, dim);
      test_layer_norm_constant_rows(-3.3e7f, dim);
      test_layer_norm_constant_rows(0.1f, dim);
    }
  const std::vector<int64_t> dims = quick ? std::vector<int64_t>{1, 7, 130, 769, 4100}
                                          : std::vector<int64_t>{1, 2, 7, 64, 130, 513, 769, 1030, 2048, 4100, 8200};
  for (int64_t dim : dims)
    for (int64_t rows : {1, 5, 600}) {
      if (rows == 600 && dim > 130) continue;
      test_layer_norm<T>(rows, dim, 11u * dim + rows, rows == 5);
    }
}

// ------------------------------------------------------------------ SwiGLU

template <typename T>
void test_swiglu(int64_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::vector<T> a = random_values<T>(n, rng, 3.0f), b = random_values<T>(n, rng, 2.0f),
                 g = random_values<T>(n, rng, 1.0f);
  const float specials[] = {NAN, INFINITY, -INFINITY, 0.0f, -90.0f, 90.0f};
  for (int k = 0; k < 6 && k < n; ++k) a[k] = from_f<T>(specials[k]);
  std::vector<T> out(n), da(n), db(n);
  CHECK(launch_swiglu_fwd(a.data(), b.data(), ftype<T>(), n, out.data(), nullptr) == cudaSuccess, "swiglu_fwd");
  CHECK(launch_swiglu_bwd(g.data(), a.data(), b.data(), ftype<T>(), n, da.data(), db.data(), nullptr) == cudaSuccess,
        "swiglu_bwd");
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double av = to_d(a[i]), bv = to_d(b[i]), gv = to_d(g[i]);
    const double s = 1.0 / (1.0 + std::exp(-av));
    const double want_out = av * s * bv;  // inf * 0 (a = -inf) is NaN, as in torch
    if (!close<T>(to_d(out[i]), std::isinf(av) && av < 0 ? NAN : want_out)) ++bad;
    if (std::isfinite(av)) {
      if (!close<T>(to_d(da[i]), gv * bv * s * (1.0 + av * (1.0 - s)), 2.0)) ++bad;
      if (!close<T>(to_d(db[i]), gv * av * s)) ++bad;
    }
  }
  CHECK(bad == 0, "swiglu %s n=%lld: %d mismatches", tname<T>(), (long long)n, bad);
}

// ------------------------------------------------------------------ GELU

template <typename T>
void test_gelu(int64_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::vector<T> x = random_values<T>(n, rng, 3.0f), g = random_values<T>(n, rng, 1.0f);
  const float specials[] = {NAN, INFINITY, -INFINITY, 0.0f, -90.0f, 90.0f, -6.0f};
  for (int k = 0; k < 7 && k < n; ++k) x[k] = from_f<T>(specials[k]);
  std::vector<T> out(n), dx(n);
  const float beta = std::sqrt(static_cast<float>(2.0 / 3.14159265358979323846));  // a float32 sqrt(2/pi)
  CHECK(launch_gelu_fwd(x.data(), ftype<T>(), n, beta, out.data(), nullptr) == cudaSuccess, "gelu_fwd");
  CHECK(launch_gelu_bwd(g.data(), x.data(), ftype<T>(), n, beta, dx.data(), nullptr) == cudaSuccess, "gelu_bwd");
  const double kappa = 0.044715;
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double xv = to_d(x[i]), gv = to_d(g[i]);
    const double t = std::tanh(beta * (xv + kappa * xv * xv * xv));
    // -inf: -inf * 0 is NaN, as in the book's formula
    if (!close<T>(to_d(out[i]), 0.5 * xv * (1.0 + t))) ++bad;
    if (std::isfinite(xv)) {
      const double want = gv * (0.5 * (1.0 + t) + 0.5 * xv * (1.0 - t * t) * beta * (1.0 + 3.0 * kappa * xv * xv));
      if (!close<T>(to_d(dx[i]), want, 2.0)) ++bad;
    } else if (std::isnan(xv) && !std::isnan(to_d(dx[i]))) {
      ++bad;
    }
  }
  CHECK(bad == 0, "gelu %s n=%lld: %d mismatches", tname<T>(), (long long)n, bad);
}

// ------------------------------------------------------------------ dropout

// Every element against the mask of csrc/dropout_hash.h, exactly: kept ones are x * (1 / (1 - p))
// rounded once, dropped ones x * 0 (NaN for NaN and inf); and the kept share near 1 - p.
template <typename T>
void test_dropout(int64_t n, double p, unsigned seed) {
  std::mt19937 rng(seed);
  std::vector<T> x = random_values<T>(n, rng, 3.0f), out(n);
  const float specials[] = {NAN, INFINITY, -INFINITY, 0.0f};
  for (int k = 0; k < 4 && k < n; ++k) x[k] = from_f<T>(specials[k]);
  const int64_t key = 12345 + seed;
  CHECK(launch_dropout(x.data(), ftype<T>(), n, &key, p, out.data(), nullptr) == cudaSuccess, "dropout");
  const uint64_t threshold = static_cast<uint64_t>(std::llround(p * gptfast_dropout::kDrawRange));
  const float scale = p < 1.0 ? static_cast<float>(1.0 / (1.0 - p)) : 0.0f;
  int bad = 0;
  int64_t kept = 0;
  for (int64_t i = 0; i < n; ++i) {
    const bool keep = gptfast_dropout::keeps(static_cast<uint64_t>(key), static_cast<uint64_t>(i), threshold);
    kept += keep;
    const float want = to_d(from_f<T>(static_cast<float>(to_d(x[i])) * (keep ? scale : 0.0f)));
    const double got = to_d(out[i]);
    if (!(got == want || (std::isnan(got) && std::isnan(want)))) ++bad;
  }
  CHECK(bad == 0, "dropout %s n=%lld p=%g: %d mismatches", tname<T>(), (long long)n, p, bad);
  if (n >= 100000) {
    const double share = static_cast<double>(kept) / n;
    CHECK(std::fabs(share - (1.0 - p)) < 0.01, "dropout %s p=%g: kept share %g", tname<T>(), p, share);
  }
}

// ------------------------------------------------------------------ RoPE

template <typename T>
void test_rope(int64_t B, int64_t H, int64_t Tn, int64_t D, int64_t offset, bool per_row, bool transposed,
               unsigned seed) {
  std::mt19937 rng(seed);
  const int64_t P = 40, half = D / 2;
  std::vector<float> cos(P * D), sin(P * D);
  for (int64_t p = 0; p < P; ++p)
    for (int64_t j = 0; j < half; ++j) {
      const double angle = p * std::pow(500.0, -2.0 * j / D);
      cos[p * D + j] = cos[p * D + j + half] = static_cast<float>(std::cos(angle));
      sin[p * D + j] = sin[p * D + j + half] = static_cast<float>(std::sin(angle));
    }
  std::vector<T> x = random_values<T>(B * H * Tn * D, rng, 2.0f);
  // element (b, h, t, j): (B, H, T, D) layout, or (B, T, H, D) memory read as a transposed view
  const int64_t sb = H * Tn * D, sh = transposed ? D : Tn * D, st = transposed ? H * D : D;
  std::vector<int64_t> positions(B * Tn);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < Tn; ++t) positions[b * Tn + t] = (b * 7 + t) % P;
  if (per_row && B * Tn > 1) positions[1] = P;  // out of the tables: that row must be NaN, nothing read
  for (int backward = 0; backward < 2; ++backward) {
    std::vector<T> out(B * H * Tn * D);
    CHECK(launch_rope(x.data(), ftype<T>(), B, H, Tn, D, sb, sh, st, cos.data(), sin.data(), P,
                      per_row ? positions.data() : nullptr, offset, backward, out.data(), nullptr) == cudaSuccess,
          "rope launch");
    int bad = 0;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t t = 0; t < Tn; ++t) {
          const int64_t p = per_row ? positions[b * Tn + t] : offset + t;
          const T* src = x.data() + b * sb + h * sh + t * st;
          const T* dst = out.data() + ((b * H + h) * Tn + t) * D;
          for (int64_t j = 0; j < half; ++j) {
            double w1 = NAN, w2 = NAN;
            if (p >= 0 && p < P) {
              const double x1 = to_d(src[j]), x2 = to_d(src[j + half]);
              const double c1 = cos[p * D + j], c2 = cos[p * D + j + half];
              const double s1 = sin[p * D + j], s2 = sin[p * D + j + half];
              w1 = backward ? x1 * c1 + x2 * s2 : x1 * c1 - x2 * s1;
              w2 = backward ? x2 * c2 - x1 * s1 : x2 * c2 + x1 * s2;
            }
            if (!close<T>(to_d(dst[j]), w1, 4.0) || !close<T>(to_d(dst[j + half]), w2, 4.0)) ++bad;
          }
        }
    CHECK(bad == 0, "rope %s B=%lld H=%lld T=%lld D=%lld offset=%lld per_row=%d transposed=%d backward=%d: %d",
          tname<T>(), (long long)B, (long long)H, (long long)Tn, (long long)D, (long long)offset, (int)per_row,
          (int)transposed, backward, bad);
  }
}

template <typename T>
void run_swiglu_rope(bool quick) {
  std::printf("swiglu_rope %s\n", tname<T>());
  std::fflush(stdout);
  for (int64_t n : {1, 7, 1000, 4099}) test_swiglu<T>(n, 3u + n);
  if (!quick) test_swiglu<T>(300000, 5);
  for (int64_t n : {1, 7, 1023, 4099}) test_gelu<T>(n, 11u + n);
  if (!quick) test_gelu<T>(300000, 6);
  for (double p : {0.0, 0.1, 0.5, 1.0}) test_dropout<T>(1000, p, 21u);
  test_dropout<T>(quick ? 120000 : 300000, 0.1, 22u);
  test_rope<T>(1, 1, 1, 2, 0, false, false, 1);
  test_rope<T>(2, 3, 5, 18, 3, false, true, 2);
  test_rope<T>(2, 2, 4, 64, 0, true, false, 3);
  test_rope<T>(1, 2, 1, 128, 39, false, false, 4);
  if (!quick) test_rope<T>(3, 4, 9, 34, 0, true, true, 5);
}

// ------------------------------------------------------------------ decode_linear

// out = x @ w.T + b for x (M, K) read from x_offset elements into its buffer (an offset of one
// element misaligns the 16-byte path, so the scalar kernel runs).  Guard elements around out
// must stay untouched; NaN in x row 1 (when M > 1) must fill that row only.
template <typename T>
void test_decode_linear(int64_t M, int64_t N, int64_t K, bool with_bias, int64_t x_offset, bool with_nan,
                        unsigned seed) {
  std::mt19937 rng(seed);
  std::vector<T> xbuf = random_values<T>(x_offset + M * K, rng, 1.0f), w = random_values<T>(N * K, rng, 1.0f),
                 b = random_values<T>(N, rng, 1.0f);
  T* x = xbuf.data() + x_offset;
  if (with_nan && M > 1 && K > 0) x[K + K / 2] = from_f<T>(NAN);
  constexpr int64_t kGuard = 8;
  const T sentinel = from_f<T>(12345.0f);
  std::vector<T> outbuf(M * N + 2 * kGuard, sentinel);
  T* out = outbuf.data() + kGuard;
  CHECK(launch_decode_linear(x, w.data(), with_bias ? b.data() : nullptr, ftype<T>(), M, N, K, out, nullptr) ==
            cudaSuccess, "decode_linear launch");
  int bad = 0;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double want = with_bias ? to_d(b[n]) : 0.0, scale = std::fabs(want);
      for (int64_t k = 0; k < K; ++k) {
        want += to_d(x[m * K + k]) * to_d(w[n * K + k]);
        scale += std::fabs(to_d(x[m * K + k]) * to_d(w[n * K + k]));
      }
      const double got = to_d(out[m * N + n]);
      // one rounding to T (relative) plus float32 accumulation error (relative to the sum of |products|)
      const bool ok = std::isnan(want) ? std::isnan(got)
                                       : std::fabs(got - want) <= rel_tol<T>() * std::fabs(want) + 1e-5 * scale;
      if (!ok) ++bad;
    }
  int touched = 0;
  for (int64_t g = 0; g < kGuard; ++g)
    touched += to_d(outbuf[g]) != to_d(sentinel) || to_d(outbuf[kGuard + M * N + g]) != to_d(sentinel);
  CHECK(bad == 0 && touched == 0, "decode_linear %s M=%lld N=%lld K=%lld bias=%d x_offset=%lld nan=%d: %d wrong, "
        "%d guard elements written", tname<T>(), (long long)M, (long long)N, (long long)K, (int)with_bias,
        (long long)x_offset, (int)with_nan, bad, touched);
}

template <typename T>
void run_decode_linear(bool quick) {
  std::printf("decode_linear %s\n", tname<T>());
  std::fflush(stdout);
  unsigned seed = 11;
  // K=65: odd, the scalar kernel; K=64/256: whole 16-byte vectors; N=37: a partial column group
  for (int64_t M : {1, 2, 3, 5, 8, 16, 17})
    for (int64_t K : {65, 64})
      for (int bias = 0; bias < 2; ++bias) test_decode_linear<T>(M, 37, K, bias, 0, M == 5, seed++);
  test_decode_linear<T>(8, 37, 64, true, 1, false, seed++);  // misaligned x: the scalar kernel
  test_decode_linear<T>(4, 9, 256, true, 0, true, seed++);
  test_decode_linear<T>(3, 5, 0, true, 0, false, seed++);  // K = 0: the bias alone
  test_decode_linear<T>(1, 1, 1, false, 0, false, seed++);
  if (!quick) {
    test_decode_linear<T>(16, 300, 1024, true, 0, false, seed++);
    test_decode_linear<T>(40, 70, 129, false, 0, true, seed++);
    test_decode_linear<T>(2, 1000, 96, true, 0, false, seed++);
  }
}

static void run_decode_linear_cases(bool full) {
  run_decode_linear<float>(!full);
  run_decode_linear<__half>(!full);
  run_decode_linear<__nv_bfloat16>(!full);
}

static void run_norm_cases(bool full) {
  run_rms_norm<float>(!full);
  run_rms_norm<__half>(!full);
  run_rms_norm<__nv_bfloat16>(!full);
  run_layer_norm<float>(!full);
  run_layer_norm<__half>(!full);
  run_layer_norm<__nv_bfloat16>(!full);
}

static void run_swiglu_rope_cases(bool full) {
  run_swiglu_rope<float>(!full);
  run_swiglu_rope<__half>(!full);
  run_swiglu_rope<__nv_bfloat16>(!full);
}

int main(int argc, char** argv) {
  return check_main(argc, argv, "layer_ops_check",
                    {{"norms", run_norm_cases}, {"swiglu_rope", run_swiglu_rope_cases},
                     {"decode_linear", run_decode_linear_cases}},
                    failures);
}
