// LayerNorm for CPU, forward and backward, over the rows of a (N, D) tensor.
//
// Forward, per row, in the accumulation dtype (float32, or double for double inputs): the mean, corrected by the mean
// of the deviations from it (the plain sum may land an ulp off; for a constant or near-constant row far from 0 that ulp
// is the whole deviation, and xhat would be +-1 instead of 0), then the biased variance as the mean of squared
// deviations (a second sweep over the row while it is still in L1: steadier than sum(x^2) - mean^2 when the mean is
// large), rstd = 1 / sqrt(var + eps) and out = (x - mean) * rstd * weight + bias, rounded once to x's dtype. Rows run
// in parallel; 16-bit rows are widened into a per-thread buffer first.
//
// Backward, with xhat = (x - mean) * rstd and gw = grad * weight:
//   dx = rstd * (gw - mean(gw) - xhat * mean(gw * xhat)),
//   dweight = sum over rows of grad * xhat,   dbias = sum over rows of grad.
// dweight and dbias are reduced deterministically: the rows are cut into blocks fixed by N alone
// (rows_per_block, not the thread count), each block sums its rows into its own partials, and
// the partials are added in block order, column-parallel.
#include "cpu_common.h"

#include <algorithm>

#include "ops.h"

namespace gptfast_cpu {
namespace {

template <typename scalar_t>
void layer_norm_fwd_impl(const at::Tensor& x, const at::Tensor& w_acc, const at::Tensor& b_acc, double eps,
                         at::Tensor& out, at::Tensor& mean, at::Tensor& rstd) {
  using T = acc_t<scalar_t>;
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  constexpr bool kWide = std::is_same_v<scalar_t, T>;
  const int64_t N = x.size(0), D = x.size(1);
  const scalar_t* x_all = x.const_data_ptr<scalar_t>();
  const T* w = w_acc.const_data_ptr<T>();
  const T* b = b_acc.const_data_ptr<T>();
  scalar_t* out_all = out.data_ptr<scalar_t>();
  T* mean_all = mean.data_ptr<T>();
  T* rstd_all = rstd.data_ptr<T>();
  const T inv_d = T(1) / static_cast<T>(D);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / D);
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> row_buf(kWide ? 0 : D), y_buf(kWide ? 0 : D);
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = widen(x_all + r * D, D, row_buf.data());
      const T mu0 = sum_of(xr, D, [](auto v) { return v; }) * inv_d;
      const T mu = mu0 + sum_of(xr, D, [mu0](auto v) { return v - decltype(v)(mu0); }) * inv_d;
      const T var = sum_of(xr, D, [mu](auto v) { const auto d = v - decltype(v)(mu); return d * d; }) * inv_d;
      const T rs = T(1) / std::sqrt(var + static_cast<T>(eps));
      mean_all[r] = mu;
      rstd_all[r] = rs;
      T* y = kWide ? reinterpret_cast<T*>(out_all + r * D) : y_buf.data();
      const V vmu(mu), vrs(rs);
      int64_t j = 0;
      for (; j + L <= D; j += L)
        at::vec::fmadd((V::loadu(xr + j) - vmu) * vrs, V::loadu(w + j), V::loadu(b + j)).store(y + j);
      for (; j < D; ++j) y[j] = ((xr[j] - mu) * rs) * w[j] + b[j];
      if constexpr (!kWide) at::vec::convert(y, out_all + r * D, D);
    }
  });
}

template <typename scalar_t>
void layer_norm_bwd_impl(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w_acc, const at::Tensor& mean,
                         const at::Tensor& rstd, at::Tensor& dx, at::Tensor& dw_acc, at::Tensor& db_acc) {
  using T = acc_t<scalar_t>;
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  constexpr bool kWide = std::is_same_v<scalar_t, T>;
  const int64_t N = x.size(0), D = x.size(1);
  const scalar_t* x_all = x.const_data_ptr<scalar_t>();
  const scalar_t* g_all = g.const_data_ptr<scalar_t>();
  const T* w = w_acc.const_data_ptr<T>();
  const T* mean_all = mean.const_data_ptr<T>();
  const T* rstd_all = rstd.const_data_ptr<T>();
  scalar_t* dx_all = dx.data_ptr<scalar_t>();
  const T inv_d = T(1) / static_cast<T>(D);
  // dweight and dbias side by side: a block's partials, and the totals, are [dweight | dbias].
  std::vector<T> totals(static_cast<size_t>(2 * D));
  sum_over_row_blocks<T>(N, 2 * D, totals.data(), [&](int64_t r_begin, int64_t r_end, T* part_w) {
    T* part_b = part_w + D;
    std::vector<T> xb(kWide ? 0 : D), gb(kWide ? 0 : D), db(kWide ? 0 : D);
    for (int64_t r = r_begin; r < r_end; ++r) {
      const T* xr = widen(x_all + r * D, D, xb.data());
      const T* gr = widen(g_all + r * D, D, gb.data());
      const T mu = mean_all[r], rs = rstd_all[r];
      const V vmu(mu), vrs(rs);
      // One sweep: sum(gw), sum(gw * xhat) and the block's dweight/dbias partials (two
      // accumulators per sum, as in sum_of).
      V v_gw0(T(0)), v_gw1(T(0)), v_gwxh0(T(0)), v_gwxh1(T(0));
      const auto step = [&](int64_t k, V& v_gw, V& v_gwxh) {
        const V gv = V::loadu(gr + k);
        const V xh = (V::loadu(xr + k) - vmu) * vrs;
        const V gw = gv * V::loadu(w + k);
        v_gw = v_gw + gw;
        v_gwxh = at::vec::fmadd(gw, xh, v_gwxh);
        at::vec::fmadd(gv, xh, V::loadu(part_w + k)).store(part_w + k);
        (V::loadu(part_b + k) + gv).store(part_b + k);
      };
      int64_t j = 0;
      for (; j + 2 * L <= D; j += 2 * L) {
        step(j, v_gw0, v_gwxh0);
        step(j + L, v_gw1, v_gwxh1);
      }
      for (; j + L <= D; j += L) step(j, v_gw0, v_gwxh0);
      const auto add = [](V a, V b2) { return a + b2; };
      T s_gw = at::vec::vec_reduce_all<T>(add, v_gw0 + v_gw1);
      T s_gwxh = at::vec::vec_reduce_all<T>(add, v_gwxh0 + v_gwxh1);
      for (; j < D; ++j) {
        const T xh = (xr[j] - mu) * rs;
        const T gw = gr[j] * w[j];
        s_gw += gw;
        s_gwxh += gw * xh;
        part_w[j] += gr[j] * xh;
        part_b[j] += gr[j];
      }
      const T c1 = s_gw * inv_d, c2 = s_gwxh * inv_d;
      const V vc1(c1), vc2(c2);
      T* d = kWide ? reinterpret_cast<T*>(dx_all + r * D) : db.data();
      j = 0;
      for (; j + L <= D; j += L) {
        const V xh = (V::loadu(xr + j) - vmu) * vrs;
        const V gw = V::loadu(gr + j) * V::loadu(w + j);
        (vrs * (gw - vc1 - xh * vc2)).store(d + j);
      }
      for (; j < D; ++j) d[j] = rs * (gr[j] * w[j] - c1 - ((xr[j] - mu) * rs) * c2);
      if constexpr (!kWide) at::vec::convert(d, dx_all + r * D, D);
    }
  });
  std::copy(totals.begin(), totals.begin() + D, dw_acc.data_ptr<T>());
  std::copy(totals.begin() + D, totals.end(), db_acc.data_ptr<T>());
}

