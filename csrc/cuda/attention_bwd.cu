// Causal attention backward, FlashAttention-2 style, on tensor cores (mma.sync m16n8k16).
//
// 1. attention_bwd_delta_kernel: delta_i = sum_d dO[i,d] * O[i,d] (fp32), one warp per query.
// 2. attention_bwd_kernel: one thread block = 4 warps = one tile of 64 keys of one
//    (batch, kv head); each warp owns 16 keys.  The block walks, for each query head of
//    the kv head's group in turn (grouped-query attention; one head otherwise), the query
//    tiles that can see its keys (tiles wholly before the keys are skipped), recomputing
//        P^T  = exp2(scale*log2e * K Q^T - lse)           (saved log-sum-exp, no renormalising)
//        dV  += (P^T * dropout) dO
//        dP^T = V dO^T
//        dS^T = P^T * (dP^T * dropout - delta)
//        dK  += scale * dS^T Q
//    and adds dQ += scale * dS K into an fp32 buffer with atomics (dS goes through
//    shared memory so every warp can use all 64 keys).  dK and dV sum over the group in
//    registers and are written once: no atomics on them.
#include "attention_common.cuh"

namespace gptfast {
namespace attention {
namespace {

constexpr int kBwdWarps = 4;
constexpr int kBwdThreads = kBwdWarps * 32;
constexpr int kBwdBlockN = 64;  // keys per block (16 per warp)

template <bool kBf16>
__global__ void attention_bwd_delta_kernel(const BwdParams p) {
  using E = Elem<kBf16>;
  using T = typename E::T;
  const int warps_per_block = blockDim.x / 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * warps_per_block + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int tq = p.shape.tq, heads = p.shape.heads, d = p.shape.head_dim;
  const int64_t total = static_cast<int64_t>(p.shape.batch) * heads * tq;
  if (row >= total) return;
  const int i = static_cast<int>(row % tq);
  const int h = static_cast<int>((row / tq) % heads);
  const int b = static_cast<int>(row / (static_cast<int64_t>(tq) * heads));
  const T* o = static_cast<const T*>(p.out) + b * p.out_stride.batch + h * p.out_stride.head + i * p.out_stride.token;
  const T* go =
      static_cast<const T*>(p.dout) + b * p.dout_stride.batch + h * p.dout_stride.head + i * p.dout_stride.token;
  float sum = 0.f;
  for (int c = lane; c < d; c += 32) sum += E::to_float(o[c]) * E::to_float(go[c]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (lane == 0) p.delta[row] = sum;
}

template <int kD>
struct BwdConfig {
  static constexpr int kBlockM = kD == 64 ? 64 : 32;  // queries per inner step (register budget)
  static constexpr int kStride = kD + 8;
  static constexpr int kDsStride = kBlockM + 8;
  static constexpr int kKV = kBwdBlockN * kStride;  // one K or V tile, elements
  static constexpr int kQ = kBlockM * kStride;      // one Q or dO tile, elements
  static constexpr int kDs = kBwdBlockN * kDsStride;
  // dQ = dS K: warps split the block's queries in 16-row groups, then the head dim.
  static constexpr int kQGroups = kBlockM / 16;
  static constexpr int kDGroups = kBwdWarps / kQGroups;
  static constexpr int kDPerWarp = kD / kDGroups;
  static_assert(kQGroups * kDGroups == kBwdWarps, "warp split of the dQ product");
  // K, V, two buffers of (Q, dO), dS^T, then two buffers of (lse, delta) floats.
  static constexpr size_t kElemBytes = (2 * kKV + 4 * kQ + kDs) * 2;
  static constexpr size_t kBytes = kElemBytes + 4 * kBlockM * sizeof(float);
};

template <bool kBf16, int kD>
__global__ void __launch_bounds__(kBwdThreads) attention_bwd_kernel(const BwdParams p) {
  using E = Elem<kBf16>;
  using T = typename E::T;
  using C = BwdConfig<kD>;
  constexpr int kBM = C::kBlockM;
  constexpr int kStride = C::kStride;
  constexpr int kKSteps = kD / 16;      // k steps over the head dim
  constexpr int kSTiles = kBM / 8;      // 8-wide query tiles of S^T per warp
  constexpr int kDTiles = kD / 8;       // 8-wide head-dim tiles of dK, dV
  constexpr int kQTilesDq = C::kDPerWarp / 8;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + C::kKV;
  T* sQdO = sV + C::kKV;  // buffer b: Q at sQdO + 2b*kQ, dO at sQdO + (2b+1)*kQ
  T* sDs = sQdO + 4 * C::kQ;
  float* sStats = reinterpret_cast<float*>(smem_raw + C::kElemBytes);  // buffer b: lse at 2b*kBM, delta at (2b+1)*kBM

  const int tq = p.shape.tq, tk = p.shape.tk, heads = p.shape.heads;
  const int group = heads / p.shape.kv_heads;  // query heads per kv head
  const int offset = tk - tq;
  const int hk = blockIdx.y, b = blockIdx.z;
  const int k0 = blockIdx.x * kBwdBlockN;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;

  const T* kg = static_cast<const T*>(p.k) + b * p.k_stride.batch + hk * p.k_stride.head;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_stride.batch + hk * p.v_stride.head;

  // Query i sees key j iff offset + i >= j: the first query that sees key k0 is k0 - offset
  // (so every query head has at least one tile to visit).
  const int m_begin = max(0, k0 - offset) / kBM;
  const int m_end = (tq + kBM - 1) / kBM;
  // Step s visits query tile m_begin + s % tiles of the group's query head s / tiles.
  const int tiles = m_end - m_begin, steps = group * tiles;
  auto head_of = [&](int step) { return hk * group + step / tiles; };
  auto tile_of = [&](int step) { return m_begin + step % tiles; };
  auto bh_of = [&](int step) { return static_cast<int64_t>(b) * heads + head_of(step); };

  auto load_query_tile = [&](int step, int buf) {
    const int h = head_of(step), m = tile_of(step);
    const T* qg = static_cast<const T*>(p.q) + b * p.q_stride.batch + h * p.q_stride.head;
    const T* dog = static_cast<const T*>(p.dout) + b * p.dout_stride.batch + h * p.dout_stride.head;
    const float* lse_g = p.lse + bh_of(step) * tq;
    const float* delta_g = p.delta + bh_of(step) * tq;
    T* dst = sQdO + 2 * buf * C::kQ;
    load_tile_async<kBM, kD, kStride, kBwdThreads>(dst, qg, p.q_stride.token, m * kBM, tq, tid);
    load_tile_async<kBM, kD, kStride, kBwdThreads>(dst + C::kQ, dog, p.dout_stride.token, m * kBM, tq, tid);
    if (tid < kBM) {
      const int i = m * kBM + tid;
      // lse = +inf marks the queries past the end: their probabilities are masked to 0.
      sStats[2 * buf * kBM + tid] = i < tq ? lse_g[i] : INFINITY;
      sStats[(2 * buf + 1) * kBM + tid] = i < tq ? delta_g[i] : 0.f;
    }
  };

  load_tile_async<kBwdBlockN, kD, kStride, kBwdThreads>(sK, kg, p.k_stride.token, k0, tk, tid);
  load_tile_async<kBwdBlockN, kD, kStride, kBwdThreads>(sV, vg, p.v_stride.token, k0, tk, tid);
  load_query_tile(0, 0);
  cp_async_commit();

  float acc_dk[kDTiles][4], acc_dv[kDTiles][4];
#pragma unroll
  for (int i = 0; i < kDTiles; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_dk[i][e] = acc_dv[i][e] = 0.f;
  }

  const float qk_scale = p.shape.scale * kLog2e;
  const int key_base = k0 + warp * 16;
  const int keys[2] = {key_base + g, key_base + g + 8};
  const bool dropout = p.dropout.enabled;
  const uint2 seed_key = dropout ? dropout_key(p.dropout) : make_uint2(0u, 0u);
  const int qg_dq = warp % C::kQGroups, dg_dq = warp / C::kQGroups;

  for (int step = 0; step < steps; ++step) {
    const int buf = step & 1;
    if (step + 1 < steps) {
      load_query_tile(step + 1, buf ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* sQ = sQdO + 2 * buf * C::kQ;
    const T* sdO = sQ + C::kQ;
    const float* sLse = sStats + 2 * buf * kBM;
    const float* sDelta = sLse + kBM;
    const int m0 = tile_of(step) * kBM;
    const int64_t bh = bh_of(step);
    float* dq_g = p.dq_accum + bh * tq * kD;

    // S^T = K Q^T: this warp's 16 keys x kBM queries.
    float s[kSTiles][4];
    warp_gemm_abt<kBf16, kStride, kKSteps>(s, sK, warp * 16, sQ, lane);

    // P^T, causal mask (which also removes keys >= tk) and the dropout mask as bits.
    const bool needs_mask = key_base + 15 > offset + m0;
    uint32_t keep_bits = 0xffffffffu;  // bit 4*i + e for element s[i][e]
#pragma unroll
    for (int i = 0; i < kSTiles; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int qi = i * 8 + 2 * t + (e & 1);
        // Queries past tq (lse +inf, which no real row has) are zero rows: times an infinite key they score
        // NaN, so they are masked too.
        const float lse = sLse[qi];
        const bool masked = (needs_mask && keys[e >> 1] > offset + m0 + qi) || lse == INFINITY;
        // -0 marks a masked entry for dS below (exp2f never gives -0, a NaN is never exactly -0); as a
        // probability it is 0 all the same.  Keeping the mask itself live that far spilled registers.
        s[i][e] = masked ? -0.f : exp2f(s[i][e] * qk_scale - lse);
      }
      if (dropout) {
        const int query = m0 + i * 8 + 2 * t;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const uint4 bits = dropout_bits(p.dropout, seed_key, static_cast<uint32_t>(bh), query, keys[r]);
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            if (pick_word(bits, query + c, keys[r]) < p.dropout.threshold) keep_bits &= ~(1u << (4 * i + 2 * r + c));
          }
        }
      }
    }
    const float inv_keep = dropout ? p.dropout.inv_keep : 1.f;
    // x times mask / (1 - p), not a choice between x * inv_keep and 0, so a dropped NaN stays NaN (torch's
    // dropout multiplies).  The factor is built from its bits: selecting it instead spilled registers at D = 128.
    auto dropped = [&](float x, int i, int e) {
      return x * __uint_as_float(__float_as_uint(inv_keep) & (0u - ((keep_bits >> (4 * i + e)) & 1u)));
    };

    // dV += (P^T with dropout) dO.
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk) {
      uint32_t a[4];
      a[0] = E::pack(dropped(s[2 * kk][0], 2 * kk, 0), dropped(s[2 * kk][1], 2 * kk, 1));
      a[1] = E::pack(dropped(s[2 * kk][2], 2 * kk, 2), dropped(s[2 * kk][3], 2 * kk, 3));
      a[2] = E::pack(dropped(s[2 * kk + 1][0], 2 * kk + 1, 0), dropped(s[2 * kk + 1][1], 2 * kk + 1, 1));
      a[3] = E::pack(dropped(s[2 * kk + 1][2], 2 * kk + 1, 2), dropped(s[2 * kk + 1][3], 2 * kk + 1, 3));
#pragma unroll
      for (int dp = 0; dp < kDTiles / 2; ++dp) {
        uint32_t bfr[4];
        load_b_frags_kn<kStride>(bfr, sdO, dp * 16, kk * 16, lane);
        mma_16816<kBf16>(acc_dv[2 * dp], a, bfr[0], bfr[1]);
        mma_16816<kBf16>(acc_dv[2 * dp + 1], a, bfr[2], bfr[3]);
      }
    }

    // dP^T = V dO^T.
    float dpt[kSTiles][4];
    warp_gemm_abt<kBf16, kStride, kKSteps>(dpt, sV, warp * 16, sdO, lane);

    // dS^T = P^T * (dP^T through the dropout mask - delta); reuse s for it.  Masked entries (-0) are 0, not
    // 0 * (dP - delta): the oracle's masked_fill zeroes them even where a NaN dO makes dP NaN.
#pragma unroll
    for (int i = 0; i < kSTiles; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int qi = i * 8 + 2 * t + (e & 1);
        const bool masked = __float_as_uint(s[i][e]) == 0x80000000u;
        s[i][e] = masked ? 0.f : s[i][e] * (dropped(dpt[i][e], i, e) - sDelta[qi]);
      }
    }

