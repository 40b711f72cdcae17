// Shared pieces of gptfast's CUDA attention kernels (attention_fwd.cu, attention_bwd.cu,
// decode_attention.cu) and their torch binding (ops_attention.cpp).
//
// The part outside `#ifdef __CUDACC__` is plain C++ (parameter structs and launcher
// declarations), so the host-compiled binding can include it; the device helpers
// below it (tensor-core fragments, cp.async, dropout mask) are seen only by nvcc.
// No torch headers here: every .cu compiles with `nvcc -arch=sm_90 -std=c++17 -c`.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

namespace gptfast {
namespace attention {

// Strides (in elements) of a (batch, heads, tokens, head_dim) tensor whose last
// dimension is contiguous.
struct Strides4 {
  int64_t batch, head, token;
};

// Attention dropout: an element (b, h, query i, key j) is kept when its Philox word is
// >= `threshold` (threshold / 2^32 = p); kept weights are multiplied by `inv_keep`.
// `seed` points to one int64 on the device (drawn from torch's generator), so no host
// synchronisation is needed and the backward pass regenerates the same mask.
struct Dropout {
  bool enabled;
  uint32_t threshold;
  float inv_keep;
  const int64_t* seed;
};

// Problem shape shared by all attention launches.  Queries are the last `tq`
// positions of the `tk` keys: query i sits at position tk - tq + i.  k and v have
// `kv_heads` heads, a divisor of `heads` (grouped-query attention): query head h reads
// kv head h / (heads / kv_heads), in place.
struct Shape {
  int batch, heads, kv_heads, tq, tk, head_dim;
  bool bf16;    // element type: bfloat16 if true, float16 otherwise
  float scale;  // softmax scale applied to q.k
};

struct FwdParams {
  Shape shape;
  const void *q, *k, *v;
  Strides4 q_stride, k_stride, v_stride;
  void* out;    // (B, H, Tq, D) contiguous
  float* lse;   // (B, H, Tq) contiguous: log2-domain log-sum-exp of scale*log2(e)*q.k per query
  Dropout dropout;
};

struct BwdParams {
  Shape shape;
  const void *q, *k, *v, *out, *dout;
  Strides4 q_stride, k_stride, v_stride, out_stride, dout_stride;
  const float* lse;   // from the forward pass
  float* delta;       // (B, H, Tq) workspace: rowsum(dout * out)
  float* dq_accum;    // (B, H, Tq, D) fp32, zero-initialised; receives dq (already scaled)
  void *dk, *dv;      // (B, H_kv, Tk, D) contiguous, element type of q
  Dropout dropout;
};

struct DecodeParams {
  Shape shape;  // tq == 1
  const void *q, *k, *v;
  Strides4 q_stride, k_stride, v_stride;
  void* out;             // (B, H, 1, D) contiguous
  float* partial_acc;    // (B, H, splits, D) workspace
  float* partial_max;    // (B, H, splits) workspace, log2 domain
  float* partial_sum;    // (B, H, splits) workspace
  int splits;            // key chunks per (b, h)
  int chunk;             // keys per chunk; splits * chunk >= tk and every chunk non-empty
};

// Whether the query heads split evenly over the kv heads (the launchers refuse other shapes).
inline bool kv_heads_valid(const Shape& s) { return s.kv_heads >= 1 && s.heads % s.kv_heads == 0; }

// Head dims with a tensor-core kernel; the Python side rejects everything else.
inline bool head_dim_supported(int d) { return d == 64 || d == 128; }

// How decode attention splits the keys of each (b, h): enough blocks to give every SM
// several (flash-decoding), but at least 64 keys per block, and no empty chunk.
inline void decode_split(int64_t batch_heads, int tk, int sm_count, int* splits, int* chunk) {
  const int64_t target_blocks = 4 * static_cast<int64_t>(sm_count > 0 ? sm_count : 1);
  if (batch_heads < 1) batch_heads = 1;
  if (tk < 1) tk = 1;
  int64_t want = (target_blocks + batch_heads - 1) / batch_heads;
  const int64_t most = (tk + 63) / 64;
  if (want > most) want = most;
  if (want > 256) want = 256;
  if (want < 1) want = 1;
  *chunk = static_cast<int>((tk + want - 1) / want);
  *splits = (tk + *chunk - 1) / *chunk;
}

// Launchers (return cudaSuccess or the launch error).  All tensors must have a
// 16-byte aligned base and token/head/batch strides that are multiples of 8 elements.
cudaError_t launch_attention_fwd(const FwdParams& p, cudaStream_t stream);
cudaError_t launch_attention_bwd(const BwdParams& p, cudaStream_t stream);
cudaError_t launch_decode_attention(const DecodeParams& p, cudaStream_t stream);

}  // namespace attention
}  // namespace gptfast

#ifdef __CUDACC__

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "philox.cuh"

