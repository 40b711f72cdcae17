// Torch binding of the CUDA attention kernels (attention_fwd.cu, attention_bwd.cu,
// decode_attention.cu): ops in the gptfast_cuda namespace for the CUDA dispatch key, with
// the shared schemas of csrc/schemas.h (attention_fwd, attention_bwd; decode_attention is
// CUDA-only).
//
// q is (B, H, Tq, D), k and v (B, H_kv, Tk, D) with H a multiple of H_kv (grouped-query
// attention, read in place), Tq <= Tk, float16 or bfloat16, D 64 or 128.
// Any strides are accepted; a tensor whose rows are not 16-byte aligned and contiguous
// along D is copied first.  `seed` is a one-element int64 CUDA tensor (required when
// dropout_p > 0).  lse is the per-query log-sum-exp in log2 units of scale*log2(e)*q.k,
// only meaningful to attention_bwd.  Fake implementations and autograd are registered in
// gptfast/ops/attention.py.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // the current stream (what at::cuda::getCurrentCUDAStream returns)
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cmath>

#include "../schemas.h"
#include "attention_common.cuh"

namespace gptfast {
namespace attention {
namespace {

// The kernels read rows with 16-byte loads: D contiguous, 16-byte aligned base and strides.
bool rows_vector_aligned(const at::Tensor& t) {
  if (t.stride(3) != 1 && t.size(3) > 1) return false;
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int dim = 0; dim < 3; ++dim) {
    if (t.size(dim) > 1 && t.stride(dim) % 8 != 0) return false;
  }
  return true;
}

at::Tensor vector_aligned(const at::Tensor& t) {
  // clone, not contiguous(): a contiguous view at an odd storage offset stays misaligned.
  return rows_vector_aligned(t) ? t : t.clone(at::MemoryFormat::Contiguous);
}

Strides4 strides_of(const at::Tensor& t) {
  // A dimension of size 1 is never stepped along; its stride may be anything.
  auto s = [&](int dim) { return t.size(dim) > 1 ? t.stride(dim) : int64_t{0}; };
  return Strides4{s(0), s(1), s(2)};
}

// The fields every kernel's parameter struct shares: shape, q/k/v pointers and strides.
template <typename Params>
Params qkv_params(const Shape& shape, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  Params p{};
  p.shape = shape;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_stride = strides_of(q);
  p.k_stride = strides_of(k);
  p.v_stride = strides_of(v);
  return p;
}

void check_4d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "gptfast_cuda attention: ", name, " must be 4-D (B, H, T, D), got ", t.sizes());
  TORCH_CHECK(t.is_cuda(), "gptfast_cuda attention: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
              "gptfast_cuda attention: ", name, " must be float16 or bfloat16, got ", t.scalar_type());
}

// Validates q/k/v and returns their shape description.
Shape check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  check_4d(q, "q");
  check_4d(k, "k");
  check_4d(v, "v");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "gptfast_cuda attention: q, k, v must share one dtype");
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(),
              "gptfast_cuda attention: q, k, v must be on one device");
  TORCH_CHECK(k.sizes() == v.sizes(), "gptfast_cuda attention: k and v shapes differ: ", k.sizes(), " vs ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3),
              "gptfast_cuda attention: q ", q.sizes(), " and k ", k.sizes(), " must agree in B and D");
  TORCH_CHECK(k.size(1) == q.size(1) || (k.size(1) >= 1 && q.size(1) >= k.size(1) && q.size(1) % k.size(1) == 0),
              "gptfast_cuda attention: q's heads must be a whole multiple of ",
              "k's heads, got q ", q.sizes(), " and k ", k.sizes());
  TORCH_CHECK(head_dim_supported(static_cast<int>(q.size(3))),
              "gptfast_cuda attention: head_dim must be 64 or 128, got ", q.size(3));
  TORCH_CHECK(q.size(2) >= 1 && q.size(2) <= k.size(2), "gptfast_cuda attention: need 1 <= Tq <= Tk, got Tq=",
              q.size(2), " Tk=", k.size(2));
  TORCH_CHECK(q.size(0) <= 65535 && q.size(1) <= 65535, "gptfast_cuda attention: batch and heads must be <= 65535");
  TORCH_CHECK(k.size(2) < (int64_t{1} << 30), "gptfast_cuda attention: too many keys: ", k.size(2));
  TORCH_CHECK(std::isfinite(scale) && scale > 0, "gptfast_cuda attention: scale must be positive, got ", scale);
  return Shape{static_cast<int>(q.size(0)), static_cast<int>(q.size(1)), static_cast<int>(k.size(1)),
               static_cast<int>(q.size(2)), static_cast<int>(k.size(2)),  static_cast<int>(q.size(3)),
               q.scalar_type() == at::kBFloat16, static_cast<float>(scale)};
}