    // dK += dS^T Q (scaled at the end); dS^T also goes to shared memory for dQ.
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk) {
      uint32_t a[4];
      a[0] = E::pack(s[2 * kk][0], s[2 * kk][1]);
      a[1] = E::pack(s[2 * kk][2], s[2 * kk][3]);
      a[2] = E::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = E::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
      uint32_t* row_lo = reinterpret_cast<uint32_t*>(sDs + (warp * 16 + g) * C::kDsStride + kk * 16 + 2 * t);
      uint32_t* row_hi = reinterpret_cast<uint32_t*>(sDs + (warp * 16 + g + 8) * C::kDsStride + kk * 16 + 2 * t);
      row_lo[0] = a[0];
      row_hi[0] = a[1];
      row_lo[4] = a[2];  // 8 elements further along the row
      row_hi[4] = a[3];
#pragma unroll
      for (int dp = 0; dp < kDTiles / 2; ++dp) {
        uint32_t bfr[4];
        load_b_frags_kn<kStride>(bfr, sQ, dp * 16, kk * 16, lane);
        mma_16816<kBf16>(acc_dk[2 * dp], a, bfr[0], bfr[1]);
        mma_16816<kBf16>(acc_dk[2 * dp + 1], a, bfr[2], bfr[3]);
      }
    }
    __syncthreads();

