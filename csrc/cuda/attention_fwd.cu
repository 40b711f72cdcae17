// Causal attention forward, FlashAttention-2 style, on tensor cores (mma.sync m16n8k16).
//
// One thread block = 4 warps = one tile of 64 queries of one (batch, head).  Each warp
// owns 16 query rows; their Q fragments stay in registers.  Key/value tiles of 64 rows
// stream through double-buffered shared memory (cp.async), scores are computed with
// an online softmax in fp32, and the probabilities are fed straight back into the
// P.V product from registers.  Key tiles entirely above the causal diagonal are never
// loaded.  The per-query log-sum-exp (log2 domain) is saved for the backward pass.
#include "attention_common.cuh"

namespace gptfast {
namespace attention {
namespace {

constexpr int kFwdWarps = 4;
constexpr int kFwdThreads = kFwdWarps * 32;
constexpr int kFwdBlockM = 64;  // queries per block (16 per warp)
constexpr int kFwdBlockN = 64;  // keys per streamed tile

template <int kD>
struct FwdSmem {
  static constexpr int kStride = kD + 8;  // padding keeps ldmatrix rows on distinct banks
  static constexpr int kTile = kFwdBlockN * kStride;
  static constexpr int kQ = kFwdBlockM * kStride;
  // Q tile, then two buffers of (K tile, V tile).
  static constexpr size_t kBytes = (kQ + 4 * kTile) * 2;
};

template <bool kBf16, int kD>
__global__ void __launch_bounds__(kFwdThreads) attention_fwd_kernel(const FwdParams p) {
  using E = Elem<kBf16>;
  using T = typename E::T;
  using S = FwdSmem<kD>;
  constexpr int kStride = S::kStride;
  constexpr int kKSteps = kD / 16;          // k steps of q.k^T
  constexpr int kSTiles = kFwdBlockN / 8;   // 8-wide score tiles per warp row block
  constexpr int kOTiles = kD / 8;           // 8-wide output tiles

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sKV = sQ + S::kQ;  // buffer b: K at sKV + 2b*kTile, V at sKV + (2b+1)*kTile

  const int tq = p.shape.tq, tk = p.shape.tk;
  const int offset = tk - tq;  // query i is at position offset + i
  // Heavier (later) query tiles first, so the tail of the grid is short.
  const int m_tile = gridDim.x - 1 - blockIdx.x;
  const int h = blockIdx.y, b = blockIdx.z;
  const int q0 = m_tile * kFwdBlockM;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;

  const T* qg = static_cast<const T*>(p.q) + b * p.q_stride.batch + h * p.q_stride.head;
  const int hk = h / (p.shape.heads / p.shape.kv_heads);  // the kv head this query head reads
  const T* kg = static_cast<const T*>(p.k) + b * p.k_stride.batch + hk * p.k_stride.head;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_stride.batch + hk * p.v_stride.head;

  // Keys this tile can see: j <= offset + (last valid query of the tile).
  const int last_query = min(q0 + kFwdBlockM, tq) - 1;
  const int key_end = offset + last_query + 1;  // <= tk
  const int n_tiles = (key_end + kFwdBlockN - 1) / kFwdBlockN;

  load_tile_async<kFwdBlockM, kD, kStride, kFwdThreads>(sQ, qg, p.q_stride.token, q0, tq, tid);
  load_tile_async<kFwdBlockN, kD, kStride, kFwdThreads>(sKV, kg, p.k_stride.token, 0, tk, tid);
  load_tile_async<kFwdBlockN, kD, kStride, kFwdThreads>(sKV + S::kTile, vg, p.v_stride.token, 0, tk, tid);
  cp_async_commit();

  uint32_t q_frag[kKSteps][4];
  float acc_o[kOTiles][4];
#pragma unroll
  for (int i = 0; i < kOTiles; ++i) acc_o[i][0] = acc_o[i][1] = acc_o[i][2] = acc_o[i][3] = 0.f;
  // Row statistics for rows g and g+8 of this warp (index 0 and 1), log2 domain.
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};  // this thread's partial sums; reduced over the quad at the end

  const float qk_scale = p.shape.scale * kLog2e;
  const int row_base = q0 + warp * 16;
  const int rows[2] = {row_base + g, row_base + g + 8};
  const int pos[2] = {offset + rows[0], offset + rows[1]};
  const uint32_t bh = static_cast<uint32_t>(static_cast<int64_t>(b) * p.shape.heads + h);  // as the bwd
  const bool dropout = p.dropout.enabled;
  const uint2 seed_key = dropout ? dropout_key(p.dropout) : make_uint2(0u, 0u);