Dropout make_dropout(double dropout_p, const c10::optional<at::Tensor>& seed, const at::Tensor& q) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, "gptfast_cuda attention: dropout_p must be in [0, 1], got ",
              dropout_p);
  Dropout d{false, 0u, 1.f, nullptr};
  if (dropout_p == 0.0) return d;
  TORCH_CHECK(seed.has_value(), "gptfast_cuda attention: dropout_p > 0 needs a seed tensor");
  const at::Tensor& s = *seed;
  TORCH_CHECK(s.device() == q.device() && s.scalar_type() == at::kLong && s.numel() >= 1 && s.is_contiguous(),
              "gptfast_cuda attention: seed must be a contiguous int64 tensor with >= 1 element on q's device");
  d.enabled = true;
  // keep iff word >= threshold, so P(drop) = threshold / 2^32 = p (to 2^-32).
  const double scaled = dropout_p * 4294967296.0;
  d.threshold = scaled >= 4294967295.0 ? 0xffffffffu : static_cast<uint32_t>(scaled);
  d.inv_keep = dropout_p >= 1.0 ? 0.f : static_cast<float>(1.0 / (1.0 - dropout_p));
  d.seed = s.data_ptr<int64_t>();
  return d;
}

// Multiprocessor count of `device`, looked up once per device.
int sm_count(int device) {
  static std::array<std::atomic<int>, 64> cache{};
  if (device < 0 || device >= static_cast<int>(cache.size())) return 132;
  int n = cache[device].load(std::memory_order_relaxed);
  if (n == 0) {
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0) n = 132;
    cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "gptfast_cuda ", what, " launch failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q_in, const at::Tensor& k_in,
                                                 const at::Tensor& v_in, double scale, double dropout_p,
                                                 const c10::optional<at::Tensor>& seed) {
  const Shape shape = check_qkv(q_in, k_in, v_in, scale);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = vector_aligned(q_in), k = vector_aligned(k_in), v = vector_aligned(v_in);
  at::Tensor out = at::empty({shape.batch, shape.heads, shape.tq, shape.head_dim}, q.options());
  at::Tensor lse = at::empty({shape.batch, shape.heads, shape.tq}, q.options().dtype(at::kFloat));
  FwdParams p = qkv_params<FwdParams>(shape, q, k, v);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.dropout = make_dropout(dropout_p, seed, q);
  if (out.numel() == 0) return {out, lse};  // B or H is 0: nothing to launch
  check_launch(launch_attention_fwd(p, current_stream()), "attention_fwd");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(const at::Tensor& grad_out, const at::Tensor& q_in,
                                                             const at::Tensor& k_in, const at::Tensor& v_in,
                                                             const at::Tensor& out_in, const at::Tensor& lse_in,
                                                             double scale, double dropout_p,
                                                             const c10::optional<at::Tensor>& seed) {
  const Shape shape = check_qkv(q_in, k_in, v_in, scale);
  check_4d(grad_out, "grad_out");
  check_4d(out_in, "out");
  TORCH_CHECK(grad_out.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(),
              "gptfast_cuda attention_bwd: grad_out and out must have q's shape ", q_in.sizes());
  TORCH_CHECK(grad_out.scalar_type() == q_in.scalar_type() && out_in.scalar_type() == q_in.scalar_type(),
              "gptfast_cuda attention_bwd: grad_out and out must have q's dtype");
  TORCH_CHECK(grad_out.device() == q_in.device() && out_in.device() == q_in.device(),
              "gptfast_cuda attention_bwd: grad_out and out must be on q's device ", q_in.device(), ", got ",
              grad_out.device(), " and ", out_in.device());
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat && lse_in.dim() == 3 && lse_in.size(0) == shape.batch &&
                  lse_in.size(1) == shape.heads && lse_in.size(2) == shape.tq && lse_in.device() == q_in.device(),
              "gptfast_cuda attention_bwd: lse must be the float32 (B, H, Tq) tensor from attention_fwd");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = vector_aligned(q_in), k = vector_aligned(k_in), v = vector_aligned(v_in);
  const at::Tensor out = vector_aligned(out_in), dout = vector_aligned(grad_out);
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor delta = at::empty({shape.batch, shape.heads, shape.tq}, q.options().dtype(at::kFloat));
  at::Tensor dq_accum = at::zeros({shape.batch, shape.heads, shape.tq, shape.head_dim}, q.options().dtype(at::kFloat));
  at::Tensor dk = at::empty({shape.batch, shape.kv_heads, shape.tk, shape.head_dim}, q.options());
  at::Tensor dv = at::empty({shape.batch, shape.kv_heads, shape.tk, shape.head_dim}, q.options());
  BwdParams p = qkv_params<BwdParams>(shape, q, k, v);
  p.out = out.data_ptr();
  p.dout = dout.data_ptr();
  p.out_stride = strides_of(out);
  p.dout_stride = strides_of(dout);
  p.lse = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dq_accum = dq_accum.data_ptr<float>();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dropout = make_dropout(dropout_p, seed, q);
  if (dq_accum.numel() == 0) return {dq_accum.to(q.scalar_type()), dk, dv};  // B or H is 0
  check_launch(launch_attention_bwd(p, current_stream()), "attention_bwd");
  return {dq_accum.to(q.scalar_type()), dk, dv};
}