namespace gptfast {
namespace attention {

constexpr float kLog2e = 1.4426950408889634f;

// ---------------------------------------------------------------- launch dispatch

// Calls `launch(bf16, d)` with the shape's element type and head dim as compile-time
// constants (std::bool_constant, std::integral_constant<int, D>), so every launcher
// instantiates its kernels for exactly the supported (dtype, head dim) pairs; any other
// head dim is an invalid value.  A launcher reads them as decltype(bf16)::value.
template <typename Launch>
cudaError_t dispatch_dtype_head_dim(const Shape& s, Launch&& launch) {
  using D64 = std::integral_constant<int, 64>;
  using D128 = std::integral_constant<int, 128>;
  switch (s.head_dim) {
    case 64:
      return s.bf16 ? launch(std::true_type{}, D64{}) : launch(std::false_type{}, D64{});
    case 128:
      return s.bf16 ? launch(std::true_type{}, D128{}) : launch(std::false_type{}, D128{});
    default:
      return cudaErrorInvalidValue;
  }
}

// ---------------------------------------------------------------- element types

template <bool kBf16>
struct Elem;
template <>
struct Elem<false> {
  using T = __half;
  __device__ static uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ static float2 unpack(uint32_t u) {
    return __half22float2(*reinterpret_cast<__half2*>(&u));
  }
  // Explicit conversions: torch builds with __CUDA_NO_HALF_CONVERSIONS__.
  __device__ static float to_float(T x) { return __half2float(x); }
  __device__ static T from_float(float x) { return __float2half_rn(x); }
};
template <>
struct Elem<true> {
  using T = __nv_bfloat16;
  __device__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ static float2 unpack(uint32_t u) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&u));
  }
  __device__ static float to_float(T x) { return __bfloat162float(x); }
  __device__ static T from_float(float x) { return __float2bfloat16_rn(x); }
};

// ---------------------------------------------------------------- tensor-core helpers
//
// mma.sync m16n8k16, fp32 accumulate.  With g = lane / 4 and t = lane % 4:
//   A (16x16, row-major): a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]
//   B (16x8, "col"):      b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]
//   C (16x8):             c0,c1 = C[g][2t..2t+1], c2,c3 = C[g+8][2t..2t+1]
// So the C fragments of two neighbouring 8-column tiles are exactly the A fragment of
// one 16-wide k step (used to feed probabilities back into the next mma).

// BEGIN PTX PRIMITIVES (the only inline assembly; a CPU emulator may substitute this region)
// Everything here needs sm_80+ (bf16 mma, cp.async); the Python side refuses older GPUs,
// and a build for an older architecture compiles these to a trap instead of failing.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define GPTFAST_ATTENTION_OLD_ARCH 1
#endif

template <bool kBf16>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef GPTFAST_ATTENTION_OLD_ARCH
  __trap();
#else
  if constexpr (kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

// ldmatrix x4: lanes 8i..8i+7 give the row addresses of 8x8 matrix i; register i of
// every lane receives matrix i's elements [lane/4][2*(lane%4) .. +1] (transposed with
// .trans: [2*(lane%4) .. +1][lane/4]).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
#ifdef GPTFAST_ATTENTION_OLD_ARCH
  __trap();
#else
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
#ifdef GPTFAST_ATTENTION_OLD_ARCH
  __trap();
#else
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}

// 16-byte global->shared copy; `valid` false writes zeros (src is then not read).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
#ifdef GPTFAST_ATTENTION_OLD_ARCH
  __trap();
#else
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(gmem), "r"(src_bytes));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifndef GPTFAST_ATTENTION_OLD_ARCH
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#ifndef GPTFAST_ATTENTION_OLD_ARCH
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}
// END PTX PRIMITIVES

// The A fragment of the 16x16 block at (row0, col0) of a row-major smem tile.
template <int kStride, typename T>
__device__ __forceinline__ void load_a_frag(uint32_t (&a)[4], const T* tile, int row0, int col0, int lane) {
  ldmatrix_x4(a, tile + (row0 + (lane & 15)) * kStride + col0 + (lane >> 4) * 8);
}

// The A fragment of the 16x16 block at (row0, col0) of A, where the smem tile holds A
// transposed (tile[c][r] = A[r][c]).
template <int kStride, typename T>
__device__ __forceinline__ void load_a_frag_from_transposed(uint32_t (&a)[4], const T* tile, int row0, int col0,
                                                            int lane) {
  // matrices: (rows 0-7, cols 0-7), (rows 8-15, cols 0-7), (rows 0-7, cols 8-15), (rows 8-15, cols 8-15) of A
  ldmatrix_x4_trans(a, tile + (col0 + (lane & 7) + (lane >> 4) * 8) * kStride + row0 + ((lane >> 3) & 1) * 8);
}

