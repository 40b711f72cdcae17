// Host-side entry points of rms_norm.cu, layer_norm.cu, swiglu.cu, gelu.cu, dropout.cu, rope.cu and decode_linear.cu
// (the layer ops),
// called by the torch binding ops_layers.cpp and by the CPU emulator's checks.  Plain C++ (raw
// pointers, sizes, a stream): the .cu files never see torch headers.  Each function launches on
// `stream` and returns the launch's cudaError_t (cudaSuccess when there is nothing to do).
// Every tensor is contiguous; math is float32.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "loss_sampling_launch.h"  // FloatType

namespace gptfast {

// out (rows x dim, x's dtype) = x * rstd * weight; rstd[r] = 1 / sqrt(mean(x[r]^2) + eps).
// weight: dim float32 values.
cudaError_t launch_rms_norm_fwd(const void* x, FloatType dtype, const float* weight, int64_t rows, int64_t dim,
                                float eps, void* out, float* rstd, cudaStream_t stream);

// Number of row blocks of the backward: the rows of its float32 partial buffer (blocks x dim).
int64_t rms_norm_bwd_blocks(int64_t rows);

// dx (rows x dim, x's dtype) and dweight (dim values of weight_dtype) for the forward's rstd.
// partial: rms_norm_bwd_blocks(rows) x dim float32 scratch; dweight sums it in block order.
cudaError_t launch_rms_norm_bwd(const void* grad, const void* x, FloatType dtype, const float* weight,
                                const float* rstd, int64_t rows, int64_t dim, void* dx, float* partial,
                                void* dweight, FloatType weight_dtype, cudaStream_t stream);

// out (rows x dim, x's dtype) = (x - mean) * rstd * weight + bias; mean[r] and rstd[r] =
// 1 / sqrt(var + eps) with the biased variance of row r.  weight, bias: dim float32 values.
cudaError_t launch_layer_norm_fwd(const void* x, FloatType dtype, const float* weight, const float* bias,
                                  int64_t rows, int64_t dim, float eps, void* out, float* mean, float* rstd,
                                  cudaStream_t stream);

// Number of row blocks of the LayerNorm backward: its float32 partial buffer is
// 2 * layer_norm_bwd_blocks(rows) x dim (each block's dweight row, then its dbias row).
int64_t layer_norm_bwd_blocks(int64_t rows);

// dx (rows x dim, x's dtype), dweight and dbias (dim float32 values each) for the forward's
// mean and rstd; both sum the partial buffer in block order.
cudaError_t launch_layer_norm_bwd(const void* grad, const void* x, FloatType dtype, const float* weight,
                                  const float* mean, const float* rstd, int64_t rows, int64_t dim, void* dx,
                                  float* partial, float* dweight, float* dbias, cudaStream_t stream);

// out[i] = silu(gate[i]) * up[i] for i < n.
cudaError_t launch_swiglu_fwd(const void* gate, const void* up, FloatType dtype, int64_t n, void* out,
                              cudaStream_t stream);
// d_gate[i], d_up[i] from grad, gate, up (recomputed sigmoid).
cudaError_t launch_swiglu_bwd(const void* grad, const void* gate, const void* up, FloatType dtype, int64_t n,
                              void* d_gate, void* d_up, cudaStream_t stream);

// out[i] = GPT-2's tanh GELU of x[i] for i < n; beta is its sqrt(2/pi) (the book's float32 value).
// out[i] = x[i] * keep(seed, i) / (1 - p) for i < n (csrc/dropout_hash.h); seed: one int64 in device
// memory.  0 <= p <= 1.
cudaError_t launch_dropout(const void* x, FloatType dtype, int64_t n, const int64_t* seed, double p, void* out,
                           cudaStream_t stream);
cudaError_t launch_gelu_fwd(const void* x, FloatType dtype, int64_t n, float beta, void* out, cudaStream_t stream);
// dx[i] from grad and x (recomputed from x).
cudaError_t launch_gelu_bwd(const void* grad, const void* x, FloatType dtype, int64_t n, float beta, void* dx,
                            cudaStream_t stream);

// Rotate-half RoPE of x (B, H, T, D; element (b, h, t, j) at b*sb + h*sh + t*st + j) into a
// contiguous out.  Position of (b, t): positions[b*T + t] when positions != nullptr, else
// offset + t; tables cos/sin (table_rows x D float32).  A position outside [0, table_rows)
// is never read: its output row is NaN.  backward applies the transposed rotation.
cudaError_t launch_rope(const void* x, FloatType dtype, int64_t B, int64_t H, int64_t T, int64_t D, int64_t sb,
                        int64_t sh, int64_t st, const float* cos, const float* sin, int64_t table_rows,
                        const int64_t* positions, int64_t offset, bool backward, void* out, cudaStream_t stream);

// out (M x N, x's dtype) = x (M x K) @ weight (N x K).T + bias (N values, or nullptr), float32
// accumulation, one rounding.  x, weight, bias and out share dtype; all contiguous.
cudaError_t launch_decode_linear(const void* x, const void* weight, const void* bias, FloatType dtype, int64_t M,
                                 int64_t N, int64_t K, void* out, cudaStream_t stream);

}  // namespace gptfast
