// Constants that the book's modules compute with torch while they run, computed here the same way.
// Header-only, ATen only: included by the CPU kernels and by the CUDA extension's host code.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/MathConstants.h>

namespace gptfast_book {

// sqrt(2/pi) as the book's GELU obtains it: torch.sqrt(torch.tensor(2.0 / torch.pi)), the square
// root of a float32 0-dim tensor.  Its last bit is whatever torch computes on the machine at hand
// (two x86-64 CPUs have given values one float32 step apart), so a literal would match the book on
// some machines only.  Taken from torch once per process.
inline float gelu_sqrt_two_over_pi() {
  static const float value = at::sqrt(at::scalar_tensor(2.0 / c10::pi<double>, at::kFloat)).item<float>();
  return value;
}

}  // namespace gptfast_book
