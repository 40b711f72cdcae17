// GELU (GPT-2's tanh approximation) for CPU, forward and backward, elementwise over contiguous data.
//
//   gelu(x) = 0.5 x (1 + tanh(u)),   u = b (x + k x^3),   b = sqrt(2/pi) (the book's float32 value), k = 0.044715
//
// 0.5 (1 + tanh(u)) is sigmoid(2u), so with e = exp(-2u) and s = 1 / (1 + e):
//   gelu(x) = x / (1 + e),   d gelu / dx = s + x * s (1 - s) * 2b (1 + 3k x^2).
// One exp and one division per element instead of a tanh (an exp, a division and the fix-ups of
// a general tanh): this is what makes the kernel several times faster than the book's six passes
// and faster than torch's own tanh GELU.  The exp is exp_u20 (a short polynomial, ~1e-6 relative
// error, far inside the tolerance of float32 training) with its two limits made exact: 0 below
// the float range (exp_u20 does that itself) and +inf above it (exp_u20 would return a large
// finite number), so saturation and the infinities come out as in the book's formula:
// gelu(+inf) = +inf, gelu(-inf) = NaN (-inf * 0), gelu(-1e30) = -0, NaN stays NaN.
// In the backward x^2 is capped at 400 inside the polynomial: past |x| = 20, s (1 - s) is exactly
// 0 and the cap keeps 2b (1 + 3k x^2) finite, so a large finite x gets the limit 1 or 0 where the
// book's autograd would overflow to 0 * inf = NaN (|x| > 1.8e19 in float32); x = +-inf still
// gives NaN, as there.
//
// Math in float32 (double for double inputs, with the library exp), one rounding to the output
// dtype.  float32/double run straight over the data; 16-bit data is widened in L1-sized chunks.
// Parallel over elements with a grain of 32768: a GPT-2 MLP activation (960 x 3072) keeps
// every thread busy, a decode step's few thousand elements never wake a thread.
#include "cpu_common.h"

#include <algorithm>
#include <type_traits>

#include "../book_constants.h"
#include "ops.h"

namespace gptfast_cpu {
namespace {

constexpr int64_t kGrain = 32768;  // elements per task at least: a task then costs ~10x a thread wake-up
constexpr int64_t kChunk = 1024;   // 16-bit elements widened per step (fits L1 with its buffers)
constexpr double kKappa = 0.044715;
constexpr double kSquareCap = 400.0;  // x^2 cap in the backward's polynomial (see above)

// exp(t), exact limits: float32 uses the fast exp_u20 (+inf above the float range, where it clamps).
template <typename T>
inline Vectorized<T> exp_fast(const Vectorized<T>& t) {
  if constexpr (std::is_same_v<T, float>) {
    const Vectorized<T> too_large = t > Vectorized<T>(88.72283935546875f);  // ln(FLT_MAX)
    return Vectorized<T>::blendv(t.exp_u20(), Vectorized<T>(std::numeric_limits<T>::infinity()), too_large);
  } else {
    return t.exp();
  }
}

// The polynomial's coefficients in the math type T, from b (taken from torch at run time, so not constexpr).
template <typename T>
struct Coefficients {
  explicit Coefficients(double beta)
      : minus_two_b(T(-2.0 * beta)), minus_two_bk(T(-2.0 * beta * kKappa)), two_b(T(2.0 * beta)),
        six_bk(T(6.0 * beta * kKappa)) {}
  Vectorized<T> minus_two_b, minus_two_bk, two_b, six_bk;
};

// -2u = x (-2b - 2bk x^2), given x^2.
template <typename T>
inline Vectorized<T> minus_two_u(const Vectorized<T>& x, const Vectorized<T>& x2, const Coefficients<T>& c) {
  return x * at::vec::fmadd(x2, c.minus_two_bk, c.minus_two_b);
}

template <typename T>
inline Vectorized<T> gelu_vec(const Vectorized<T>& x, const Coefficients<T>& c) {
  return x / (Vectorized<T>(T(1)) + exp_fast(minus_two_u(x, x * x, c)));
}

template <typename T>
inline Vectorized<T> gelu_grad_vec(const Vectorized<T>& g, const Vectorized<T>& x, const Coefficients<T>& c) {
  using V = Vectorized<T>;
  const V one(T(1)), x2 = x * x;
  const V s = one / (one + exp_fast(minus_two_u(x, x2, c)));
  const V slope = at::vec::fmadd(at::vec::clamp_max(x2, V(T(kSquareCap))), c.six_bk, c.two_b);
  // x * (slope * s * (1 - s)): the bracket is exactly 0 when saturated, so a finite x gives 0
  return g * at::vec::fmadd(x, slope * s * (one - s), s);
}

// out[i] = f(a[i]) (unary) or f(a[i], b[i]) over [0, n), vectors all the way (the tail is a partial vector,
// so every element gets the same math).
template <typename T, typename F>
inline void map_unary(const T* a, T* out, int64_t n, F f) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  int64_t j = 0;
  for (; j + L <= n; j += L) f(V::loadu(a + j)).store(out + j);
  if (j < n) f(V::loadu(a + j, n - j)).store(out + j, n - j);
}

template <typename T, typename F>
inline void map_binary(const T* a, const T* b, T* out, int64_t n, F f) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  int64_t j = 0;
  for (; j + L <= n; j += L) f(V::loadu(a + j), V::loadu(b + j)).store(out + j);
  if (j < n) f(V::loadu(a + j, n - j), V::loadu(b + j, n - j)).store(out + j, n - j);
}

