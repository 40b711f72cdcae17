// Entry points of gptfast's CPU kernels (one source file each), registered in registration.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace gptfast_cpu {

// Causal attention: returns (out (B,H,Tq,D) in q's dtype, lse (B,H,Tq) in fp32 / fp64).
std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     double scale, double dropout_p, int64_t seed);
// Gradients (dq, dk, dv) from the forward's out and lse; same seed regenerates the dropout mask.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                                                  const at::Tensor& k, const at::Tensor& v,
                                                                  const at::Tensor& out, const at::Tensor& lse,
                                                                  double scale, double dropout_p, int64_t seed);
// Per-row losses (N,) and, if compute_grad, softmax - one_hot (N, V) (zero rows where ignored).
std::tuple<at::Tensor, at::Tensor> cross_entropy_forward(const at::Tensor& logits, const at::Tensor& targets,
                                                         int64_t ignore_index, bool compute_grad);
// One token per row (B, 1); top_k 0 = no filter; per-row tensors override the scalars.
at::Tensor sample_next_token(const at::Tensor& logits, double temperature, int64_t top_k,
                             const c10::optional<at::Tensor>& temperatures, const c10::optional<at::Tensor>& top_ks,
                             const at::Tensor& uniforms);

}  // namespace gptfast_cpu
