// Softmax cross-entropy for CPU: loss and gradient of every row in one visit of the row.
// cross_entropy_fwd_inplace writes the gradient over the logits (each row is read before it
// is written, row by row), so the linear cross-entropy's chunk buffer becomes its gradient.
//
// For each row (rows run in parallel): max, sum of exp(x - max) (the exponentials are kept
// in the gradient buffer, or a per-thread row buffer for low-precision logits), the
// target's log-probability, and -- when a gradient is wanted -- softmax - one_hot written
// straight into the gradient.  Backward then only scales rows by the upstream gradient, so
// the op needs at most one gradient-sized buffer and never a softmax/log-softmax tensor.
//
// Non-finite rows follow F.cross_entropy: a row holding a NaN or +inf, or only -inf, has
// no softmax, so its loss is NaN (0 when its target is ignore_index) and its gradient row
// is NaN, ignored or not.  A -inf logit elsewhere is an ordinary zero probability (a
// -inf target logit gives an infinite loss and a finite gradient).  The checks are
// explicit because the vectorized exp clamps NaN and +inf to finite values.
#include "cpu_common.h"

namespace gptfast_cpu {
namespace {

// e[j] = exp(x[j] - mx) for j < n when e is given; returns the sum of the exponentials.
template <typename T>
T sum_exp(const T* x, int64_t n, T mx, T* e) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const V vmx(mx);
  V vsum(T(0));
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    const V p = (V::loadu(x + j) - vmx).exp_u20();
    if (e != nullptr) p.store(e + j);
    vsum = vsum + p;
  }
  T sum = at::vec::vec_reduce_all<T>([](V a, V b) { return a + b; }, vsum);
  for (; j < n; ++j) {
    const T p = std::exp(x[j] - mx);
    if (e != nullptr) e[j] = p;
    sum += p;
  }
  return sum;
}

// dst[j] = e[j] * factor, converted to the gradient's dtype.
template <typename scalar_t, typename T>
void write_scaled(const T* e, int64_t n, T factor, scalar_t* dst) {
  if constexpr (std::is_same_v<scalar_t, T>) {
    at::vec::map([factor](Vectorized<T> x) { return x * Vectorized<T>(factor); }, dst, e, n);
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<scalar_t>(e[j] * factor);
  }
}

template <typename scalar_t>
void cross_entropy_impl(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                        at::Tensor& loss, at::Tensor* grad) {
  using T = acc_t<scalar_t>;
  constexpr bool kWide = std::is_same_v<scalar_t, T>;  // logits already in the accumulation dtype
  const int64_t N = logits.size(0), V = logits.size(1);
  const scalar_t* x_all = logits.const_data_ptr<scalar_t>();
  const int64_t* t_all = targets.const_data_ptr<int64_t>();
  T* loss_all = loss.data_ptr<T>();
  scalar_t* g_all = grad != nullptr ? grad->data_ptr<scalar_t>() : nullptr;

  // A GPT-2 row (50257 logits) is enough work for one task; short rows are grouped.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / V);
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> widened(kWide ? 0 : V), exps((kWide && g_all != nullptr) ? 0 : V);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t target = t_all[r];
      const bool ignored = target == ignore_index;
      scalar_t* g = g_all != nullptr ? g_all + r * V : nullptr;
      if (ignored && g == nullptr) {
        loss_all[r] = T(0);
        continue;
      }
      TORCH_CHECK(ignored || (target >= 0 && target < V), "gptfast_cpu cross_entropy: target ", target, " in row ",
                  r, " is outside [0, ", V, ") and is not ignore_index");
      const T* x;
      if constexpr (kWide) {
        x = x_all + r * V;
      } else {
        const scalar_t* src = x_all + r * V;
        for (int64_t j = 0; j < V; ++j) widened[j] = static_cast<T>(src[j]);
        x = widened.data();
      }
      const T mx = vec_max(x, V);  // NaN if the row holds one
      if (!std::isfinite(mx) || ignored) {
        // An ignored row adds nothing, but its gradient is NaN when its softmax is, as in PyTorch.
        loss_all[r] = ignored ? T(0) : std::numeric_limits<T>::quiet_NaN();
        const scalar_t fill = static_cast<scalar_t>(std::isfinite(mx) ? T(0) : std::numeric_limits<T>::quiet_NaN());
        if (g != nullptr) std::fill(g, g + V, fill);
        continue;
      }
      T* e = nullptr;
      if (g != nullptr) {
        if constexpr (kWide) e = g; else e = exps.data();
      }
      const T x_target = x[target];  // read first: in place, sum_exp overwrites the row with exponentials
      const T sum = sum_exp(x, V, mx, e);
      // (mx - x_target) + log(sum), not (mx + log(sum)) - x_target: a small loss next to a large max keeps
      // its digits, as log_softmax's (x_target - mx) - log(sum) does.
      loss_all[r] = (mx - x_target) + std::log(sum);
      if (g != nullptr) {
        const T inv = T(1) / sum;
        write_scaled<scalar_t, T>(e, V, inv, g);
        // p - 1 from the unrounded p: a 16-bit g[target] already holds p rounded, and a p near 1 would lose
        // most of 1 - p to that first rounding.  (In the wide case e is g, and g[target] is p itself.)
        const T p_target = kWide ? static_cast<T>(g[target]) : e[target] * inv;
        g[target] = static_cast<scalar_t>(p_target - T(1));
      }
    }
  });
}

}  // namespace

