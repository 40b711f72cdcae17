// Dropout with a counter-based mask (csrc/dropout_hash.h): out = x * keep / (1 - p), float32 math
// (float64 for float64 x), rounded once.  Multiplying (not selecting) keeps torch's semantics for
// dropped non-finite inputs: NaN * 0 is NaN.  The backward is this op on grad_out with the same p
// and seed.  Blocks of elements are hashed into a factor buffer, then multiplied vectorized.
#include "../dropout_hash.h"
#include "cpu_common.h"

namespace gptfast_cpu {
namespace {

constexpr int64_t kBlock = 1024;

template <typename scalar_t>
void dropout_block(const scalar_t* x, scalar_t* out, int64_t begin, int64_t end, uint64_t seed, uint64_t threshold,
                   acc_t<scalar_t> scale) {
  using T = acc_t<scalar_t>;
  T factor[kBlock];
  for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
    const int64_t n = std::min(kBlock, end - b0);
    for (int64_t j = 0; j < n; ++j)
      factor[j] = gptfast_dropout::keeps(seed, static_cast<uint64_t>(b0 + j), threshold) ? scale : T(0);
    for (int64_t j = 0; j < n; ++j) out[b0 + j] = static_cast<scalar_t>(static_cast<T>(x[b0 + j]) * factor[j]);
  }
}

}  // namespace

at::Tensor dropout_fwd(const at::Tensor& x_in, double p, const at::Tensor& seed) {
  TORCH_CHECK(x_in.device().is_cpu(), "gptfast_cpu dropout: x must be on the CPU");
  TORCH_CHECK(at::isFloatingType(x_in.scalar_type()), "gptfast_cpu dropout: x must be floating point, got ",
              x_in.scalar_type());
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "gptfast_cpu dropout: p must be in [0, 1], got ", p);
  TORCH_CHECK(seed.device().is_cpu() && seed.scalar_type() == at::kLong && seed.numel() >= 1,
              "gptfast_cpu dropout: seed must be an int64 CPU tensor with >= 1 element");
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  const uint64_t seed_value = static_cast<uint64_t>(seed.reshape({-1})[0].item<int64_t>());
  const uint64_t threshold = gptfast_dropout::draw_threshold(p);
  const int64_t n = x.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gptfast_cpu_dropout", [&] {
    using T = acc_t<scalar_t>;
    const T scale = static_cast<T>(gptfast_dropout::keep_scale(p));
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, 16 * kBlock, [&](int64_t begin, int64_t end) {
      dropout_block<scalar_t>(src, dst, begin, end, seed_value, threshold, scale);
    });
  });
  return out;
}

}  // namespace gptfast_cpu
