// Torch binding of the layer kernels (rms_norm.cu, layer_norm.cu, swiglu.cu, gelu.cu, dropout.cu, rope.cu,
// decode_linear.cu): ops in the gptfast_cuda namespace with the shared schemas (csrc/schemas.h),
// argument checks, output allocation, and launches on torch's current CUDA stream.  Fakes and
// autograd are registered from Python (gptfast/ops/normalization.py, activation.py, regularization.py,
// rotary.py, linear.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../book_constants.h"
#include "../schemas.h"
#include "binding_checks.h"
#include "layer_ops_launch.h"

namespace gptfast {
namespace {

void check_cuda(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK_VALUE(t.is_cuda() && t.device() == device, name, " must be a CUDA tensor on ", device, ", got ",
                    t.device());
}

void check_rows(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK_VALUE(x.is_cuda(), "x must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) > 0, "x must be (rows, dim) with dim > 0, got ", x.sizes());
  TORCH_CHECK_VALUE(x.size(0) <= 0x7fffffffLL, "x may have at most 2**31 - 1 rows");
  check_cuda(weight, "weight", x.device());
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == x.size(1), "weight must be (", x.size(1), "), got ",
                    weight.sizes());
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x_in, const at::Tensor& weight, double eps) {
  check_rows(x_in, weight);
  TORCH_CHECK_VALUE(eps > 0, "eps must be positive, got ", eps);
  const at::Tensor x = x_in.contiguous();
  const FloatType dtype = float_type(x, "x");
  float_type(weight, "weight");  // the dtypes rms_norm_bwd takes: a forward it could not differentiate is refused
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor rstd = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  check_launch(launch_rms_norm_fwd(x.data_ptr(), dtype, w.data_ptr<float>(), x.size(0), x.size(1),
                                   static_cast<float>(eps), out.data_ptr(), rstd.data_ptr<float>(),
                                   c10::cuda::getCurrentCUDAStream()),
               "rms_norm_fwd");
  return {out, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& grad_out, const at::Tensor& x_in,
                                                const at::Tensor& weight, const at::Tensor& rstd_in) {
  check_rows(x_in, weight);
  const int64_t rows = x_in.size(0), dim = x_in.size(1);
  check_cuda(grad_out, "grad_out", x_in.device());
  TORCH_CHECK_VALUE(grad_out.sizes() == x_in.sizes(), "grad_out must have x's shape ", x_in.sizes());
  check_cuda(rstd_in, "rstd", x_in.device());
  TORCH_CHECK_VALUE(rstd_in.dim() == 1 && rstd_in.size(0) == rows && rstd_in.scalar_type() == at::kFloat,
                    "rstd must be the float32 (rows,) tensor from rms_norm_fwd");
  const at::Tensor x = x_in.contiguous();
  const FloatType dtype = float_type(x, "x");
  const FloatType wtype = float_type(weight, "weight");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor g = grad_out.to(x.scalar_type()).contiguous(), rstd = rstd_in.contiguous();
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor dweight = at::empty({dim}, weight.options());
  at::Tensor partial = at::empty({rms_norm_bwd_blocks(rows), dim}, x.options().dtype(at::kFloat));
  check_launch(launch_rms_norm_bwd(g.data_ptr(), x.data_ptr(), dtype, w.data_ptr<float>(), rstd.data_ptr<float>(),
                                   rows, dim, dx.data_ptr(), partial.data_ptr<float>(), dweight.data_ptr(), wtype,
                                   c10::cuda::getCurrentCUDAStream()),
               "rms_norm_bwd");
  return {dx, dweight};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x_in, const at::Tensor& weight,
                                                              const at::Tensor& bias, double eps) {
  check_rows(x_in, weight);
  check_cuda(bias, "bias", x_in.device());
  TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == x_in.size(1), "bias must be (", x_in.size(1), "), got ",
                    bias.sizes());
  TORCH_CHECK_VALUE(eps >= 0, "eps must be >= 0, got ", eps);
  const at::Tensor x = x_in.contiguous();
  const FloatType dtype = float_type(x, "x");
  float_type(weight, "weight");
  float_type(bias, "bias");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor w = weight.to(at::kFloat).contiguous(), b = bias.to(at::kFloat).contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor mean = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  check_launch(launch_layer_norm_fwd(x.data_ptr(), dtype, w.data_ptr<float>(), b.data_ptr<float>(), x.size(0),
                                     x.size(1), static_cast<float>(eps), out.data_ptr(), mean.data_ptr<float>(),
                                     rstd.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
               "layer_norm_fwd");
  return {out, mean, rstd};
}

void check_layer_norm_stat(const at::Tensor& stat, const char* name, int64_t rows, const at::Device& device) {
  check_cuda(stat, name, device);
  TORCH_CHECK_VALUE(stat.dim() == 1 && stat.size(0) == rows && stat.scalar_type() == at::kFloat, name,
                    " must be the float32 (rows,) tensor from layer_norm_fwd");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(const at::Tensor& grad_out, const at::Tensor& x_in,
                                                              const at::Tensor& weight, const at::Tensor& mean_in,
                                                              const at::Tensor& rstd_in) {
  check_rows(x_in, weight);
  const int64_t rows = x_in.size(0), dim = x_in.size(1);
  check_cuda(grad_out, "grad_out", x_in.device());
  TORCH_CHECK_VALUE(grad_out.sizes() == x_in.sizes(), "grad_out must have x's shape ", x_in.sizes());
  check_layer_norm_stat(mean_in, "mean", rows, x_in.device());
  check_layer_norm_stat(rstd_in, "rstd", rows, x_in.device());
  const at::Tensor x = x_in.contiguous();
  const FloatType dtype = float_type(x, "x");
  float_type(weight, "weight");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor g = grad_out.to(x.scalar_type()).contiguous();
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor dweight = at::empty({dim}, x.options().dtype(at::kFloat));
  at::Tensor dbias = at::empty({dim}, x.options().dtype(at::kFloat));
  at::Tensor partial = at::empty({2 * layer_norm_bwd_blocks(rows), dim}, x.options().dtype(at::kFloat));
  check_launch(launch_layer_norm_bwd(g.data_ptr(), x.data_ptr(), dtype, w.data_ptr<float>(), mean.data_ptr<float>(),
                                     rstd.data_ptr<float>(), rows, dim, dx.data_ptr(), partial.data_ptr<float>(),
                                     dweight.data_ptr<float>(), dbias.data_ptr<float>(),
                                     c10::cuda::getCurrentCUDAStream()),
               "layer_norm_bwd");
  return {dx, dweight, dbias};
}

void check_pair(const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK_VALUE(gate.is_cuda(), "gate must be a CUDA tensor, got one on ", gate.device());
  check_cuda(up, "up", gate.device());
  TORCH_CHECK_VALUE(gate.sizes() == up.sizes(), "gate and up must have one shape, got ", gate.sizes(), " and ",
                    up.sizes());
  TORCH_CHECK_TYPE(gate.scalar_type() == up.scalar_type(), "gate and up must share one dtype");
}

at::Tensor swiglu_fwd(const at::Tensor& gate_in, const at::Tensor& up_in) {
  check_pair(gate_in, up_in);
  const at::Tensor gate = gate_in.contiguous(), up = up_in.contiguous();
  const FloatType dtype = float_type(gate, "gate");
  const c10::cuda::CUDAGuard guard(gate.device());
  at::Tensor out = at::empty(gate.sizes(), gate.options());
  check_launch(launch_swiglu_fwd(gate.data_ptr(), up.data_ptr(), dtype, gate.numel(), out.data_ptr(),
                                 c10::cuda::getCurrentCUDAStream()),
               "swiglu_fwd");
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd(const at::Tensor& grad_out, const at::Tensor& gate_in,
                                              const at::Tensor& up_in) {
  check_pair(gate_in, up_in);
  check_cuda(grad_out, "grad_out", gate_in.device());
  TORCH_CHECK_VALUE(grad_out.sizes() == gate_in.sizes(), "grad_out must have gate's shape ", gate_in.sizes());
  const at::Tensor gate = gate_in.contiguous(), up = up_in.contiguous();
  const FloatType dtype = float_type(gate, "gate");
  const c10::cuda::CUDAGuard guard(gate.device());
  const at::Tensor g = grad_out.to(gate.scalar_type()).contiguous();
  at::Tensor d_gate = at::empty(gate.sizes(), gate.options()), d_up = at::empty(gate.sizes(), gate.options());
  check_launch(launch_swiglu_bwd(g.data_ptr(), gate.data_ptr(), up.data_ptr(), dtype, gate.numel(),
                                 d_gate.data_ptr(), d_up.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               "swiglu_bwd");
  return {d_gate, d_up};
}

at::Tensor gelu_fwd(const at::Tensor& x_in) {
  TORCH_CHECK_VALUE(x_in.is_cuda(), "x must be a CUDA tensor, got one on ", x_in.device());
  const at::Tensor x = x_in.contiguous();
  const FloatType dtype = float_type(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());
  check_launch(launch_gelu_fwd(x.data_ptr(), dtype, x.numel(), gptfast_book::gelu_sqrt_two_over_pi(), out.data_ptr(),
                               c10::cuda::getCurrentCUDAStream()),
               "gelu_fwd");
  return out;
}

at::Tensor gelu_bwd(const at::Tensor& grad_out, const at::Tensor& x_in) {
  TORCH_CHECK_VALUE(x_in.is_cuda(), "x must be a CUDA tensor, got one on ", x_in.device());
  check_cuda(grad_out, "grad_out", x_in.device());
  TORCH_CHECK_VALUE(grad_out.sizes() == x_in.sizes(), "grad_out must have x's shape ", x_in.sizes());
  const at::Tensor x = x_in.contiguous();
  const FloatType dtype = float_type(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor g = grad_out.to(x.scalar_type()).contiguous();
  at::Tensor dx = at::empty(x.sizes(), x.options());
  check_launch(launch_gelu_bwd(g.data_ptr(), x.data_ptr(), dtype, x.numel(), gptfast_book::gelu_sqrt_two_over_pi(),
                               dx.data_ptr(),
                               c10::cuda::getCurrentCUDAStream()),
               "gelu_bwd");
  return dx;
}

at::Tensor dropout_fwd(const at::Tensor& x_in, double p, const at::Tensor& seed) {
  TORCH_CHECK_VALUE(x_in.is_cuda(), "x must be a CUDA tensor, got one on ", x_in.device());
  TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0, "p must be in [0, 1], got ", p);
  check_cuda(seed, "seed", x_in.device());
  TORCH_CHECK_VALUE(seed.scalar_type() == at::kLong && seed.numel() >= 1 && seed.is_contiguous(),
                    "seed must be a contiguous int64 tensor with >= 1 element");
  const at::Tensor x = x_in.contiguous();
  const FloatType dtype = float_type(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());
  check_launch(launch_dropout(x.data_ptr(), dtype, x.numel(), seed.data_ptr<int64_t>(), p, out.data_ptr(),
                              c10::cuda::getCurrentCUDAStream()),
               "dropout_fwd");
  return out;
}

at::Tensor rope_apply(const at::Tensor& x_in, const at::Tensor& cos, const at::Tensor& sin,
                      const std::optional<at::Tensor>& positions_in, int64_t offset, bool backward) {
  TORCH_CHECK_VALUE(x_in.is_cuda() && x_in.dim() == 4, "x must be a (B, H, T, D) CUDA tensor, got ", x_in.sizes());
  const int64_t B = x_in.size(0), H = x_in.size(1), T = x_in.size(2), D = x_in.size(3);
  TORCH_CHECK_VALUE(D > 0 && D % 2 == 0, "head_dim must be even and positive, got ", D);
  check_cuda(cos, "cos", x_in.device());
  check_cuda(sin, "sin", x_in.device());
  TORCH_CHECK_VALUE(cos.dim() == 2 && cos.size(1) == D && sin.sizes() == cos.sizes(),
                    "cos and sin must both be (positions, ", D, ")");
  const at::Tensor x = x_in.stride(3) == 1 ? x_in : x_in.contiguous();
  const FloatType dtype = float_type(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor positions;
  if (positions_in.has_value()) {
    check_cuda(*positions_in, "positions", x.device());
    TORCH_CHECK_VALUE(positions_in->dim() == 2 && positions_in->size(0) == B && positions_in->size(1) == T,
                      "positions must be (", B, ", ", T, "), got ", positions_in->sizes());
    // Integers only: the int64 conversion below would truncate float positions silently.
    TORCH_CHECK_TYPE(at::isIntegralType(positions_in->scalar_type(), /*includeBool=*/false),
                     "positions must be an integer tensor, got ", positions_in->scalar_type());
    positions = positions_in->to(at::kLong).contiguous();
  }
  const at::Tensor c = cos.to(at::kFloat).contiguous(), s = sin.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({B, H, T, D}, x.options());
  check_launch(launch_rope(x.data_ptr(), dtype, B, H, T, D, x.stride(0), x.stride(1), x.stride(2), c.data_ptr<float>(),
                           s.data_ptr<float>(), c.size(0), positions.defined() ? positions.data_ptr<int64_t>() : nullptr,
                           offset, backward, out.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               backward ? "rope_bwd" : "rope_fwd");
  return out;
}

at::Tensor rope_fwd(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                    const std::optional<at::Tensor>& positions, int64_t offset) {
  return rope_apply(x, cos, sin, positions, offset, false);
}

at::Tensor rope_bwd(const at::Tensor& grad_out, const at::Tensor& cos, const at::Tensor& sin,
                    const std::optional<at::Tensor>& positions, int64_t offset) {
  return rope_apply(grad_out, cos, sin, positions, offset, true);
}

at::Tensor decode_linear(const at::Tensor& x_in, const at::Tensor& weight_in,
                         const std::optional<at::Tensor>& bias_in) {
  TORCH_CHECK_VALUE(x_in.is_cuda() && x_in.dim() == 2, "x must be a (M, K) CUDA tensor, got ", x_in.sizes(), " on ",
                    x_in.device());
  check_cuda(weight_in, "weight", x_in.device());
  TORCH_CHECK_VALUE(weight_in.dim() == 2 && weight_in.size(1) == x_in.size(1), "weight must be (N, ", x_in.size(1),
                    "), got ", weight_in.sizes());
  const FloatType dtype = float_type(x_in, "x");
  TORCH_CHECK_TYPE(weight_in.scalar_type() == x_in.scalar_type(), "weight must have x's dtype ", x_in.scalar_type(),
                   ", got ", weight_in.scalar_type());
  at::Tensor bias;
  if (bias_in.has_value()) {
    check_cuda(*bias_in, "bias", x_in.device());
    TORCH_CHECK_VALUE(bias_in->dim() == 1 && bias_in->size(0) == weight_in.size(0), "bias must be (",
                      weight_in.size(0), "), got ", bias_in->sizes());
    TORCH_CHECK_TYPE(bias_in->scalar_type() == x_in.scalar_type(), "bias must have x's dtype ", x_in.scalar_type(),
                     ", got ", bias_in->scalar_type());
    bias = bias_in->contiguous();
  }
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  at::Tensor out = at::empty({x.size(0), weight.size(0)}, x.options());
  check_launch(launch_decode_linear(x.data_ptr(), weight.data_ptr(), bias.defined() ? bias.data_ptr() : nullptr,
                                    dtype, x.size(0), weight.size(0), x.size(1), out.data_ptr(),
                                    c10::cuda::getCurrentCUDAStream()),
               "decode_linear");
  return out;
}

}  // namespace
}  // namespace gptfast

TORCH_LIBRARY_FRAGMENT(gptfast_cuda, m) {
  m.def(gptfast::schema::kRmsNormFwd);
  m.def(gptfast::schema::kRmsNormBwd);
  m.def(gptfast::schema::kLayerNormFwd);
  m.def(gptfast::schema::kLayerNormBwd);
  m.def(gptfast::schema::kSwigluFwd);
  m.def(gptfast::schema::kSwigluBwd);
  m.def(gptfast::schema::kGeluFwd);
  m.def(gptfast::schema::kGeluBwd);
  m.def(gptfast::schema::kDropoutFwd);
  m.def(gptfast::schema::kRopeFwd);
  m.def(gptfast::schema::kRopeBwd);
  m.def(gptfast::schema::kDecodeLinear);
}

TORCH_LIBRARY_IMPL(gptfast_cuda, CUDA, m) {
  m.impl("rms_norm_fwd", &gptfast::rms_norm_fwd);
  m.impl("rms_norm_bwd", &gptfast::rms_norm_bwd);
  m.impl("layer_norm_fwd", &gptfast::layer_norm_fwd);
  m.impl("layer_norm_bwd", &gptfast::layer_norm_bwd);
  m.impl("swiglu_fwd", &gptfast::swiglu_fwd);
  m.impl("swiglu_bwd", &gptfast::swiglu_bwd);
  m.impl("gelu_fwd", &gptfast::gelu_fwd);
  m.impl("gelu_bwd", &gptfast::gelu_bwd);
  m.impl("dropout_fwd", &gptfast::dropout_fwd);
  m.impl("rope_fwd", &gptfast::rope_fwd);
  m.impl("rope_bwd", &gptfast::rope_bwd);
  m.impl("decode_linear", &gptfast::decode_linear);
}
