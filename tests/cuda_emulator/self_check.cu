// Faulty kernels that the emulator must catch, so that a silent emulator cannot pass the
// real kernels.  build.py rewrites this file like the kernels of csrc/cuda and links it
// alone.  Usage: self_check SCENARIO; tests/test_cuda_emulator.py checks what each prints
// (or the "EMULATOR ERROR" it aborts with).
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace {

__global__ void divergent_sync(float* out) {
  if (threadIdx.x < 16) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

__global__ void deadlock(float* out) {
  float x = threadIdx.x;
  if (threadIdx.x % 32 < 16) {
    __syncthreads();
  } else {
    x = __shfl_xor_sync(0xffffffffu, x, 1);
    __syncthreads();
  }
  out[threadIdx.x] = x;
}

// Only even threads write their slot; odd threads read theirs after the barrier.
__global__ void unwritten_shared(float* out) {
  __shared__ float slots[64];
  if (threadIdx.x % 2 == 0) slots[threadIdx.x] = 1.0f;
  __syncthreads();
  out[blockIdx.x * 64 + threadIdx.x] = slots[threadIdx.x];
}

// Reads a cp.async destination before and after the wait.
__global__ void cp_async_order(const float* src, float* out) {
  __shared__ __align__(16) float tile[4 * 32];
  gptfast::attention::cp_async_16(tile + 4 * threadIdx.x, src + 4 * threadIdx.x, true);
  gptfast::attention::cp_async_commit();
  out[threadIdx.x] = tile[4 * threadIdx.x];
  gptfast::attention::cp_async_wait<0>();
  out[32 + threadIdx.x] = tile[4 * threadIdx.x];
}

__global__ void cp_async_not_waited(const float* src) {
  __shared__ __align__(16) float tile[4 * 32];
  gptfast::attention::cp_async_16(tile + 4 * threadIdx.x, src + 4 * threadIdx.x, true);
  gptfast::attention::cp_async_commit();
}

__global__ void misaligned_ldg(const float* src, float* out) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(src + 1));
  out[threadIdx.x] = static_cast<float>(v.x);
}

__global__ void misaligned_vector_load(const float* src, float* out) {
  const uint4 v = *reinterpret_cast<const uint4*>(src + 1);
  out[threadIdx.x] = static_cast<float>(v.x);
}

__global__ void uses_dynamic_shared(float* out) {
  extern __shared__ __align__(16) unsigned char smem[];
  float* s = reinterpret_cast<float*>(smem);
  s[threadIdx.x] = threadIdx.x;
  __syncthreads();
  out[threadIdx.x] = s[31 - threadIdx.x];
}

__global__ void __launch_bounds__(64) bounded(float* out) { out[threadIdx.x] = 1.0f; }

// Warp shuffles of 64-bit values, up/down/xor/broadcast and a ballot.
__global__ void warp_collectives(int64_t* out) {
  const int64_t v = (int64_t(threadIdx.x) << 40) + threadIdx.x;
  const unsigned lane = threadIdx.x % 32;
  out[threadIdx.x * 5 + 0] = __shfl_xor_sync(0xffffffffu, v, 5);
  out[threadIdx.x * 5 + 1] = __shfl_up_sync(0xffffffffu, v, 3);
  out[threadIdx.x * 5 + 2] = __shfl_down_sync(0xffffffffu, v, 3);
  out[threadIdx.x * 5 + 3] = __shfl_sync(0xffffffffu, v, 7);
  out[threadIdx.x * 5 + 4] = __ballot_sync(0xffffffffu, lane % 3 == 0);
}

int report(const char* what, cudaError_t status) {
  std::printf("%s: %s\n", what, status == cudaSuccess ? "success" : "launch error");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string scenario = argc > 1 ? argv[1] : "";
  std::vector<float> out(256, 0.0f), src(256);
  for (int i = 0; i < 256; ++i) src[i] = static_cast<float>(i);
  if (scenario == "divergent_sync") {
    divergent_sync<<<1, 64>>>(out.data());
  } else if (scenario == "deadlock") {
    deadlock<<<1, 64>>>(out.data());
  } else if (scenario == "unwritten_shared") {
    unwritten_shared<<<2, 64>>>(out.data());
    int nan_odd = 0, ones_even = 0;
    for (int i = 0; i < 128; ++i) (i % 2 ? nan_odd : ones_even) += i % 2 ? std::isnan(out[i]) : out[i] == 1.0f;
    std::printf("odd slots NaN: %d of 64, even slots 1: %d of 64\n", nan_odd, ones_even);
  } else if (scenario == "cp_async_order") {
    cp_async_order<<<1, 32>>>(src.data(), out.data());
    int stale = 0, landed = 0;
    for (int t = 0; t < 32; ++t) {
      stale += std::isnan(out[t]);
      landed += out[32 + t] == src[4 * t];
    }
    std::printf("before the wait NaN: %d of 32, after the wait copied: %d of 32\n", stale, landed);
  } else if (scenario == "cp_async_not_waited") {
    cp_async_not_waited<<<1, 32>>>(src.data());
  } else if (scenario == "misaligned_ldg") {
    misaligned_ldg<<<1, 32>>>(src.data(), out.data());
  } else if (scenario == "misaligned_vector_load") {
    misaligned_vector_load<<<1, 32>>>(src.data(), out.data());
  } else if (scenario == "dynamic_shared") {
    uses_dynamic_shared<<<1, 32, 64 * 1024>>>(out.data());
    report("64 KB without the attribute", cudaGetLastError());
    cudaFuncSetAttribute(uses_dynamic_shared, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024);
    uses_dynamic_shared<<<1, 32, 64 * 1024>>>(out.data());
    report("64 KB with the attribute", cudaGetLastError());
    std::printf("reversed: %s\n", out[0] == 31.0f && out[31] == 0.0f ? "yes" : "no");
  } else if (scenario == "block_too_large") {
    bounded<<<1, 2048>>>(out.data());
    report("2048 threads", cudaGetLastError());
  } else if (scenario == "launch_bounds") {
    bounded<<<1, 128>>>(out.data());
  } else if (scenario == "warp_collectives") {
    std::vector<int64_t> got(64 * 5);
    warp_collectives<<<1, 64>>>(got.data());
    int bad = 0;
    for (int t = 0; t < 64; ++t) {
      const int lane = t % 32, w = t / 32 * 32;
      auto value = [](int64_t i) { return (i << 40) + i; };
      unsigned ballot = 0;
      for (int l = 0; l < 32; l += 3) ballot |= 1u << l;
      bad += got[t * 5 + 0] != value(w + (lane ^ 5));
      bad += got[t * 5 + 1] != value(lane >= 3 ? t - 3 : t);
      bad += got[t * 5 + 2] != value(lane + 3 < 32 ? t + 3 : t);
      bad += got[t * 5 + 3] != value(w + 7);
      bad += got[t * 5 + 4] != static_cast<int64_t>(ballot);
    }
    std::printf("warp collective mismatches: %d\n", bad);
  } else {
    std::printf("usage: self_check SCENARIO\n");
    return 2;
  }
  return 0;
}
