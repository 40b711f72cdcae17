// RMSNorm for CPU, forward and backward, over the rows of a (N, D) tensor.
//
// Forward, per row: the sum of squares in the accumulation dtype (float32, or double for
// double inputs), rstd = 1 / sqrt(sum / D + eps), out = (x * rstd) * weight, rounded once
// to x's dtype -- the order of the reference's float32 computation.  Rows run in parallel;
// 16-bit rows are widened into a per-thread buffer first.
//
// Backward, with xhat = x * rstd and gw = grad * weight:
//   dx = rstd * (gw - xhat * mean(gw * xhat)),   dweight = sum over rows of grad * xhat.
// dweight is reduced deterministically: the rows are cut into blocks fixed by N alone (not by
// the thread count), each block sums its rows into its own float partial, and the partials
// are added in block order, column-parallel.
#include "cpu_common.h"

#include <algorithm>

#include "ops.h"

namespace gptfast_cpu {
namespace {

template <typename scalar_t>
void rms_norm_fwd_impl(const at::Tensor& x, const at::Tensor& w_acc, double eps, at::Tensor& out, at::Tensor& rstd) {
  using T = acc_t<scalar_t>;
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const int64_t N = x.size(0), D = x.size(1);
  const scalar_t* x_all = x.const_data_ptr<scalar_t>();
  const T* w = w_acc.const_data_ptr<T>();
  scalar_t* out_all = out.data_ptr<scalar_t>();
  T* rstd_all = rstd.data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / D);
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> row_buf(std::is_same_v<scalar_t, T> ? 0 : D), y_buf(std::is_same_v<scalar_t, T> ? 0 : D);
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = widen(x_all + r * D, D, row_buf.data());
      const T mean_sq = sum_of(xr, D, [](auto v) { return v * v; }) / static_cast<T>(D);
      const T rs = T(1) / std::sqrt(mean_sq + static_cast<T>(eps));
      rstd_all[r] = rs;
      T* y = std::is_same_v<scalar_t, T> ? reinterpret_cast<T*>(out_all + r * D) : y_buf.data();
      const V vrs(rs);
      int64_t j = 0;
      for (; j + L <= D; j += L) ((V::loadu(xr + j) * vrs) * V::loadu(w + j)).store(y + j);
      for (; j < D; ++j) y[j] = (xr[j] * rs) * w[j];
      if constexpr (!std::is_same_v<scalar_t, T>) at::vec::convert(y, out_all + r * D, D);
    }
  });
}

template <typename scalar_t>
void rms_norm_bwd_impl(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w_acc, const at::Tensor& rstd,
                       at::Tensor& dx, at::Tensor& dw_acc) {
  using T = acc_t<scalar_t>;
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  constexpr bool kWide = std::is_same_v<scalar_t, T>;
  const int64_t N = x.size(0), D = x.size(1);
  const scalar_t* x_all = x.const_data_ptr<scalar_t>();
  const scalar_t* g_all = g.const_data_ptr<scalar_t>();
  const T* w = w_acc.const_data_ptr<T>();
  const T* rstd_all = rstd.const_data_ptr<T>();
  scalar_t* dx_all = dx.data_ptr<scalar_t>();
  // dweight's partials: per block of rows, summed in block order (sum_over_row_blocks).
  sum_over_row_blocks<T>(N, D, dw_acc.data_ptr<T>(), [&](int64_t r_begin, int64_t r_end, T* part) {
    std::vector<T> xb(kWide ? 0 : D), gb(kWide ? 0 : D), db(kWide ? 0 : D);
    for (int64_t r = r_begin; r < r_end; ++r) {
      const T* xr = widen(x_all + r * D, D, xb.data());
      const T* gr = widen(g_all + r * D, D, gb.data());
      const T rs = rstd_all[r];
      const V vrs(rs);
      // dot = sum(g * w * xhat); dweight partial += g * xhat
      V vdot(T(0));
      int64_t j = 0;
      for (; j + L <= D; j += L) {
        const V gxh = V::loadu(gr + j) * (V::loadu(xr + j) * vrs);
        vdot = vdot + gxh * V::loadu(w + j);
        (V::loadu(part + j) + gxh).store(part + j);
      }
      T dot = at::vec::vec_reduce_all<T>([](V a, V b2) { return a + b2; }, vdot);
      for (; j < D; ++j) {
        const T gxh = gr[j] * (xr[j] * rs);
        dot += gxh * w[j];
        part[j] += gxh;
      }
      const T c = dot / static_cast<T>(D);
      const V vc(c);
      T* d = kWide ? reinterpret_cast<T*>(dx_all + r * D) : db.data();
      j = 0;
      for (; j + L <= D; j += L) {
        const V xh = V::loadu(xr + j) * vrs;
        (vrs * (V::loadu(gr + j) * V::loadu(w + j) - xh * vc)).store(d + j);
      }
      for (; j < D; ++j) d[j] = rs * (gr[j] * w[j] - (xr[j] * rs) * c);
      if constexpr (!kWide) at::vec::convert(d, dx_all + r * D, D);
    }
  });
}

