// Rotary position embedding (rotate-half convention) for CPU, forward and backward.
//
// x is (B, H, T, D) with unit stride along D (other strides free, e.g. a transposed head
// view); with h = D / 2, c = cos[p], s = sin[p] for the token's position p:
//   forward   y[j] = x[j] c[j] - x[j+h] s[j],     y[j+h] = x[j+h] c[j+h] + x[j] s[j+h]
//   backward  dx[j] = g[j] c[j] + g[j+h] s[j+h],  dx[j+h] = g[j+h] c[j+h] - g[j] s[j]
// (the transpose of the forward's linear map).  Both are y1 = x1 c1 + x2 A, y2 = x2 c2 + x1 B
// with (A, B) = (-s1, s2) forward and (s2, -s1) backward.  Positions are offset + t, or
// positions[b, t] per batch row (KV-cache decode of left-padded batches); every position
// is bounds-checked against the tables.  Math in float32 (double for double), the output
// contiguous in x's dtype.
#include "cpu_common.h"

#include <algorithm>

#include "ops.h"

namespace gptfast_cpu {
namespace {

template <typename scalar_t>
void rope_impl(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const int64_t* positions,
               int64_t offset, bool backward, at::Tensor& out) {
  using T = acc_t<scalar_t>;
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const int64_t B = x.size(0), H = x.size(1), Tn = x.size(2), D = x.size(3), half = D / 2;
  const int64_t sb = x.stride(0), sh = x.stride(1), st = x.stride(2);
  const scalar_t* x_all = x.const_data_ptr<scalar_t>();
  const T* cos_all = cos.const_data_ptr<T>();
  const T* sin_all = sin.const_data_ptr<T>();
  scalar_t* out_all = out.data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / D);
  at::parallel_for(0, B * H * Tn, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> xb(D), yb(D);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t t = row % Tn, h = (row / Tn) % H, b = row / (Tn * H);
      const int64_t p = positions != nullptr ? positions[b * Tn + t] : offset + t;
      const T* c = cos_all + p * D;
      const T* s = sin_all + p * D;
      at::vec::convert(x_all + b * sb + h * sh + t * st, xb.data(), D);
      const T* x1 = xb.data();
      const T* x2 = x1 + half;
      T* y1 = yb.data();
      T* y2 = y1 + half;
      const T sign = backward ? T(1) : T(-1);  // A = sign * s[second half or first]
      const T* a_src = backward ? s + half : s;
      const T* b_src = backward ? s : s + half;
      const V vsign(sign);
      int64_t j = 0;
      for (; j + L <= half; j += L) {
        const V vx1 = V::loadu(x1 + j), vx2 = V::loadu(x2 + j);
        const V va = V::loadu(a_src + j) * vsign, vb = V::loadu(b_src + j) * V(-sign);
        (vx1 * V::loadu(c + j) + vx2 * va).store(y1 + j);
        (vx2 * V::loadu(c + half + j) + vx1 * vb).store(y2 + j);
      }
      for (; j < half; ++j) {
        y1[j] = x1[j] * c[j] + x2[j] * (sign * a_src[j]);
        y2[j] = x2[j] * c[half + j] + x1[j] * (-sign * b_src[j]);
      }
      at::vec::convert(yb.data(), out_all + row * D, D);
    }
  });
}

}  // namespace

at::Tensor rope_apply(const at::Tensor& x_in, const at::Tensor& cos_in, const at::Tensor& sin_in,
                      const c10::optional<at::Tensor>& positions_in, int64_t offset, bool backward) {
  TORCH_CHECK(x_in.dim() == 4 && x_in.device().is_cpu(), "gptfast_cpu rope: x must be a (B, H, T, D) CPU tensor");
  const int64_t B = x_in.size(0), Tn = x_in.size(2), D = x_in.size(3);
  TORCH_CHECK(D % 2 == 0, "gptfast_cpu rope: head_dim must be even, got ", D);
  TORCH_CHECK(cos_in.dim() == 2 && cos_in.sizes() == sin_in.sizes() && cos_in.size(1) == D,
              "gptfast_cpu rope: cos and sin must both be (positions, ", D, ")");
  TORCH_CHECK(cos_in.device().is_cpu() && sin_in.device().is_cpu(), "gptfast_cpu rope: tables must be on the CPU");
  const int64_t P = cos_in.size(0);
  at::Tensor positions;
  if (positions_in.has_value()) {
    TORCH_CHECK(positions_in->dim() == 2 && positions_in->size(0) == B && positions_in->size(1) == Tn,
                "gptfast_cpu rope: positions must be (", B, ", ", Tn, "), got ", positions_in->sizes());
    TORCH_CHECK(at::isIntegralType(positions_in->scalar_type(), /*includeBool=*/false) &&
                    positions_in->device().is_cpu(),
                "gptfast_cpu rope: positions must be an integer CPU tensor, got ", positions_in->scalar_type());
    positions = positions_in->to(at::kLong).contiguous();
    if (positions.numel() > 0) {
      const int64_t lo = positions.min().item<int64_t>(), hi = positions.max().item<int64_t>();
      TORCH_CHECK(lo >= 0 && hi < P, "gptfast_cpu rope: positions must lie in [0, ", P, "), got ", lo, "..", hi);
    }
  } else {
    // offset <= P - Tn rather than offset + Tn <= P: the sum wraps for an offset near 2^63.
    TORCH_CHECK(offset >= 0 && offset <= P - Tn, "gptfast_cpu rope: positions from ", offset, " (", Tn,
                " tokens) lie outside the tables' ", P, " positions");
  }
  const at::Tensor x = x_in.stride(3) == 1 ? x_in : x_in.contiguous();
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor cos = cos_in.to(acc).contiguous(), sin = sin_in.to(acc).contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gptfast_cpu_rope", [&] {
    rope_impl<scalar_t>(x, cos, sin, positions.defined() ? positions.const_data_ptr<int64_t>() : nullptr, offset,
                        backward, out);
  });
  return out;
}

at::Tensor rope_fwd(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                    const c10::optional<at::Tensor>& positions, int64_t offset) {
  return rope_apply(x, cos, sin, positions, offset, false);
}

at::Tensor rope_bwd(const at::Tensor& grad_out, const at::Tensor& cos, const at::Tensor& sin,
                    const c10::optional<at::Tensor>& positions, int64_t offset) {
  return rope_apply(grad_out, cos, sin, positions, offset, true);
}

}  // namespace gptfast_cpu
