// The torch-op schemas of gptfast's kernels: one schema per op, the same in every namespace
// (gptfast_cpu, gptfast_cuda, gptfast_triton).  The C++ libraries define their ops from these
// strings; csrc/triton declares the same signatures in Python, and tests/test_ops_dispatch.py
// checks that every registered namespace matches this list.  The Python layer above the kernels
// (gptfast/ops/attention.py, loss.py, sampling.py) registers fakes and autograd and is
// the only caller.  (triton_op infers Python ints as SymInt, an int that may be symbolic while
// tracing; the call is the same.)
//
// attention_fwd(q, k, v, scale, dropout_p, seed) -> (out, lse)
//   q (B, H, Tq, D), k/v (B, H_kv, Tk, D) with H % H_kv == 0 (query head h reads kv head
//   h / (H / H_kv); grouped-query attention), Tq <= Tk: query i sits at position Tk - Tq + i.
//   out (B, H, Tq, D) contiguous, q's dtype; lse (B, H, Tq) contiguous, float32 (float64 for
//   float64 inputs on cpu): a per-query log-sum-exp only attention_bwd interprets.
//   seed: one-element int64 tensor on q's device, drawn from torch's generator by the caller;
//   the dropout mask is a pure function of (seed, batch, head, query, key).  None iff
//   dropout_p == 0 is allowed.
// attention_bwd(grad_out, q, k, v, out, lse, scale, dropout_p, seed) -> (dq, dk, dv)
//   The forward's out and lse and the same seed; gradients contiguous, in q's dtype, dk/dv
//   (B, H_kv, Tk, D): each sums the gradients of its group's query heads.
// cross_entropy_fwd(logits, targets, ignore_index, want_grad) -> (loss_rows, grad)
//   logits (N, V) with unit column stride (rows may be strided), targets (N,) int64 or int32.
//   loss_rows (N,) float32 (float64 for float64 logits): 0 where ignored, NaN for a target
//   outside [0, V).  grad: softmax - onehot (N, V) contiguous in logits' dtype, zero rows where
//   ignored, when want_grad; else an empty tensor.
// sample_next_token(logits, temperature, temperature_value, top_k, top_k_value, generator) -> tokens
//   logits (B, V); tokens (B, 1) int64.  temperature: per-row float32 (B,) or None, then
//   temperature_value applies to every row; <= 0 means greedy (argmax, first index on ties).
//   top_k: per-row int64 (B,) or None, then top_k_value applies; every logit >= the row's k-th
//   largest is kept (ties kept).  "No top-k" is spelt top_k_value = V.  generator: the caller's
//   torch.Generator on logits' device, or None for the default one; greedy calls draw nothing
//   on cpu and triton.
//
// rms_norm_fwd(x, weight, eps) -> (out, rstd)
//   x (N, D), weight (D,) of any float dtype.  out = x * rstd * weight computed in float32
//   (float64 for float64 x on cpu) and rounded once to x's dtype, out (N, D) contiguous;
//   rstd (N,) float32 (float64 for float64 x on cpu) = 1 / sqrt(mean(x^2) + eps).
// rms_norm_bwd(grad_out, x, weight, rstd) -> (dx, dweight)
//   The forward's rstd; dx (N, D) contiguous in x's dtype, dweight (D,) in weight's dtype,
//   summed over the rows in a fixed order (deterministic).
// layer_norm_fwd(x, weight, bias, eps) -> (out, mean, rstd)
//   x (N, D), weight and bias (D,) of any float dtype, eps >= 0.  out = (x - mean) * rstd * weight
//   + bias computed in float32 (float64 for float64 x on cpu) and rounded once to x's dtype, out
//   (N, D) contiguous; mean and rstd (N,) in that accumulation dtype, rstd = 1 / sqrt(var + eps)
//   with the biased variance (mean of squared deviations).
// layer_norm_bwd(grad_out, x, weight, mean, rstd) -> (dx, dweight, dbias)
//   The forward's mean and rstd; dx (N, D) contiguous in x's dtype; dweight and dbias (D,) in the
//   accumulation dtype (the caller casts them to the parameters' dtypes), summed over the rows in
//   a fixed order (deterministic).
// swiglu_fwd(gate, up) -> out
//   silu(gate) * up elementwise; gate and up of one shape and dtype; out contiguous, that dtype
//   (math in float32, float64 for float64 on cpu).
// swiglu_bwd(grad_out, gate, up) -> (d_gate, d_up)
//   Recomputed from gate and up; both contiguous in gate's dtype.
// gelu_fwd(x) -> out
//   GPT-2's tanh GELU 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) elementwise, sqrt(2/pi)
//   being the book's float32 torch.sqrt(torch.tensor(2/pi)), taken from torch at run time; out
//   contiguous in x's dtype (math in float32, float64 for float64 on cpu).
// gelu_bwd(grad_out, x) -> dx
//   Recomputed from x (the forward's output is not needed); dx contiguous in x's dtype.
// dropout_fwd(x, p, seed) -> out
//   out = x * keep / (1 - p) elementwise (0 <= p <= 1; p = 1 drops everything), contiguous in x's
//   dtype, math in float32 (float64 for float64 on cpu), rounded once; a dropped element is
//   multiplied by 0, so NaN and inf give NaN as in torch.  keep is a pure function of (seed, the
//   element's index in the contiguous tensor) defined in csrc/dropout_hash.h, the same on every
//   backend.  seed: one-element int64 tensor on x's device.  The backward is this op on grad_out
//   with the same p and seed.
// rope_fwd(x, cos, sin, positions, offset) -> out
//   Rotate-half rotary embedding of x (B, H, T, D), D even, unit stride along D (other strides
//   free): out = x * cos[p] + cat(-x2, x1) * sin[p] with p = offset + t, or p = positions[b, t]
//   when positions (B, T) int64 is given (offset then unused).  cos/sin (P, D), every p in
//   [0, P) (checked by the kernels).  out (B, H, T, D) contiguous in x's dtype.
// rope_bwd(grad_out, cos, sin, positions, offset) -> grad_x
//   The transpose of the forward's rotation applied to grad_out; same layout rules.
//
// decode_linear(x, weight, bias) -> out
//   x (M, K) with few rows (a decode step's tokens), weight (N, K), bias (N,) or None, all of
//   one dtype (float32, bfloat16, float16).  out (M, N) contiguous in x's dtype =
//   x @ weight.T + bias, accumulated in float32 and rounded once; each weight row is read once
//   for all the rows of a register tile (cpu: all M rows; cuda: 16, triton: up to 64; more rows
//   take further passes).  No gradient formula in the kernels (gptfast/ops/linear.py).
//
// cpu only (no counterpart elsewhere):
// cross_entropy_fwd_inplace(logits, targets, ignore_index) -> loss_rows
//   cross_entropy_fwd with want_grad, the gradient written over logits (contiguous) itself: the
//   linear cross-entropy's chunk of logits becomes its gradient without a second buffer.
//
// cuda only (no counterpart elsewhere):
// decode_attention(q, k, v, scale) -> out
//   Tq == 1 against a long KV cache (split-key flash decoding); no dropout, no gradient.
#pragma once

