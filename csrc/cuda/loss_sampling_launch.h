// Host-side entry points of cross_entropy.cu and sampling.cu, called by the torch
// binding ops_loss_sampling.cpp.  Plain C++ (raw pointers, sizes, a stream): the
// .cu files never see torch headers.  Each function launches on `stream` and
// returns the launch's cudaError_t (cudaSuccess when nothing was launched).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace gptfast {

enum class FloatType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Graph-safe Philox seed/offset as torch's generator hands them out (the fields of
// at::PhiloxCudaState): while a CUDA graph is being captured, seed and offset are
// read on the device from seed_ptr / offset_ptr (+ offset_intragraph).
struct PhiloxLaunchArgs {
  uint64_t seed;
  uint64_t offset;
  const int64_t* seed_ptr;
  const int64_t* offset_ptr;
  uint64_t offset_intragraph;
  bool captured;
};

// Per row r of logits (rows x vocab, element (r, j) at logits[r * row_stride + j]):
// loss_rows[r] = logsumexp(row) - row[target] (0 for ignore_index, NaN for a target
// outside [0, vocab)); and, when grad != nullptr, grad row r = softmax(row) - onehot
// (zeros for ignore_index, NaN for a bad target).  grad may equal logits (in place).
// targets are int64 when targets_int64, else int32.
cudaError_t launch_cross_entropy_fwd(const void* logits, int64_t row_stride, FloatType dtype, const void* targets,
                                     bool targets_int64, int64_t rows, int64_t vocab, int64_t ignore_index,
                                     float* loss_rows, void* grad, int64_t grad_row_stride, cudaStream_t stream);

// Number of Philox 128-bit counters one sampling call consumes per row; torch's
// generator offset must be advanced by 4 times this (it counts 32-bit draws).
int64_t sampling_philox_counters(int64_t vocab);

// out[r] = token drawn from row r: argmax when its temperature is not > 0, else a
// draw from softmax(row / temperature) restricted to the values >= the row's
// top_k-th largest.  temperature / top_k point to one value per row or are null
// (then temperature_value / top_k_value apply to all rows); top_k is clamped to
// [1, vocab] on the device.
cudaError_t launch_sample_next_token(const void* logits, int64_t row_stride, FloatType dtype, int64_t rows,
                                     int64_t vocab, const float* temperature, float temperature_value,
                                     const int64_t* top_k, int64_t top_k_value, PhiloxLaunchArgs rng,
                                     int64_t* out, cudaStream_t stream);

}  // namespace gptfast