    // dQ (kBM x D) += scale * dS (kBM x 64 keys) K; this warp: 16 queries x kDPerWarp dims.
    float acc_dq[kQTilesDq][4];
#pragma unroll
    for (int i = 0; i < kQTilesDq; ++i) acc_dq[i][0] = acc_dq[i][1] = acc_dq[i][2] = acc_dq[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kBwdBlockN / 16; ++kk) {
      uint32_t a[4];
      load_a_frag_from_transposed<C::kDsStride>(a, sDs, qg_dq * 16, kk * 16, lane);
#pragma unroll
      for (int dp = 0; dp < kQTilesDq / 2; ++dp) {
        uint32_t bfr[4];
        load_b_frags_kn<kStride>(bfr, sK, dg_dq * C::kDPerWarp + dp * 16, kk * 16, lane);
        mma_16816<kBf16>(acc_dq[2 * dp], a, bfr[0], bfr[1]);
        mma_16816<kBf16>(acc_dq[2 * dp + 1], a, bfr[2], bfr[3]);
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int qi = m0 + qg_dq * 16 + g + 8 * r;
      if (qi < tq) {
        float* dst = dq_g + static_cast<int64_t>(qi) * kD + dg_dq * C::kDPerWarp + 2 * t;
#pragma unroll
        for (int i = 0; i < kQTilesDq; ++i) {
          atomicAdd(dst + i * 8, acc_dq[i][2 * r] * p.shape.scale);
          atomicAdd(dst + i * 8 + 1, acc_dq[i][2 * r + 1] * p.shape.scale);
        }
      }
    }
    __syncthreads();  // the next iteration refills this Q/dO buffer and dS
  }