namespace gptfast {
namespace schema {

constexpr const char* kAttentionFwd =
    "attention_fwd(Tensor q, Tensor k, Tensor v, float scale, float dropout_p, Tensor? seed) -> (Tensor, Tensor)";
constexpr const char* kAttentionBwd =
    "attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale, "
    "float dropout_p, Tensor? seed) -> (Tensor, Tensor, Tensor)";
constexpr const char* kCrossEntropyFwd =
    "cross_entropy_fwd(Tensor logits, Tensor targets, int ignore_index, bool want_grad) -> (Tensor, Tensor)";
constexpr const char* kCrossEntropyFwdInplace =
    "cross_entropy_fwd_inplace(Tensor(a!) logits, Tensor targets, int ignore_index) -> Tensor";
constexpr const char* kSampleNextToken =
    "sample_next_token(Tensor logits, Tensor? temperature, float temperature_value, Tensor? top_k, "
    "int top_k_value, Generator? generator) -> Tensor";
constexpr const char* kRmsNormFwd = "rms_norm_fwd(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)";
constexpr const char* kRmsNormBwd =
    "rms_norm_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)";
constexpr const char* kLayerNormFwd =
    "layer_norm_fwd(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor)";
constexpr const char* kLayerNormBwd =
    "layer_norm_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor)";
constexpr const char* kSwigluFwd = "swiglu_fwd(Tensor gate, Tensor up) -> Tensor";
constexpr const char* kSwigluBwd = "swiglu_bwd(Tensor grad_out, Tensor gate, Tensor up) -> (Tensor, Tensor)";
constexpr const char* kGeluFwd = "gelu_fwd(Tensor x) -> Tensor";
constexpr const char* kGeluBwd = "gelu_bwd(Tensor grad_out, Tensor x) -> Tensor";
constexpr const char* kDropoutFwd = "dropout_fwd(Tensor x, float p, Tensor seed) -> Tensor";
constexpr const char* kRopeFwd = "rope_fwd(Tensor x, Tensor cos, Tensor sin, Tensor? positions, int offset) -> Tensor";
constexpr const char* kRopeBwd =
    "rope_bwd(Tensor grad_out, Tensor cos, Tensor sin, Tensor? positions, int offset) -> Tensor";
constexpr const char* kDecodeLinear = "decode_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor";
constexpr const char* kDecodeAttention = "decode_attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor";

}  // namespace schema
}  // namespace gptfast
