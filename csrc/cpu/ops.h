// Entry points of gptfast's CPU kernels (one source file each), registered in registration.cpp
// with the schemas of csrc/schemas.h (argument meanings are documented there).
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace gptfast_cpu {

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 double scale, double dropout_p, const c10::optional<at::Tensor>& seed);
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(const at::Tensor& grad_out, const at::Tensor& q,
                                                             const at::Tensor& k, const at::Tensor& v,
                                                             const at::Tensor& out, const at::Tensor& lse, double scale,
                                                             double dropout_p, const c10::optional<at::Tensor>& seed);
std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& targets,
                                                     int64_t ignore_index, bool want_grad);
at::Tensor cross_entropy_fwd_inplace(at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index);
at::Tensor sample_next_token(const at::Tensor& logits, const c10::optional<at::Tensor>& temperature,
                             double temperature_value, const c10::optional<at::Tensor>& top_k, int64_t top_k_value,
                             c10::optional<at::Generator> generator);
std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& grad_out, const at::Tensor& x,
                                                const at::Tensor& weight, const at::Tensor& rstd);
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                              const at::Tensor& bias, double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(const at::Tensor& grad_out, const at::Tensor& x,
                                                              const at::Tensor& weight, const at::Tensor& mean,
                                                              const at::Tensor& rstd);
at::Tensor swiglu_fwd(const at::Tensor& gate, const at::Tensor& up);
std::tuple<at::Tensor, at::Tensor> swiglu_bwd(const at::Tensor& grad_out, const at::Tensor& gate,
                                              const at::Tensor& up);
at::Tensor gelu_fwd(const at::Tensor& x);
at::Tensor gelu_bwd(const at::Tensor& grad_out, const at::Tensor& x);
at::Tensor dropout_fwd(const at::Tensor& x, double p, const at::Tensor& seed);
at::Tensor rope_fwd(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                    const c10::optional<at::Tensor>& positions, int64_t offset);
at::Tensor rope_bwd(const at::Tensor& grad_out, const at::Tensor& cos, const at::Tensor& sin,
                    const c10::optional<at::Tensor>& positions, int64_t offset);
at::Tensor decode_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);
// Most rows of x that decode_linear's bf16 dot-product path takes (from 2; the AVX-512 build on a CPU with
// AVX512-BF16) and its tile path (from 1; that build on Linux on a CPU with AMX, instead of the dot products),
// and the most bf16 rows this build multiplies natively on this CPU: one of those, or 0.
inline constexpr int64_t kBf16DotMaxRows = 4;
inline constexpr int64_t kBf16TileMaxRows = 16;
int64_t decode_linear_bf16_native_rows();

}  // namespace gptfast_cpu
