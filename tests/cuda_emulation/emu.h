// A tiny CPU emulator for gptfast's CUDA kernels, force-included (g++ -include emu.h)
// into a .cu file compiled as C++.  Every CUDA thread of a block is a fiber;
// __syncthreads and warp shuffles are barriers; blocks run one after another, so
// __shared__ variables can be function statics.  It checks the kernels' logic
// (indexing, bounds, alignment, reductions, selection) under ASan/UBSan, not their
// speed nor the GPU memory model.  Launches `k<<<grid, block, smem, stream>>>(args)`
// must be rewritten to `emu::launch(grid, block, smem, stream)(k, args)` first
// (run_emulation.py does that).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#undef __shared__
#define __shared__ static
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __forceinline__
#define __forceinline__ inline
#undef __launch_bounds__
#define __launch_bounds__(...)
#define cudaGetLastError() (cudaSuccess)

using std::isnan;

namespace emu {

// Cooperative fibers: every CUDA thread of a block is a ucontext fiber run by one OS
// thread; a barrier yields until all its participants arrived.  Blocks run one after
// another, so function-static __shared__ state is per block.
struct Barrier {
  unsigned expected = 0, arrived = 0, generation = 0;
};

struct Fiber {
  ucontext_t context;
  char* stack = nullptr;
  bool done = false;
};

constexpr size_t kStackBytes = 128 * 1024;

// Fiber stacks, allocated once and reused by every block.
inline char* fiber_stack(unsigned t) {
  static std::vector<std::unique_ptr<char[]>> stacks;
  while (stacks.size() <= t) stacks.emplace_back(new char[kStackBytes]);
  return stacks[t].get();
}

struct Block {
  unsigned threads = 0;
  Barrier sync;
  std::vector<Barrier> warps;
  std::vector<uint64_t> slots;
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  unsigned current = 0;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
};

inline Block* block = nullptr;
inline dim3 thread_index, block_index;

inline void yield() {
  Block& b = *block;
  swapcontext(&b.fibers[b.current].context, &b.scheduler);
  thread_index = dim3(b.current, 0, 0);  // restore this fiber's identity after resuming
}

inline void wait(Barrier& barrier) {
  const unsigned generation = barrier.generation;
  if (++barrier.arrived == barrier.expected) {
    barrier.arrived = 0;
    ++barrier.generation;
    return;
  }
  while (barrier.generation == generation) yield();
}

inline void fiber_entry() {
  Block& b = *block;
  b.body(b.body_arg);
  b.fibers[b.current].done = true;
  swapcontext(&b.fibers[b.current].context, &b.scheduler);
}

inline void run_block(unsigned threads, void (*body)(void*), void* arg) {
  Block b;
  b.threads = threads;
  b.sync.expected = threads;
  b.warps.assign(threads / 32, Barrier{32, 0, 0});
  b.slots.assign(threads, 0);
  b.fibers.resize(threads);
  b.body = body;
  b.body_arg = arg;
  block = &b;
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = b.fibers[t];
    f.stack = fiber_stack(t);
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack;
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_entry, 0);
  }
  unsigned remaining = threads;
  while (remaining > 0) {
    for (unsigned t = 0; t < threads; ++t) {
      if (b.fibers[t].done) continue;
      b.current = t;
      thread_index = dim3(t, 0, 0);
      swapcontext(&b.scheduler, &b.fibers[t].context);
      if (b.fibers[t].done) --remaining;
    }
  }
  block = nullptr;
}

struct Launcher {
  unsigned grid, threads;
  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), Args... args) const {
    if (threads % 32 != 0 || threads == 0 || threads > 1024) std::abort();
    auto call = [&] { kernel(args...); };
    using Call = decltype(call);
    for (unsigned b = 0; b < grid; ++b) {
      block_index = dim3(b, 0, 0);
      run_block(threads, [](void* c) { (*static_cast<Call*>(c))(); }, &call);
    }
  }
};

inline Launcher launch(unsigned grid, unsigned threads, size_t = 0, cudaStream_t = nullptr) {
  return Launcher{grid, threads};
}

template <typename T>
T exchange(T value, int source_lane) {
  const unsigned warp = thread_index.x / 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  block->slots[thread_index.x] = bits;
  wait(block->warps[warp]);
  const uint64_t other = block->slots[warp * 32 + static_cast<unsigned>(source_lane)];
  wait(block->warps[warp]);
  T out;
  std::memcpy(&out, &other, sizeof(T));
  return out;
}

}  // namespace emu

#define threadIdx emu::thread_index
#define blockIdx emu::block_index

inline void __syncthreads() { emu::wait(emu::block->sync); }

template <typename T>
T __shfl_xor_sync(unsigned, T value, int mask) {
  return emu::exchange(value, static_cast<int>(threadIdx.x % 32) ^ mask);
}

template <typename T>
T __shfl_up_sync(unsigned, T value, int delta) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  return emu::exchange(value, lane >= delta ? lane - delta : lane);
}

inline unsigned atomicAdd(unsigned* address, unsigned value) {
  return __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
}

inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline unsigned __float_as_uint(float x) {
  unsigned u;
  std::memcpy(&u, &x, 4);
  return u;
}
inline float __int_as_float(int x) {
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
