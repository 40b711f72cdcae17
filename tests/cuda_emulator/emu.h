// CPU emulation of the CUDA subset that gptfast's attention kernels use, so their
// indexing, tiling, fragment layouts and masking can be checked on a machine with no GPU
// (tests/test_attention_cuda.py builds attention_check.cpp against it with g++).
//
// One std::thread per CUDA thread of a block (blocks run one after another), a
// std::barrier for __syncthreads and another per warp for the warp collectives.  The
// PTX primitives (the region between the BEGIN/END PTX PRIMITIVES markers of
// csrc/cuda/attention_common.cuh) are replaced by implementations written from the PTX
// ISA fragment layouts: mma.sync m16n8k16 (row.col, fp32 accumulate), ldmatrix x4 with
// and without .trans, and cp.async whose copies land only at cp.async.wait_group, so a
// read before the wait sees stale data.  Shared memory starts poisoned.
//
// Not emulated: timing, bank conflicts, register limits, occupancy, fast-math rounding.
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>
#include <cstdio>
#include <cstdlib>

using std::max;
using std::min;

namespace emu {
inline thread_local uint3 tid3, bid3;
inline dim3 grid_dim, block_dim;
inline unsigned char* dyn_smem = nullptr;
inline std::unique_ptr<std::barrier<>> block_barrier;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;

// Per-warp exchange slots.
struct WarpSlots {
  const void* ptr[32];
  uint32_t a[32][4];
  uint32_t b[32][2];
  float c[32][4];
  float f[32];
};
inline std::vector<WarpSlots> slots;

inline int lane() { return tid3.x % 32; }
inline int warp() { return tid3.x / 32; }
inline void warp_sync() { warp_barriers[warp()]->arrive_and_wait(); }

// cp.async groups: copies happen only when waited for.
struct Copy { void* dst; const void* src; bool valid; };
inline thread_local std::deque<std::vector<Copy>> groups;
inline thread_local std::vector<Copy> open_group;

template <class K, class P>
void launch(K kernel, dim3 grid, dim3 block, size_t smem, const P& p) {
  grid_dim = grid;
  block_dim = block;
  const int nthreads = block.x * block.y * block.z;
  std::vector<unsigned char> smem_buf(smem + 16);
  // poison shared memory so reads of unwritten data show up as NaN-ish garbage
  std::memset(smem_buf.data(), 0x7f, smem_buf.size());
  dyn_smem = smem_buf.data();
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        block_barrier = std::make_unique<std::barrier<>>(nthreads);
        warp_barriers.clear();
        for (int w = 0; w < (nthreads + 31) / 32; ++w) warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
        slots.assign((nthreads + 31) / 32, WarpSlots{});
        std::vector<std::thread> threads;
        for (int t = 0; t < nthreads; ++t) {
          threads.emplace_back([&, t, bx, by, bz] {
            tid3 = make_uint3(t, 0, 0);
            bid3 = make_uint3(bx, by, bz);
            groups.clear();
            open_group.clear();
            kernel(p);
            if (!groups.empty() || !open_group.empty()) { std::fprintf(stderr, "cp.async left pending\n"); std::abort(); }
          });
        }
        for (auto& th : threads) th.join();
      }
}
}  // namespace emu

#define threadIdx emu::tid3
#define blockIdx emu::bid3
#define gridDim emu::grid_dim
#define blockDim emu::block_dim
#define __syncthreads() emu::block_barrier->arrive_and_wait()
#define __launch_bounds__(x)
#undef __shared__
#define __shared__ static
#undef __forceinline__
#define __forceinline__ inline

inline float __shfl_xor_sync(unsigned, float x, int off) {
  auto& s = emu::slots[emu::warp()];
  s.f[emu::lane()] = x;
  emu::warp_sync();
  float r = s.f[emu::lane() ^ off];
  emu::warp_sync();
  return r;
}

inline float atomicAdd(float* p, float v) {
  static std::mutex m;
  std::lock_guard<std::mutex> g(m);
  float old = *p;
  *p = old + v;
  return old;
}