namespace {

void check_cross_entropy_args(const at::Tensor& logits, const at::Tensor& targets) {
  TORCH_CHECK(logits.dim() == 2, "gptfast_cpu cross_entropy: logits must be (N, V)");
  TORCH_CHECK(logits.device().is_cpu(), "gptfast_cpu cross_entropy: logits must be on the CPU");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0),
              "gptfast_cpu cross_entropy: targets must be (N,) matching logits");
  TORCH_CHECK(targets.scalar_type() == at::kLong || targets.scalar_type() == at::kInt,
              "gptfast_cpu cross_entropy: targets must be int64 or int32");
  TORCH_CHECK(logits.size(1) > 0, "gptfast_cpu cross_entropy: logits need at least one class");
}

at::Tensor loss_rows_for(const at::Tensor& logits) {
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return at::empty({logits.size(0)}, logits.options().dtype(acc));
}

// Every target checked before any row is written: the in-place op would otherwise fail with the
// rows before the bad one already overwritten by their gradients.
void check_targets_before_writing(const at::Tensor& targets, int64_t V, int64_t ignore_index) {
  const int64_t* t = targets.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < targets.numel(); ++r)
    TORCH_CHECK(t[r] == ignore_index || (t[r] >= 0 && t[r] < V), "gptfast_cpu cross_entropy: target ", t[r],
                " in row ", r, " is outside [0, ", V, ") and is not ignore_index");
}

}  // namespace

at::Tensor cross_entropy_fwd_inplace(at::Tensor& logits, const at::Tensor& targets_in, int64_t ignore_index) {
  check_cross_entropy_args(logits, targets_in);
  TORCH_CHECK(logits.is_contiguous(), "gptfast_cpu cross_entropy_fwd_inplace: logits must be contiguous");
  const at::Tensor targets = targets_in.to(at::kLong).contiguous();
  check_targets_before_writing(targets, logits.size(1), ignore_index);
  at::Tensor loss = loss_rows_for(logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "gptfast_cpu_cross_entropy_", [&] {
    cross_entropy_impl<scalar_t>(logits, targets, ignore_index, loss, &logits);
  });
  return loss;
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd(const at::Tensor& logits_in, const at::Tensor& targets_in,
                                                     int64_t ignore_index, bool want_grad) {
  check_cross_entropy_args(logits_in, targets_in);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor targets = targets_in.to(at::kLong).contiguous();
  at::Tensor loss = loss_rows_for(logits);
  at::Tensor grad = want_grad ? at::empty_like(logits) : at::empty({0}, logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "gptfast_cpu_cross_entropy", [&] {
    cross_entropy_impl<scalar_t>(logits, targets, ignore_index, loss, want_grad ? &grad : nullptr);
  });
  return {loss, grad};
}

}  // namespace gptfast_cpu