at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, double scale) {
  const Shape shape = check_qkv(q_in, k_in, v_in, scale);
  TORCH_CHECK(shape.tq == 1, "gptfast_cuda decode_attention: q must hold one token (Tq = 1), got ", shape.tq);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = vector_aligned(q_in), k = vector_aligned(k_in), v = vector_aligned(v_in);
  DecodeParams p = qkv_params<DecodeParams>(shape, q, k, v);
  decode_split(static_cast<int64_t>(shape.batch) * shape.heads, shape.tk,
               sm_count(q.get_device()), &p.splits, &p.chunk);
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor out = at::empty({shape.batch, shape.heads, 1, shape.head_dim}, q.options());
  at::Tensor partial_acc = at::empty({shape.batch, shape.heads, p.splits, shape.head_dim}, f32);
  at::Tensor partial_max = at::empty({shape.batch, shape.heads, p.splits}, f32);
  at::Tensor partial_sum = at::empty({shape.batch, shape.heads, p.splits}, f32);
  p.out = out.data_ptr();
  p.partial_acc = partial_acc.data_ptr<float>();
  p.partial_max = partial_max.data_ptr<float>();
  p.partial_sum = partial_sum.data_ptr<float>();
  if (out.numel() == 0) return out;  // B or H is 0
  check_launch(launch_decode_attention(p, current_stream()), "decode_attention");
  return out;
}

}  // namespace
}  // namespace attention
}  // namespace gptfast

TORCH_LIBRARY_FRAGMENT(gptfast_cuda, m) {
  m.def(gptfast::schema::kAttentionFwd);
  m.def(gptfast::schema::kAttentionBwd);
  m.def(gptfast::schema::kDecodeAttention);
}

TORCH_LIBRARY_IMPL(gptfast_cuda, CUDA, m) {
  m.impl("attention_fwd", &gptfast::attention::attention_fwd);
  m.impl("attention_bwd", &gptfast::attention::attention_bwd);
  m.impl("decode_attention", &gptfast::attention::decode_attention);
}