inline cudaError_t emu_func_set_attribute(...) { return cudaSuccess; }
inline cudaError_t emu_get_last_error() { return cudaSuccess; }
#define cudaFuncSetAttribute(...) emu_func_set_attribute()
#define cudaGetLastError emu_get_last_error

// ---------------------------------------------------------------- PTX primitives
namespace gptfast { namespace attention {

inline float half_bits_to_float(uint16_t h, bool bf16) {
  if (bf16) { uint32_t u = uint32_t(h) << 16; float f; std::memcpy(&f, &u, 4); return f; }
  __half x; std::memcpy(&x, &h, 2); return __half2float(x);
}

template <bool kBf16>
inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  auto& s = emu::slots[emu::warp()];
  const int l = emu::lane();
  for (int i = 0; i < 4; ++i) { s.a[l][i] = a[i]; s.c[l][i] = c[i]; }
  s.b[l][0] = b0; s.b[l][1] = b1;
  emu::warp_sync();
  float A[16][16], B[16][8];
  auto hx = [&](uint32_t w, int e) { return half_bits_to_float(uint16_t(w >> (16 * e)), kBf16); };
  for (int ln = 0; ln < 32; ++ln) {
    const int g = ln / 4, t = ln % 4;
    for (int e = 0; e < 2; ++e) {
      A[g][2 * t + e] = hx(s.a[ln][0], e);
      A[g + 8][2 * t + e] = hx(s.a[ln][1], e);
      A[g][2 * t + 8 + e] = hx(s.a[ln][2], e);
      A[g + 8][2 * t + 8 + e] = hx(s.a[ln][3], e);
      B[2 * t + e][g] = hx(s.b[ln][0], e);
      B[2 * t + 8 + e][g] = hx(s.b[ln][1], e);
    }
  }
  const int g = l / 4, t = l % 4;
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int r = g + 8 * (e >> 1), col = 2 * t + (e & 1);
    double acc = s.c[l][e];
    for (int k = 0; k < 16; ++k) acc += double(A[r][k]) * B[k][col];
    out[e] = float(acc);
  }
  emu::warp_sync();
  for (int e = 0; e < 4; ++e) c[e] = out[e];
}

inline void ldmatrix_impl(uint32_t (&r)[4], const void* row, bool trans) {
  auto& s = emu::slots[emu::warp()];
  const int l = emu::lane();
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0) { std::fprintf(stderr, "ldmatrix row not 16B aligned\n"); std::abort(); }
  s.ptr[l] = row;
  emu::warp_sync();
  for (int i = 0; i < 4; ++i) {
    const int g = l / 4, t = l % 4;
    uint16_t lo, hi;
    if (!trans) {
      const uint16_t* rp = static_cast<const uint16_t*>(s.ptr[8 * i + g]);
      lo = rp[2 * t]; hi = rp[2 * t + 1];
    } else {
      lo = static_cast<const uint16_t*>(s.ptr[8 * i + 2 * t])[g];
      hi = static_cast<const uint16_t*>(s.ptr[8 * i + 2 * t + 1])[g];
    }
    r[i] = uint32_t(lo) | (uint32_t(hi) << 16);
  }
  emu::warp_sync();
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) { ldmatrix_impl(r, row, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) { ldmatrix_impl(r, row, true); }

inline void cp_async_16(void* smem, const void* gmem, bool valid) {
  if (reinterpret_cast<uintptr_t>(smem) % 16 || (valid && reinterpret_cast<uintptr_t>(gmem) % 16)) {
    std::fprintf(stderr, "cp.async misaligned\n"); std::abort();
  }
  emu::open_group.push_back({smem, gmem, valid});
}
inline void cp_async_commit() { emu::groups.push_back(std::move(emu::open_group)); emu::open_group.clear(); }
template <int kPending>
inline void cp_async_wait() {
  while (static_cast<int>(emu::groups.size()) > kPending) {
    for (auto& c : emu::groups.front()) {
      if (c.valid) std::memcpy(c.dst, c.src, 16); else std::memset(c.dst, 0, 16);
    }
    emu::groups.pop_front();
  }
}
}}  // namespace gptfast::attention