  for (int n = 0; n < n_tiles; ++n) {
    const int buf = n & 1;
    if (n + 1 < n_tiles) {
      T* next = sKV + 2 * (buf ^ 1) * S::kTile;
      load_tile_async<kFwdBlockN, kD, kStride, kFwdThreads>(next, kg, p.k_stride.token, (n + 1) * kFwdBlockN, tk,
                                                            tid);
      load_tile_async<kFwdBlockN, kD, kStride, kFwdThreads>(next + S::kTile, vg, p.v_stride.token,
                                                            (n + 1) * kFwdBlockN, tk, tid);
      cp_async_commit();
      cp_async_wait<1>();  // everything but the prefetch just issued has landed
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (n == 0) {
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) load_a_frag<kStride>(q_frag[kk], sQ, warp * 16, kk * 16, lane);
    }
    const T* sK = sKV + 2 * buf * S::kTile;
    const T* sV = sK + S::kTile;
    const int k0 = n * kFwdBlockN;

    // S = Q K^T for this warp's 16 rows x 64 keys.
    float s[kSTiles][4];
#pragma unroll
    for (int i = 0; i < kSTiles; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
#pragma unroll
      for (int np = 0; np < kSTiles / 2; ++np) {
        uint32_t bfr[4];
        load_b_frags_nk<kStride>(bfr, sK, np * 16, kk * 16, lane);
        mma_16816<kBf16>(s[2 * np], q_frag[kk], bfr[0], bfr[1]);
        mma_16816<kBf16>(s[2 * np + 1], q_frag[kk], bfr[2], bfr[3]);
      }
    }

    // Scale to log2 units and mask keys after each query's position (also keys >= tk,
    // since every position is < tk).  Only tiles crossing the diagonal need it.
    const bool needs_mask = k0 + kFwdBlockN - 1 > offset + row_base;
#pragma unroll
    for (int i = 0; i < kSTiles; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = k0 + i * 8 + 2 * t + (e & 1);
        float x = s[i][e] * qk_scale;
        if (needs_mask && key > pos[e >> 1]) x = -INFINITY;
        s[i][e] = x;
      }
    }

    // Online softmax update.
    float scale_old[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = row_max[r];
#pragma unroll
      for (int i = 0; i < kSTiles; ++i) mx = fmaxf(mx, fmaxf(s[i][2 * r], s[i][2 * r + 1]));
      mx = warp_quad_max(mx);
      // A row can have no visible key in this tile; keep exp2 arguments finite then.
      const float safe = mx == -INFINITY ? 0.f : mx;
      scale_old[r] = exp2f(row_max[r] - safe);
      row_max[r] = mx;
      row_sum[r] *= scale_old[r];
#pragma unroll
      for (int i = 0; i < kSTiles; ++i) {
        s[i][2 * r] = exp2f(s[i][2 * r] - safe);
        s[i][2 * r + 1] = exp2f(s[i][2 * r + 1] - safe);
        row_sum[r] += s[i][2 * r] + s[i][2 * r + 1];
      }
    }
#pragma unroll
    for (int i = 0; i < kOTiles; ++i) {
      acc_o[i][0] *= scale_old[0];
      acc_o[i][1] *= scale_old[0];
      acc_o[i][2] *= scale_old[1];
      acc_o[i][3] *= scale_old[1];
    }

    // Dropout acts on the normalised weights, so it scales P after the row sums are taken.
    if (dropout) {
#pragma unroll
      for (int i = 0; i < kSTiles; ++i) {
        const int key = k0 + i * 8 + 2 * t;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const uint4 bits = dropout_bits(p.dropout, seed_key, bh, rows[r], key);
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            // Multiplied by the mask, not replaced: a dropped NaN weight stays NaN, as in torch's dropout.
            const bool keep = pick_word(bits, rows[r], key + c) >= p.dropout.threshold;
            s[i][2 * r + c] *= keep ? p.dropout.inv_keep : 0.f;
          }
        }
      }
    }

    // O += P V: P's C fragments become A fragments, 16 keys per k step.
#pragma unroll
    for (int kk = 0; kk < kFwdBlockN / 16; ++kk) {
      uint32_t a[4];
      a[0] = E::pack(s[2 * kk][0], s[2 * kk][1]);
      a[1] = E::pack(s[2 * kk][2], s[2 * kk][3]);
      a[2] = E::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = E::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dp = 0; dp < kOTiles / 2; ++dp) {
        uint32_t bfr[4];
        load_b_frags_kn<kStride>(bfr, sV, dp * 16, kk * 16, lane);
        mma_16816<kBf16>(acc_o[2 * dp], a, bfr[0], bfr[1]);
        mma_16816<kBf16>(acc_o[2 * dp + 1], a, bfr[2], bfr[3]);
      }
    }
    __syncthreads();  // this buffer is refilled by the next iteration's prefetch
  }

  // Normalise and write O and the log-sum-exp.
  T* og = static_cast<T*>(p.out) + (static_cast<int64_t>(b) * p.shape.heads + h) * tq * kD;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float total = warp_quad_sum(row_sum[r]);
    const int row = rows[r];
    if (row < tq) {
      const float inv = total > 0.f ? 1.f / total : 0.f;
      uint32_t* dst = reinterpret_cast<uint32_t*>(og + static_cast<int64_t>(row) * kD);
#pragma unroll
      for (int i = 0; i < kOTiles; ++i) dst[(i * 8 + 2 * t) / 2] = E::pack(acc_o[i][2 * r] * inv, acc_o[i][2 * r + 1] * inv);
      if (t == 0) {
        p.lse[(static_cast<int64_t>(b) * p.shape.heads + h) * tq + row] = row_max[r] + log2f(total);
      }
    }
  }
}

template <bool kBf16, int kD>
cudaError_t launch_fwd_typed(const FwdParams& p, cudaStream_t stream) {
  const size_t smem = FwdSmem<kD>::kBytes;
  auto kernel = attention_fwd_kernel<kBf16, kD>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid((p.shape.tq + kFwdBlockM - 1) / kFwdBlockM, p.shape.heads, p.shape.batch);
  kernel<<<grid, kFwdThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_attention_fwd(const FwdParams& p, cudaStream_t stream) {
  if (p.shape.tq <= 0 || p.shape.tk < p.shape.tq || !kv_heads_valid(p.shape)) return cudaErrorInvalidValue;
  return dispatch_dtype_head_dim(p.shape, [&](auto bf16, auto d) {
    return launch_fwd_typed<decltype(bf16)::value, decltype(d)::value>(p, stream);
  });
}

}  // namespace attention
}  // namespace gptfast