void check_rows(const at::Tensor& t, const char* name, int64_t N, int64_t D) {
  TORCH_CHECK(t.device().is_cpu(), "gptfast_cpu layer_norm: ", name, " must be on the CPU");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == N && t.size(1) == D, "gptfast_cpu layer_norm: ", name, " must be (", N,
              ", ", D, "), got ", t.sizes());
}

void check_param(const at::Tensor& x, const at::Tensor& p, const char* name) {
  TORCH_CHECK(p.device().is_cpu(), "gptfast_cpu layer_norm: ", name, " must be on the CPU");
  TORCH_CHECK(p.dim() == 1 && p.size(0) == x.size(1), "gptfast_cpu layer_norm: ", name, " must be (", x.size(1),
              "), got ", p.sizes());
  TORCH_CHECK(at::isFloatingType(p.scalar_type()), "gptfast_cpu layer_norm: ", name, " must be floating");
}

void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2, "gptfast_cpu layer_norm: x must be (N, D), got ", x.sizes());
  // D = 0 has no statistics to give: mean and rstd would be left unwritten.
  TORCH_CHECK(x.size(1) > 0, "gptfast_cpu layer_norm: x's rows must hold at least one element, got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), "gptfast_cpu layer_norm: x must be on the CPU");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "gptfast_cpu layer_norm: x must be floating");
}

void check_stat(const at::Tensor& t, const char* name, int64_t N, at::ScalarType acc) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 1 && t.size(0) == N && t.scalar_type() == acc,
              "gptfast_cpu layer_norm_bwd: ", name, " must be the (N,) tensor from layer_norm_fwd");
}

at::ScalarType acc_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x_in, const at::Tensor& weight,
                                                              const at::Tensor& bias, double eps) {
  check_x(x_in);
  check_param(x_in, weight, "weight");
  check_param(x_in, bias, "bias");
  TORCH_CHECK(eps >= 0, "gptfast_cpu layer_norm: eps must be >= 0, got ", eps);
  const at::Tensor x = x_in.contiguous();
  const auto acc = acc_type(x);
  const at::Tensor w = weight.to(acc).contiguous();
  const at::Tensor b = bias.to(acc).contiguous();
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor mean = at::empty({x.size(0)}, x.options().dtype(acc));
  at::Tensor rstd = at::empty({x.size(0)}, x.options().dtype(acc));
  if (x.numel() == 0) return {out, mean, rstd};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gptfast_cpu_layer_norm_fwd",
                                  [&] { layer_norm_fwd_impl<scalar_t>(x, w, b, eps, out, mean, rstd); });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(const at::Tensor& grad_out, const at::Tensor& x_in,
                                                              const at::Tensor& weight, const at::Tensor& mean_in,
                                                              const at::Tensor& rstd_in) {
  check_x(x_in);
  check_param(x_in, weight, "weight");
  const int64_t N = x_in.size(0), D = x_in.size(1);
  check_rows(grad_out, "grad_out", N, D);
  const auto acc = acc_type(x_in);
  check_stat(mean_in, "mean", N, acc);
  check_stat(rstd_in, "rstd", N, acc);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor g = grad_out.to(x.scalar_type()).contiguous();
  const at::Tensor mean = mean_in.contiguous();
  const at::Tensor rstd = rstd_in.contiguous();
  const at::Tensor w = weight.to(acc).contiguous();
  at::Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor dw = at::zeros({D}, x.options().dtype(acc));
  at::Tensor db = at::zeros({D}, x.options().dtype(acc));
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gptfast_cpu_layer_norm_bwd",
                                    [&] { layer_norm_bwd_impl<scalar_t>(g, x, w, mean, rstd, dx, dw, db); });
  }
  // In the accumulation dtype: the bias's dtype is not an input here, the Python layer casts both.
  return {dx, dw, db};
}

}  // namespace gptfast_cpu
