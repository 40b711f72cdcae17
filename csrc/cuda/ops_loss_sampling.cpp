// Torch binding of the cross-entropy and sampling kernels (cross_entropy.cu, sampling.cu):
// ops in the gptfast_cuda namespace with the shared schemas (csrc/schemas.h), argument
// checks, output allocation, and launches on torch's current CUDA stream.  Fake (meta)
// implementations and autograd are registered from Python (gptfast/ops/loss.py,
// sampling.py, when gptfast.ops.cuda_ops loads this extension).
//
// This file also defines the (empty) Python module gptfast._C_cuda: importing it runs
// the static op registrations of every csrc/cuda/*.cpp linked into it.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <mutex>
#include <optional>
#include <tuple>

#include "../schemas.h"
#include "binding_checks.h"
#include "loss_sampling_launch.h"

extern "C" PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

namespace gptfast {
namespace {

constexpr int64_t kMaxRows = 0x7fffffffLL;  // one block per row: grid.x limit

// 2-D CUDA logits whose rows may be strided but whose elements within a row are contiguous.
at::Tensor row_major_logits(const at::Tensor& logits) {
  TORCH_CHECK_VALUE(logits.is_cuda(), "logits must be a CUDA tensor, got one on ", logits.device());
  TORCH_CHECK_VALUE(logits.dim() == 2, "logits must be 2-D (rows, vocab), got shape ", logits.sizes());
  TORCH_CHECK_VALUE(logits.size(1) > 0, "logits must have at least one column");
  TORCH_CHECK_VALUE(logits.size(0) <= kMaxRows, "logits may have at most ", kMaxRows, " rows, got ", logits.size(0));
  TORCH_CHECK_VALUE(logits.size(1) <= kMaxRows, "logits may have at most ", kMaxRows, " columns");
  return logits.stride(1) == 1 ? logits : logits.contiguous();
}

// One value per row of `rows`, on `device`, contiguous, of `dtype`.
void check_per_row(const at::Tensor& t, const char* name, int64_t rows, const at::Device& device,
                   at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == rows, name, " must have shape (", rows, "), got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == device, name, " must be on ", device, ", got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& targets,
                                                     int64_t ignore_index, bool want_grad) {
  const at::Tensor x = row_major_logits(logits);
  const FloatType dtype = float_type(x, "logits");
  const int64_t rows = x.size(0), vocab = x.size(1);
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == rows, "targets must have shape (", rows, "), got ",
                    targets.sizes());
  TORCH_CHECK_VALUE(targets.device() == x.device(), "targets must be on ", x.device(), ", got ", targets.device());
  TORCH_CHECK_TYPE(targets.scalar_type() == at::kLong || targets.scalar_type() == at::kInt,
                   "targets must be int64 or int32, got ", targets.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor t = targets.contiguous();
  at::Tensor loss_rows = at::empty({rows}, x.options().dtype(at::kFloat));
  at::Tensor grad = want_grad ? at::empty({rows, vocab}, x.options()) : at::empty({0}, x.options());
  check_launch(launch_cross_entropy_fwd(x.data_ptr(), x.stride(0), dtype, t.data_ptr(), t.scalar_type() == at::kLong,
                                        rows, vocab, ignore_index, loss_rows.data_ptr<float>(),
                                        want_grad ? grad.data_ptr() : nullptr, vocab,
                                        c10::cuda::getCurrentCUDAStream()),
               "cross_entropy_fwd");
  return {loss_rows, grad};
}

// Reserves `counters` Philox counters per subsequence from torch's generator, the
// graph-safe way torch's own random kernels do (the generator's mutex held).
PhiloxLaunchArgs reserve_philox(const std::optional<at::Generator>& generator, const at::Device& device,
                                int64_t counters) {
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      generator, at::cuda::detail::getDefaultCUDAGenerator(device.index()));
  std::lock_guard<std::mutex> lock(gen->mutex_);
  const at::PhiloxCudaState state = gen->philox_cuda_state(static_cast<uint64_t>(4 * counters));
  PhiloxLaunchArgs rng{};
  rng.captured = state.captured_;
  if (state.captured_) {
    rng.seed_ptr = state.seed_.ptr;
    rng.offset_ptr = state.offset_.ptr;
    rng.offset_intragraph = state.offset_intragraph_;
  } else {
    rng.seed = state.seed_.val;
    rng.offset = state.offset_.val;
  }
  return rng;
}

at::Tensor sample_next_token(const at::Tensor& logits, const std::optional<at::Tensor>& temperature,
                             double temperature_value, const std::optional<at::Tensor>& top_k, int64_t top_k_value,
                             std::optional<at::Generator> generator) {
  const at::Tensor x = row_major_logits(logits);
  const FloatType dtype = float_type(x, "logits");
  const int64_t rows = x.size(0), vocab = x.size(1);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor temps, ks;
  if (temperature.has_value()) {
    check_per_row(*temperature, "temperature", rows, x.device(), at::kFloat);
    temps = temperature->contiguous();
  }
  if (top_k.has_value()) {
    check_per_row(*top_k, "top_k", rows, x.device(), at::kLong);
    ks = top_k->contiguous();
  } else {
    TORCH_CHECK_VALUE(top_k_value >= 1, "top_k_value must be >= 1 (the vocabulary size keeps every token), got ",
                      top_k_value);
  }
  at::Tensor out = at::empty({rows, 1}, x.options().dtype(at::kLong));
  if (rows == 0) return out;
  const PhiloxLaunchArgs rng = reserve_philox(generator, x.device(), sampling_philox_counters(vocab));
  check_launch(launch_sample_next_token(x.data_ptr(), x.stride(0), dtype, rows, vocab,
                                        temps.defined() ? temps.data_ptr<float>() : nullptr,
                                        static_cast<float>(temperature_value),
                                        ks.defined() ? ks.data_ptr<int64_t>() : nullptr, top_k_value, rng,
                                        out.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream()),
               "sample_next_token");
  return out;
}

}  // namespace
}  // namespace gptfast

TORCH_LIBRARY_FRAGMENT(gptfast_cuda, m) {
  m.def(gptfast::schema::kCrossEntropyFwd);
  m.def(gptfast::schema::kSampleNextToken);
}

TORCH_LIBRARY_IMPL(gptfast_cuda, CUDA, m) {
  m.impl("cross_entropy_fwd", &gptfast::cross_entropy_fwd);
  m.impl("sample_next_token", &gptfast::sample_next_token);
}