  // Write dK (scaled) and dV for this warp's keys.
  const int64_t bkv = static_cast<int64_t>(b) * p.shape.kv_heads + hk;
  T* dk_g = static_cast<T*>(p.dk) + bkv * tk * kD;
  T* dv_g = static_cast<T*>(p.dv) + bkv * tk * kD;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (keys[r] < tk) {
      uint32_t* dk_row = reinterpret_cast<uint32_t*>(dk_g + static_cast<int64_t>(keys[r]) * kD);
      uint32_t* dv_row = reinterpret_cast<uint32_t*>(dv_g + static_cast<int64_t>(keys[r]) * kD);
#pragma unroll
      for (int i = 0; i < kDTiles; ++i) {
        dk_row[(i * 8 + 2 * t) / 2] =
            E::pack(acc_dk[i][2 * r] * p.shape.scale, acc_dk[i][2 * r + 1] * p.shape.scale);
        dv_row[(i * 8 + 2 * t) / 2] = E::pack(acc_dv[i][2 * r], acc_dv[i][2 * r + 1]);
      }
    }
  }
}

template <bool kBf16, int kD>
cudaError_t launch_bwd_typed(const BwdParams& p, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.shape.batch) * p.shape.heads * p.shape.tq;
  constexpr int kDeltaWarps = 8;
  attention_bwd_delta_kernel<kBf16>
      <<<static_cast<unsigned>((rows + kDeltaWarps - 1) / kDeltaWarps), kDeltaWarps * 32, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  const size_t smem = BwdConfig<kD>::kBytes;
  auto kernel = attention_bwd_kernel<kBf16, kD>;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid((p.shape.tk + kBwdBlockN - 1) / kBwdBlockN, p.shape.kv_heads, p.shape.batch);
  kernel<<<grid, kBwdThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_attention_bwd(const BwdParams& p, cudaStream_t stream) {
  if (p.shape.tq <= 0 || p.shape.tk < p.shape.tq || !kv_heads_valid(p.shape)) return cudaErrorInvalidValue;
  return dispatch_dtype_head_dim(p.shape, [&](auto bf16, auto d) {
    return launch_bwd_typed<decltype(bf16)::value, decltype(d)::value>(p, stream);
  });
}

}  // namespace attention
}  // namespace gptfast