// B fragments for two 8-wide n tiles (n0..n0+7 and n0+8..n0+15) and the k step
// k0..k0+15, where B[k][n] = tile[n][k] (the tile stores B's columns as rows, e.g. K in q.k^T).
// b[0], b[1] serve n tile n0; b[2], b[3] serve n tile n0+8.
template <int kStride, typename T>
__device__ __forceinline__ void load_b_frags_nk(uint32_t (&b)[4], const T* tile, int n0, int k0, int lane) {
  ldmatrix_x4(b, tile + (n0 + (lane & 7) + (lane >> 4) * 8) * kStride + k0 + ((lane >> 3) & 1) * 8);
}

// Same, where B[k][n] = tile[k][n] (the tile stores B row-major, e.g. V in p.v).
template <int kStride, typename T>
__device__ __forceinline__ void load_b_frags_kn(uint32_t (&b)[4], const T* tile, int n0, int k0, int lane) {
  ldmatrix_x4_trans(b, tile + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * kStride + n0 + (lane >> 4) * 8);
}

// c = the 16 x (kNTiles * 8) block A B^T of this warp, where A is rows row0..row0+15 of
// `a_tile` and B is rows 0..kNTiles*8-1 of `b_tile` (both row-major smem tiles,
// kKSteps * 16 columns), e.g. S^T = K Q^T.  c is overwritten, not accumulated into.
template <bool kBf16, int kStride, int kKSteps, int kNTiles, typename T>
__device__ __forceinline__ void warp_gemm_abt(float (&c)[kNTiles][4], const T* a_tile, int row0, const T* b_tile,
                                              int lane) {
#pragma unroll
  for (int i = 0; i < kNTiles; ++i) c[i][0] = c[i][1] = c[i][2] = c[i][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < kKSteps; ++kk) {
    uint32_t a[4];
    load_a_frag<kStride>(a, a_tile, row0, kk * 16, lane);
#pragma unroll
    for (int np = 0; np < kNTiles / 2; ++np) {
      uint32_t bfr[4];
      load_b_frags_nk<kStride>(bfr, b_tile, np * 16, kk * 16, lane);
      mma_16816<kBf16>(c[2 * np], a, bfr[0], bfr[1]);
      mma_16816<kBf16>(c[2 * np + 1], a, bfr[2], bfr[3]);
    }
  }
}

// ---------------------------------------------------------------- tile loads

// Copy rows [row0, row0 + kRows) of one (b, h) slice (token stride `stride`, D contiguous)
// into a padded smem tile; rows >= `rows_total` become zeros.
template <int kRows, int kD, int kStride, int kThreads, typename T>
__device__ __forceinline__ void load_tile_async(T* tile, const T* base, int64_t stride, int row0, int rows_total,
                                                int tid) {
  constexpr int kChunksPerRow = kD / 8;  // 8 elements = 16 bytes
  constexpr int kChunks = kRows * kChunksPerRow;
  static_assert(kChunks % kThreads == 0, "tile copy must divide evenly among threads");
#pragma unroll
  for (int i = 0; i < kChunks / kThreads; ++i) {
    const int chunk = tid + i * kThreads;
    const int r = chunk / kChunksPerRow;
    const int c = (chunk % kChunksPerRow) * 8;
    const int row = row0 + r;
    const bool valid = row < rows_total;
    // An invalid row still needs a legal address; the copy reads 0 bytes from it.
    const T* src = base + (valid ? static_cast<int64_t>(row) * stride + c : 0);
    cp_async_16(tile + r * kStride + c, src, valid);
  }
}

// ---------------------------------------------------------------- dropout mask
//
// One Philox call covers the 2x2 block (queries 2a, 2a+1) x (keys 2c, 2c+1) of one
// (b, h): counter = (key pair c, query pair a, b*H + h, 0), word (i & 1) * 2 + (j & 1).
// The mask is a pure function of (seed, b, h, i, j), so the forward pass (rows = queries)
// and the backward pass (rows = keys) regenerate the same bits whatever their tiling.
__device__ __forceinline__ uint4 dropout_bits(const Dropout& d, uint2 key, uint32_t bh, int i, int j) {
  return philox4x32_10(key, make_uint4(static_cast<uint32_t>(j) >> 1, static_cast<uint32_t>(i) >> 1, bh, 0u));
}
__device__ __forceinline__ uint32_t pick_word(uint4 bits, int i, int j) {
  const int w = ((i & 1) << 1) | (j & 1);
  return w == 0 ? bits.x : w == 1 ? bits.y : w == 2 ? bits.z : bits.w;
}
__device__ __forceinline__ uint2 dropout_key(const Dropout& d) {
  const unsigned long long s = static_cast<unsigned long long>(*d.seed);
  return make_uint2(static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32));
}

__device__ __forceinline__ float warp_quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float warp_quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

}  // namespace attention
}  // namespace gptfast

#endif  // __CUDACC__