template <typename scalar_t>
void gelu_fwd_impl(const scalar_t* x_all, scalar_t* out_all, int64_t n) {
  using T = acc_t<scalar_t>;
  const Coefficients<T> c(gptfast_book::gelu_sqrt_two_over_pi());
  const auto f = [&c](const Vectorized<T>& x) { return gelu_vec(x, c); };
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<scalar_t, T>) {
      map_unary(x_all + begin, out_all + begin, end - begin, f);
    } else {
      T x[kChunk], y[kChunk];
      for (int64_t start = begin; start < end; start += kChunk) {
        const int64_t len = std::min(kChunk, end - start);
        at::vec::convert(x_all + start, x, len);
        map_unary(x, y, len, f);
        at::vec::convert(y, out_all + start, len);
      }
    }
  });
}

template <typename scalar_t>
void gelu_bwd_impl(const scalar_t* g_all, const scalar_t* x_all, scalar_t* dx_all, int64_t n) {
  using T = acc_t<scalar_t>;
  const Coefficients<T> c(gptfast_book::gelu_sqrt_two_over_pi());
  const auto f = [&c](const Vectorized<T>& g, const Vectorized<T>& x) { return gelu_grad_vec(g, x, c); };
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<scalar_t, T>) {
      map_binary(g_all + begin, x_all + begin, dx_all + begin, end - begin, f);
    } else {
      T g[kChunk], x[kChunk], dx[kChunk];
      for (int64_t start = begin; start < end; start += kChunk) {
        const int64_t len = std::min(kChunk, end - start);
        at::vec::convert(g_all + start, g, len);
        at::vec::convert(x_all + start, x, len);
        map_binary(g, x, dx, len, f);
        at::vec::convert(dx, dx_all + start, len);
      }
    }
  });
}

void check_input(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "gptfast_cpu gelu: x must be on the CPU");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "gptfast_cpu gelu: x must be floating point, got ",
              x.scalar_type());
}

}  // namespace

at::Tensor gelu_fwd(const at::Tensor& x_in) {
  check_input(x_in);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gptfast_cpu_gelu_fwd", [&] {
    gelu_fwd_impl<scalar_t>(x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x.numel());
  });
  return out;
}

at::Tensor gelu_bwd(const at::Tensor& grad_out, const at::Tensor& x_in) {
  check_input(x_in);
  TORCH_CHECK(grad_out.sizes() == x_in.sizes() && grad_out.device().is_cpu(),
              "gptfast_cpu gelu_bwd: grad_out must have x's shape ", x_in.sizes());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor g = grad_out.to(x.scalar_type()).contiguous();
  at::Tensor dx = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gptfast_cpu_gelu_bwd", [&] {
    gelu_bwd_impl<scalar_t>(g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(),
                            x.numel());
  });
  return dx;
}

}  // namespace gptfast_cpu
