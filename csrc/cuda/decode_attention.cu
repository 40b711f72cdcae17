// Decode attention: one new query per (batch, head) against a long KV cache.
//
// Flash-decoding: the keys of each (b, h) are cut into `splits` chunks, one thread
// block per chunk, so even batch 1 puts work on every SM.  Inside a block, groups of
// D/8 lanes each take one key at a time (16-byte loads of K and V, a shuffle-reduced
// dot product) and keep their own online-softmax state; the block merges its groups
// and writes an unnormalised partial (max, sum, acc[D]) in fp32.  A second kernel
// merges the chunks of each (b, h) and normalises.  The single query is the last
// position, so it sees every key: no mask.
#include "attention_common.cuh"

namespace gptfast {
namespace attention {
namespace {

constexpr int kDecodeThreads = 128;
constexpr int kDecodeUnroll = 4;  // keys in flight per group (memory-level parallelism)

template <bool kBf16, int kD>
__global__ void __launch_bounds__(kDecodeThreads) decode_partial_kernel(const DecodeParams p) {
  using E = Elem<kBf16>;
  using T = typename E::T;
  constexpr int kLanes = kD / 8;                  // lanes per key: 8 elements (16 bytes) each
  constexpr int kGroups = kDecodeThreads / kLanes;
  static_assert(32 % kLanes == 0, "a key's lanes must sit inside one warp");

  __shared__ float s_max[kGroups], s_sum[kGroups];
  __shared__ float s_acc[kGroups][kD];

  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, group = tid / kLanes, lane_in_group = tid % kLanes;
  const int d0 = lane_in_group * 8;
  const int64_t bh = static_cast<int64_t>(b) * p.shape.heads + h;

  const T* qg = static_cast<const T*>(p.q) + b * p.q_stride.batch + h * p.q_stride.head;
  const int hk = h / (p.shape.heads / p.shape.kv_heads);  // the kv head this query head reads
  const T* kg = static_cast<const T*>(p.k) + b * p.k_stride.batch + hk * p.k_stride.head + d0;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_stride.batch + hk * p.v_stride.head + d0;

  // The query slice, pre-multiplied by scale * log2(e) so the softmax can use exp2.
  float q[8];
  {
    const uint4 raw = *reinterpret_cast<const uint4*>(qg + d0);
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
    const float qk_scale = p.shape.scale * kLog2e;
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const float2 f = E::unpack(words[w]);
      q[2 * w] = f.x * qk_scale;
      q[2 * w + 1] = f.y * qk_scale;
    }
  }

  const int start = split * p.chunk;
  const int end = min(p.shape.tk, start + p.chunk);
  float run_max = -INFINITY, run_sum = 0.f;
  float acc[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) acc[e] = 0.f;

  // Uniform trip count for the whole block, so every lane reaches every shuffle.
  for (int base = start; base < end; base += kDecodeUnroll * kGroups) {
    uint4 kraw[kDecodeUnroll], vraw[kDecodeUnroll];
    bool valid[kDecodeUnroll];
#pragma unroll
    for (int u = 0; u < kDecodeUnroll; ++u) {
      const int j = base + u * kGroups + group;
      valid[u] = j < end;
      const int64_t row = static_cast<int64_t>(valid[u] ? j : start);
      kraw[u] = *reinterpret_cast<const uint4*>(kg + row * p.k_stride.token);
      // A slot past the chunk weighs zeros, not a real key's value: 0 * inf there would be a NaN.
      vraw[u] = valid[u] ? *reinterpret_cast<const uint4*>(vg + row * p.v_stride.token) : make_uint4(0, 0, 0, 0);
    }
    float score[kDecodeUnroll];
    float tile_max = -INFINITY;
#pragma unroll
    for (int u = 0; u < kDecodeUnroll; ++u) {
      const uint32_t words[4] = {kraw[u].x, kraw[u].y, kraw[u].z, kraw[u].w};
      float dot = 0.f;
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const float2 f = E::unpack(words[w]);
        dot = fmaf(q[2 * w], f.x, dot);
        dot = fmaf(q[2 * w + 1], f.y, dot);
      }
#pragma unroll
      for (int off = kLanes / 2; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
      score[u] = valid[u] ? dot : -INFINITY;
      tile_max = fmaxf(tile_max, score[u]);
    }
    // fmaxf passes over NaN scores, so the maxima stay numbers; a NaN score's weight exp2(NaN) = NaN
    // then reaches the sum and the output, as in the softmax.  With no finite score yet (a NaN query,
    // or only padding slots) exp2 takes 0 as the max, so no -inf - -inf ever makes a NaN of its own.
    const float new_max = fmaxf(run_max, tile_max);
    const float safe = new_max == -INFINITY ? 0.f : new_max;
    const float rescale = exp2f(run_max - safe);
    run_sum *= rescale;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] *= rescale;
#pragma unroll
    for (int u = 0; u < kDecodeUnroll; ++u) {
      const float w = exp2f(score[u] - safe);  // 0 for invalid keys
      run_sum += w;
      const uint32_t words[4] = {vraw[u].x, vraw[u].y, vraw[u].z, vraw[u].w};
#pragma unroll
      for (int x = 0; x < 4; ++x) {
        const float2 f = E::unpack(words[x]);
        acc[2 * x] = fmaf(w, f.x, acc[2 * x]);
        acc[2 * x + 1] = fmaf(w, f.y, acc[2 * x + 1]);
      }
    }
    run_max = new_max;
  }

