// Registers the CPU kernels as torch ops gptfast_cpu::* with the shared schemas (csrc/schemas.h).
// Fake (meta) implementations and autograd formulas are registered from Python
// (gptfast/ops/attention.py, loss.py, sampling.py, when gptfast.ops.cpu_ops loads this).
#include <Python.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include "../schemas.h"
#include "ops.h"

// Importing gptfast._C_cpu (or its AVX-512 build, gptfast._C_cpu_avx512: setup.py names each build
// through TORCH_EXTENSION_NAME) runs the static registrations below; the module holds one constant.
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C_cpu
#endif
#define GPTFAST_JOIN_(a, b) a##b
#define GPTFAST_JOIN(a, b) GPTFAST_JOIN_(a, b)
#define GPTFAST_STRING_(a) #a
#define GPTFAST_STRING(a) GPTFAST_STRING_(a)

namespace {

// The forward kernels a decode plan calls, as plain functions of the module (direct_<op>): called
// through pybind11 they cost ~0.4 us, where the torch op's dispatch costs ~6 us even below autograd,
// ~400 times a step of a 28-layer model.  They bypass the dispatcher (no autograd, no dispatch modes, no
// profiler record), so gptfast hands them only to a caller that holds its no-autograd guard over plain
// CPU tensors (gptfast/ops/_dispatch.py, bound_kernel); every kernel still checks its arguments.
// Like the op, each releases the GIL while its kernel runs (other Python threads go on).
void add_direct_calls(PyObject* created) {
  auto module = pybind11::reinterpret_borrow<pybind11::module_>(created);
  const auto released = pybind11::call_guard<pybind11::gil_scoped_release>();
  module.def("direct_decode_linear", &gptfast_cpu::decode_linear, released);
  module.def("direct_rms_norm_fwd", &gptfast_cpu::rms_norm_fwd, released);
  module.def("direct_layer_norm_fwd", &gptfast_cpu::layer_norm_fwd, released);
  module.def("direct_rope_fwd", &gptfast_cpu::rope_fwd, released);
  module.def("direct_swiglu_fwd", &gptfast_cpu::swiglu_fwd, released);
  module.def("direct_gelu_fwd", &gptfast_cpu::gelu_fwd, released);
}

}  // namespace

extern "C" PyObject* GPTFAST_JOIN(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, GPTFAST_STRING(TORCH_EXTENSION_NAME), nullptr, -1,
                                      nullptr};
  PyObject* created = PyModule_Create(&module);
  if (created == nullptr) return nullptr;
  // The Python routing reads which bf16 rows decode_linear multiplies without widening (0: none).
  if (PyModule_AddIntConstant(created, "BF16_NATIVE_MAX_ROWS", gptfast_cpu::decode_linear_bf16_native_rows()) != 0) {
    Py_DECREF(created);
    return nullptr;
  }
  try {
    add_direct_calls(created);
  } catch (pybind11::error_already_set& error) {
    error.restore();
    Py_DECREF(created);
    return nullptr;
  } catch (const std::exception& error) {
    PyErr_SetString(PyExc_ImportError, error.what());
    Py_DECREF(created);
    return nullptr;
  }
  return created;
}

TORCH_LIBRARY(gptfast_cpu, m) {
  m.def(gptfast::schema::kAttentionFwd);
  m.def(gptfast::schema::kAttentionBwd);
  m.def(gptfast::schema::kCrossEntropyFwd);
  m.def(gptfast::schema::kCrossEntropyFwdInplace);
  m.def(gptfast::schema::kSampleNextToken);
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

TORCH_LIBRARY_IMPL(gptfast_cpu, CPU, m) {
  m.impl("attention_fwd", &gptfast_cpu::attention_fwd);
  m.impl("attention_bwd", &gptfast_cpu::attention_bwd);
  m.impl("cross_entropy_fwd", &gptfast_cpu::cross_entropy_fwd);
  m.impl("cross_entropy_fwd_inplace", &gptfast_cpu::cross_entropy_fwd_inplace);
  m.impl("sample_next_token", &gptfast_cpu::sample_next_token);
  m.impl("rms_norm_fwd", &gptfast_cpu::rms_norm_fwd);
  m.impl("rms_norm_bwd", &gptfast_cpu::rms_norm_bwd);
  m.impl("layer_norm_fwd", &gptfast_cpu::layer_norm_fwd);
  m.impl("layer_norm_bwd", &gptfast_cpu::layer_norm_bwd);
  m.impl("swiglu_fwd", &gptfast_cpu::swiglu_fwd);
  m.impl("swiglu_bwd", &gptfast_cpu::swiglu_bwd);
  m.impl("gelu_fwd", &gptfast_cpu::gelu_fwd);
  m.impl("gelu_bwd", &gptfast_cpu::gelu_bwd);
  m.impl("dropout_fwd", &gptfast_cpu::dropout_fwd);
  m.impl("rope_fwd", &gptfast_cpu::rope_fwd);
  m.impl("rope_bwd", &gptfast_cpu::rope_bwd);
  m.impl("decode_linear", &gptfast_cpu::decode_linear);
}