void check_rows(const at::Tensor& t, const char* name, int64_t N, int64_t D) {
  TORCH_CHECK(t.device().is_cpu(), "gptfast_cpu rms_norm: ", name, " must be on the CPU");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == N && t.size(1) == D, "gptfast_cpu rms_norm: ", name, " must be (", N, ", ",
              D, "), got ", t.sizes());
}

void check_weight(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2, "gptfast_cpu rms_norm: x must be (N, D), got ", x.sizes());
  // D = 0 has no statistics to give: rstd would be left unwritten.
  TORCH_CHECK(x.size(1) > 0, "gptfast_cpu rms_norm: x's rows must hold at least one element, got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "gptfast_cpu rms_norm: x and weight must be on the CPU");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1), "gptfast_cpu rms_norm: weight must be (",
              x.size(1), "), got ", weight.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()) && at::isFloatingType(weight.scalar_type()),
              "gptfast_cpu rms_norm: x and weight must be floating");
}

at::ScalarType acc_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x_in, const at::Tensor& weight, double eps) {
  check_weight(x_in, weight);
  TORCH_CHECK(eps > 0, "gptfast_cpu rms_norm: eps must be positive, got ", eps);
  const at::Tensor x = x_in.contiguous();
  const auto acc = acc_type(x);
  const at::Tensor w = weight.to(acc).contiguous();
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor rstd = at::empty({x.size(0)}, x.options().dtype(acc));
  if (x.numel() == 0) return {out, rstd};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gptfast_cpu_rms_norm_fwd",
                                  [&] { rms_norm_fwd_impl<scalar_t>(x, w, eps, out, rstd); });
  return {out, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& grad_out, const at::Tensor& x_in,
                                                const at::Tensor& weight, const at::Tensor& rstd_in) {
  check_weight(x_in, weight);
  const int64_t N = x_in.size(0), D = x_in.size(1);
  check_rows(grad_out, "grad_out", N, D);
  const auto acc = acc_type(x_in);
  TORCH_CHECK(rstd_in.dim() == 1 && rstd_in.size(0) == N && rstd_in.scalar_type() == acc,
              "gptfast_cpu rms_norm_bwd: rstd must be the (N,) tensor from rms_norm_fwd");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor g = grad_out.to(x.scalar_type()).contiguous();
  const at::Tensor rstd = rstd_in.contiguous();
  const at::Tensor w = weight.to(acc).contiguous();
  at::Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor dw = at::zeros({D}, x.options().dtype(acc));
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gptfast_cpu_rms_norm_bwd",
                                    [&] { rms_norm_bwd_impl<scalar_t>(g, x, w, rstd, dx, dw); });
  }
  return {dx, dw.to(weight.scalar_type())};
}

}  // namespace gptfast_cpu