  // Merge the groups of this block.
#pragma unroll
  for (int e = 0; e < 8; ++e) s_acc[group][d0 + e] = acc[e];
  if (lane_in_group == 0) {
    s_max[group] = run_max;
    s_sum[group] = run_sum;
  }
  __syncthreads();
  if (tid < kD) {
    float m = -INFINITY;
#pragma unroll
    for (int gi = 0; gi < kGroups; ++gi) m = fmaxf(m, s_max[gi]);
    const float safe = m == -INFINITY ? 0.f : m;
    float sum = 0.f, a = 0.f;
#pragma unroll
    for (int gi = 0; gi < kGroups; ++gi) {
      const float w = exp2f(s_max[gi] - safe);  // 0 for a group that saw no key
      sum += s_sum[gi] * w;
      a += s_acc[gi][tid] * w;
    }
    const int64_t slot = bh * p.splits + split;
    p.partial_acc[slot * kD + tid] = a;
    if (tid == 0) {
      p.partial_max[slot] = m;
      p.partial_sum[slot] = sum;
    }
  }
}

// One block of D threads per (b, h): merge the chunk partials and normalise.
template <bool kBf16, int kD>
__global__ void __launch_bounds__(kD) decode_combine_kernel(const DecodeParams p) {
  using E = Elem<kBf16>;
  using T = typename E::T;
  const int h = blockIdx.x, b = blockIdx.y, d = threadIdx.x;
  const int64_t bh = static_cast<int64_t>(b) * p.shape.heads + h;
  const float* pmax = p.partial_max + bh * p.splits;
  const float* psum = p.partial_sum + bh * p.splits;
  const float* pacc = p.partial_acc + bh * p.splits * kD;
  float m = -INFINITY;
  for (int s = 0; s < p.splits; ++s) m = fmaxf(m, pmax[s]);
  const float safe = m == -INFINITY ? 0.f : m;
  float sum = 0.f, a = 0.f;
  for (int s = 0; s < p.splits; ++s) {
    const float w = exp2f(pmax[s] - safe);
    sum += psum[s] * w;
    a += pacc[s * kD + d] * w;
  }
  T* out = static_cast<T*>(p.out) + bh * kD;
  // A NaN sum (a NaN score) gives a NaN row; only a row without keys has sum 0.
  out[d] = E::from_float(sum == 0.f ? 0.f : a / sum);
}

template <bool kBf16, int kD>
cudaError_t launch_decode_typed(const DecodeParams& p, cudaStream_t stream) {
  const dim3 grid(p.splits, p.shape.heads, p.shape.batch);
  decode_partial_kernel<kBf16, kD><<<grid, kDecodeThreads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  decode_combine_kernel<kBf16, kD><<<dim3(p.shape.heads, p.shape.batch), kD, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_decode_attention(const DecodeParams& p, cudaStream_t stream) {
  if (p.shape.tq != 1 || p.shape.tk < 1 || p.splits < 1 || p.chunk < 1 || !kv_heads_valid(p.shape) ||
      static_cast<int64_t>(p.splits) * p.chunk < p.shape.tk) {
    return cudaErrorInvalidValue;
  }
  return dispatch_dtype_head_dim(p.shape, [&](auto bf16, auto d) {
    return launch_decode_typed<decltype(bf16)::value, decltype(d)::value>(p, stream);
  });
}

}  // namespace attention
}  // namespace gptfast
