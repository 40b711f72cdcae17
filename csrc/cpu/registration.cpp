// Registers the CPU kernels as torch ops gptfast_cpu::*.  Fake (meta) implementations and
// autograd formulas are registered from Python (gptfast/ops/cpu_ops.py).
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

// Importing gptfast._C_cpu runs the static registrations below; the module itself is empty.
extern "C" PyObject* PyInit__C_cpu(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cpu", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(gptfast_cpu, m) {
  m.def("attention_forward(Tensor q, Tensor k, Tensor v, float scale, float dropout_p, int seed) -> (Tensor, Tensor)");
  m.def(
      "attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale, "
      "float dropout_p, int seed) -> (Tensor, Tensor, Tensor)");
  m.def("cross_entropy_forward(Tensor logits, Tensor targets, int ignore_index, bool compute_grad) -> (Tensor, Tensor)");
  m.def(
      "sample_next_token(Tensor logits, float temperature, int top_k, Tensor? temperatures, Tensor? top_ks, "
      "Tensor uniforms) -> Tensor");
}

TORCH_LIBRARY_IMPL(gptfast_cpu, CPU, m) {
  m.impl("attention_forward", &gptfast_cpu::attention_forward);
  m.impl("attention_backward", &gptfast_cpu::attention_backward);
  m.impl("cross_entropy_forward", &gptfast_cpu::cross_entropy_forward);
  m.impl("sample_next_token", &gptfast_cpu::sample_next_token);
}
