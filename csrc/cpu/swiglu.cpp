// SwiGLU for CPU: out = silu(gate) * up and its backward, elementwise over contiguous data.
//
// Math in float32 (double for double inputs), one rounding to the output dtype.  With
// s = sigmoid(a):  silu(a) = a * s,  d silu / da = s * (1 + a * (1 - s)), so
//   d gate = grad * up * s * (1 + a * (1 - s)),   d up = grad * a * s.
// sigmoid is 1 / (1 + exp(-a)), whose limits are exact: -inf gives 0, +inf gives 1, NaN stays NaN.
#include "cpu_common.h"

#include <algorithm>

#include "ops.h"

namespace gptfast_cpu {
namespace {

constexpr int64_t kChunk = 1024;  // elements per step (fits L1 with its buffers when 16-bit data is widened)

template <typename T>
Vectorized<T> sigmoid(const Vectorized<T>& a) {
  const Vectorized<T> one(T(1));
  return one / (one + a.neg().exp());
}

// The chunk [start, start + len) of a tensor as acc_t values: the data itself when it already is
// (float32, float64: no copy, a pass over memory saved each way), else widened into buf.
template <typename scalar_t>
const acc_t<scalar_t>* chunk_in(const scalar_t* data, int64_t start, int64_t len, acc_t<scalar_t>* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    return data + start;
  } else {
    at::vec::convert(data + start, buf, len);
    return buf;
  }
}

// Where a chunk's results go before they are rounded into out: out itself for float32/float64.
template <typename scalar_t>
acc_t<scalar_t>* chunk_out(scalar_t* out, int64_t start, acc_t<scalar_t>* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    return out + start;
  } else {
    return buf;
  }
}

template <typename scalar_t>
void chunk_store(const acc_t<scalar_t>* values, scalar_t* out, int64_t start, int64_t len) {
  if constexpr (!std::is_same_v<scalar_t, acc_t<scalar_t>>) at::vec::convert(values, out + start, len);
}

template <typename scalar_t>
void swiglu_fwd_impl(const scalar_t* a_all, const scalar_t* b_all, scalar_t* out_all, int64_t n) {
  using T = acc_t<scalar_t>;
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  at::parallel_for(0, (n + kChunk - 1) / kChunk, 16, [&](int64_t c_begin, int64_t c_end) {
    T a_buf[kChunk], b_buf[kChunk], y_buf[kChunk];
    for (int64_t c = c_begin; c < c_end; ++c) {
      const int64_t start = c * kChunk, len = std::min(kChunk, n - start);
      const T* a = chunk_in(a_all, start, len, a_buf);
      const T* b = chunk_in(b_all, start, len, b_buf);
      T* y = chunk_out(out_all, start, y_buf);
      int64_t j = 0;
      for (; j + L <= len; j += L) {
        const V va = V::loadu(a + j);
        // a / (1 + exp(-a)): torch's own silu formula, so float32 results match it closely
        (va / (V(T(1)) + va.neg().exp()) * V::loadu(b + j)).store(y + j);
      }
      for (; j < len; ++j) y[j] = a[j] / (T(1) + std::exp(-a[j])) * b[j];
      chunk_store(y, out_all, start, len);
    }
  });
}

template <typename scalar_t>
void swiglu_bwd_impl(const scalar_t* g_all, const scalar_t* a_all, const scalar_t* b_all, scalar_t* da_all,
                     scalar_t* db_all, int64_t n) {
  using T = acc_t<scalar_t>;
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  at::parallel_for(0, (n + kChunk - 1) / kChunk, 16, [&](int64_t c_begin, int64_t c_end) {
    T g_buf[kChunk], a_buf[kChunk], b_buf[kChunk], da_buf[kChunk], db_buf[kChunk];
    for (int64_t c = c_begin; c < c_end; ++c) {
      const int64_t start = c * kChunk, len = std::min(kChunk, n - start);
      const T* g = chunk_in(g_all, start, len, g_buf);
      const T* a = chunk_in(a_all, start, len, a_buf);
      const T* b = chunk_in(b_all, start, len, b_buf);
      T* da = chunk_out(da_all, start, da_buf);
      T* db = chunk_out(db_all, start, db_buf);
      const V one(T(1));
      int64_t j = 0;
      for (; j + L <= len; j += L) {
        const V va = V::loadu(a + j), vg = V::loadu(g + j), s = sigmoid(va);
        (vg * V::loadu(b + j) * s * (one + va * (one - s))).store(da + j);
        (vg * va * s).store(db + j);
      }
      for (; j < len; ++j) {
        const T s = T(1) / (T(1) + std::exp(-a[j]));
        da[j] = g[j] * b[j] * s * (T(1) + a[j] * (T(1) - s));
        db[j] = g[j] * a[j] * s;
      }
      chunk_store(da, da_all, start, len);
      chunk_store(db, db_all, start, len);
    }
  });
}

void check_pair(const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(gate.device().is_cpu() && up.device().is_cpu(), "gptfast_cpu swiglu: gate and up must be on the CPU");
  TORCH_CHECK(gate.sizes() == up.sizes(), "gptfast_cpu swiglu: gate ", gate.sizes(), " and up ", up.sizes(),
              " must have one shape");
  TORCH_CHECK(gate.scalar_type() == up.scalar_type() && at::isFloatingType(gate.scalar_type()),
              "gptfast_cpu swiglu: gate and up must share one floating dtype");
}

}  // namespace

at::Tensor swiglu_fwd(const at::Tensor& gate_in, const at::Tensor& up_in) {
  check_pair(gate_in, up_in);
  const at::Tensor gate = gate_in.contiguous(), up = up_in.contiguous();
  at::Tensor out = at::empty(gate.sizes(), gate.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "gptfast_cpu_swiglu_fwd", [&] {
    swiglu_fwd_impl<scalar_t>(gate.const_data_ptr<scalar_t>(), up.const_data_ptr<scalar_t>(),
                              out.data_ptr<scalar_t>(), gate.numel());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd(const at::Tensor& grad_out, const at::Tensor& gate_in,
                                              const at::Tensor& up_in) {
  check_pair(gate_in, up_in);
  TORCH_CHECK(grad_out.sizes() == gate_in.sizes() && grad_out.device().is_cpu(),
              "gptfast_cpu swiglu_bwd: grad_out must have gate's shape ", gate_in.sizes());
  const at::Tensor gate = gate_in.contiguous(), up = up_in.contiguous();
  const at::Tensor g = grad_out.to(gate.scalar_type()).contiguous();
  at::Tensor d_gate = at::empty(gate.sizes(), gate.options()), d_up = at::empty(gate.sizes(), gate.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "gptfast_cpu_swiglu_bwd", [&] {
    swiglu_bwd_impl<scalar_t>(g.const_data_ptr<scalar_t>(), gate.const_data_ptr<scalar_t>(),
                              up.const_data_ptr<scalar_t>(), d_gate.data_ptr<scalar_t>(), d_up.data_ptr<scalar_t>(),
                              gate.numel());
  });
  return {d_gate, d_up};
}

}  // namespace gptfast_cpu
