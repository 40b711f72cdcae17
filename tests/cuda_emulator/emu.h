// CPU emulator of the CUDA subset gptfast's kernels use, so that their indexing, tiling,
// fragment layouts, reductions, masking and random streams can be checked on a machine
// with no GPU.  build.py force-includes this header (g++ -include emu.h) into every
// csrc/cuda/*.cu after rewriting the sources (kernel launches, __shared__ declarations,
// the PTX primitives region); the checks in this folder call the kernels' own host
// launchers and compare the results with float64 references.
//
// Execution model.  A launch runs its blocks one after another (in a scrambled order, as
// nothing orders blocks on a GPU); the threads of a block are cooperative fibers on one
// OS thread.  __syncthreads is a block barrier and every warp collective (shuffle, mma,
// ldmatrix) a warp barrier; a thread that returns while others of its block or warp wait
// at a barrier (a divergent __syncthreads or shuffle), and threads waiting at barriers
// the others never reach (a deadlock), are reported.  Shared memory (static and dynamic) is one arena per launch, poisoned with
// 0xff bytes (NaN in fp32/fp16/bf16) before every block, so a read of shared memory the
// block never wrote shows up.  The PTX primitives (mma.sync m16n8k16 row.col with fp32
// accumulate, ldmatrix x4 with and without .trans, cp.async with commit/wait groups whose
// copies land only at the wait) are implemented from the PTX ISA fragment layouts.
// Launch configurations are validated as a GPU would (block size, grid size, shared
// memory above 48 KB only after cudaFuncSetAttribute, __launch_bounds__), and a failed
// launch is reported through cudaGetLastError.
//
// Every misuse the emulator detects prints "EMULATOR ERROR: ..." and aborts.
// Not emulated: timing, bank conflicts, register limits, occupancy, the GPU memory model
// between blocks, fast-math rounding.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <csetjmp>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ucontext.h>

// The kernel sources' `#ifdef __CUDACC__` / `__CUDA_ARCH__` tests are renamed to these by
// build.py, so the device code paths are the ones compiled (as for sm_90).
#define GPTFAST_EMU_CUDACC 1
#define GPTFAST_EMU_CUDA_ARCH 900

#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __forceinline__
#define __forceinline__ inline
#undef __noinline__
#define __noinline__
#undef __constant__
#define __constant__
#undef __launch_bounds__
#define __launch_bounds__(...)

using std::isinf;
using std::isnan;

namespace emu {

[[noreturn]] inline void fail(const char* format, ...) {
  std::fflush(stdout);
  std::fprintf(stderr, "EMULATOR ERROR: ");
  va_list args;
  va_start(args, format);
  std::vfprintf(stderr, format, args);
  va_end(args);
  std::fprintf(stderr, "\n");
  std::abort();
}

constexpr size_t kStaticSharedBytes = 48 * 1024;   // CUDA's limit for static __shared__
constexpr size_t kDefaultDynamicBytes = 48 * 1024;  // above it needs cudaFuncSetAttribute
constexpr size_t kMaxSharedBytes = 227 * 1024;      // sm_90 opt-in maximum per block
constexpr unsigned char kPoison = 0xff;

// Cooperative fibers: each CUDA thread of a block is a fiber on its own stack, all run by
// the one OS thread of the launch, so the emulator takes one core however large the block
// and runs deterministically.  A fiber runs until it waits at a barrier; the scheduler
// sweeps the block's fibers, alternating the direction of each sweep so that neither
// low nor high thread ids always run first.  A sweep in which no fiber got past a
// barrier or finished is a deadlock.  Switches use _setjmp/_longjmp (no system call);
// under AddressSanitizer they use swapcontext, which it understands.
#if defined(__SANITIZE_ADDRESS__)
#define GPTFAST_EMU_UCONTEXT_SWITCH 1
#endif

constexpr size_t kFiberStackBytes = 256 * 1024;

struct Fiber {
  ucontext_t start;
  jmp_buf env;
  bool started = false, done = false;
};

struct Scheduler {
  std::vector<Fiber> fibers;
  ucontext_t main_context;
  jmp_buf env;
  unsigned current = 0;
  bool progress = false;
  void (*entry)() = nullptr;
};
inline Scheduler* scheduler = nullptr;

// Stacks for the fibers, allocated on first use and kept (the pages are only committed
// as they are touched).
inline char* fiber_stack(unsigned t) {
  static std::vector<std::unique_ptr<char[]>> stacks;
  while (stacks.size() <= t) stacks.emplace_back(new char[kFiberStackBytes]);
  return stacks[t].get();
}

void set_identity(unsigned t);

inline void yield() {
  Scheduler& s = *scheduler;
  Fiber& f = s.fibers[s.current];
#ifdef GPTFAST_EMU_UCONTEXT_SWITCH
  swapcontext(&f.start, &s.main_context);
#else
  if (!_setjmp(f.env)) _longjmp(s.env, 1);
#endif
}

inline void resume(unsigned t) {
  Scheduler& s = *scheduler;
  Fiber& f = s.fibers[t];
  s.current = t;
  set_identity(t);
  if (!f.started) s.progress = true;
#ifdef GPTFAST_EMU_UCONTEXT_SWITCH
  f.started = true;
  swapcontext(&s.main_context, &f.start);
#else
  if (!_setjmp(s.env)) {
    if (!f.started) {
      f.started = true;
      setcontext(&f.start);
    }
    _longjmp(f.env, 1);
  }
#endif
}

inline void fiber_entry() {
  Scheduler& s = *scheduler;
  s.entry();
  s.fibers[s.current].done = true;
#ifdef GPTFAST_EMU_UCONTEXT_SWITCH
  // returning resumes uc_link (the scheduler)
#else
  _longjmp(s.env, 1);
#endif
}

// Runs `threads` fibers, each calling entry(), until all have returned.
inline void run_fibers(unsigned threads, void (*entry)()) {
  Scheduler s;
  s.fibers.resize(threads);
  s.entry = entry;
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = s.fibers[t];
    getcontext(&f.start);
    f.start.uc_stack.ss_sp = fiber_stack(t);
    f.start.uc_stack.ss_size = kFiberStackBytes;
    f.start.uc_link = &s.main_context;
    makecontext(&f.start, fiber_entry, 0);
  }
  scheduler = &s;
  unsigned remaining = threads;
  bool forward = true;
  while (remaining > 0) {
    s.progress = false;
    for (unsigned k = 0; k < threads; ++k) {
      const unsigned t = forward ? k : threads - 1 - k;
      if (s.fibers[t].done) continue;
      resume(t);
      if (s.fibers[t].done) {
        --remaining;
        s.progress = true;
      }
    }
    if (!s.progress && remaining > 0)
      fail("deadlock: %u threads wait at barriers the others never reach", remaining);
    forward = !forward;
  }
  scheduler = nullptr;
}

// A barrier for `expected` threads that also notices threads leaving for good: an
// arrival after a departure, or a departure while others wait, is a divergent barrier.
struct Barrier {
  uint32_t arrived = 0, left = 0, expected = 0, generation = 0;
  const char* what = "";

  void reset(uint32_t n, const char* name) {
    arrived = left = 0;
    expected = n;
    what = name;
  }
  void arrive_and_wait() {
    if (left) fail("%s reached by some threads after others of the group returned (divergent barrier)", what);
    if (++arrived == expected) {
      arrived = 0;
      ++generation;
      scheduler->progress = true;
      return;
    }
    const uint32_t gen = generation;
    while (generation == gen) yield();
    scheduler->progress = true;
  }
  void leave() {
    if (arrived) fail("a thread returned while others of its group wait at %s (divergent barrier)", what);
    ++left;
  }
};

// Per-warp exchange slots of the warp collectives.
struct WarpSlots {
  uint64_t value[32];
  const void* ptr[32];
  uint32_t a[32][4];
  uint32_t b[32][2];
  float c[32][4];
};

// cp.async copies of one thread: committed groups and the open one.
struct Copy {
  void* dst;
  const void* src;
  bool valid;
};
struct AsyncCopies {
  std::deque<std::vector<Copy>> groups;
  std::vector<Copy> open;
};

struct Launch {
  dim3 grid, block;
  unsigned threads = 0;
  size_t dynamic_bytes = 0;
  std::vector<unsigned char> arena_storage;
  unsigned char* arena = nullptr;  // static shared [0, kStaticSharedBytes), then dynamic
  size_t static_used = 0;
  std::map<const void*, size_t> static_offsets;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<WarpSlots> slots;
  std::vector<AsyncCopies> copies;
  const std::function<void()>* body = nullptr;
};

inline Launch* current = nullptr;
inline unsigned linear_tid = 0;
inline uint3 tid3{0, 0, 0}, bid3{0, 0, 0};
inline dim3 grid_dim, block_dim;
inline cudaError_t last_error = cudaSuccess;
inline std::map<const void*, int> max_dynamic_shared;  // cudaFuncSetAttribute per kernel

inline void set_identity(unsigned t) {
  const dim3& block = current->block;
  linear_tid = t;
  tid3 = make_uint3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
}

inline Launch& launch_state() {
  if (current == nullptr) fail("device code called outside a kernel launch");
  return *current;
}
inline unsigned lane() { return linear_tid % 32; }
inline unsigned warp() { return linear_tid / 32; }
inline unsigned warp_lanes() {  // lanes present in this thread's warp (the last one may be partial)
  const unsigned first = warp() * 32;
  return std::min(32u, launch_state().threads - first);
}
inline unsigned warp_mask() { return warp_lanes() == 32 ? 0xffffffffu : (1u << warp_lanes()) - 1; }
inline WarpSlots& slots() { return launch_state().slots[warp()]; }
inline void warp_sync() { launch_state().warp_barriers[warp()].arrive_and_wait(); }
inline void check_mask(unsigned mask, const char* op) {
  if ((mask & warp_mask()) != warp_mask()) fail("%s with a partial lane mask 0x%08x is not emulated", op, mask);
}

// ---------------------------------------------------------------- shared memory

inline bool in_shared(const void* p, size_t bytes = 1) {
  const Launch& l = launch_state();
  const auto* c = static_cast<const unsigned char*>(p);
  return c >= l.arena && c + bytes <= l.arena + kStaticSharedBytes + l.dynamic_bytes;
}

// Storage of one static `__shared__ T name;` declaration (build.py rewrites each into a
// call with a tag unique to the declaration and template instantiation): the same address
// for every thread of the launch, poisoned before each block.
template <typename T>
T* shared_var(const void* tag) {
  Launch& l = launch_state();
  auto it = l.static_offsets.find(tag);
  if (it == l.static_offsets.end()) {
    const size_t align = std::max<size_t>(alignof(T), 16);
    const size_t offset = (l.static_used + align - 1) / align * align;
    if (offset + sizeof(T) > kStaticSharedBytes) fail("static __shared__ memory above 48 KB");
    l.static_used = offset + sizeof(T);
    it = l.static_offsets.emplace(tag, offset).first;
  }
  return reinterpret_cast<T*>(l.arena + it->second);
}

// `extern __shared__ T name[];`: the dynamic shared memory of the launch.
template <typename T>
T* dynamic_shared() {
  Launch& l = launch_state();
  if (l.dynamic_bytes == 0) fail("extern __shared__ used by a kernel launched with 0 bytes of dynamic shared memory");
  return reinterpret_cast<T*>(l.arena + kStaticSharedBytes);
}

inline void check_launch_bounds(long max_threads, long = 0, long = 0) {
  if (static_cast<long>(launch_state().threads) > max_threads)
    fail("kernel with __launch_bounds__(%ld) launched with %u threads per block", max_threads,
         launch_state().threads);
}

// ---------------------------------------------------------------- launches

inline AsyncCopies& async_copies() { return launch_state().copies[linear_tid]; }

// The blocks of a grid in a fixed scrambled order (a GPU gives no order at all).
inline std::vector<uint3> block_order(const dim3& grid) {
  std::vector<uint3> order;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) order.push_back(make_uint3(x, y, z));
  uint64_t state = 0x9e3779b97f4a7c15ull;
  for (size_t i = order.size(); i > 1; --i) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    std::swap(order[i - 1], order[(state >> 33) % i]);
  }
  return order;
}

inline cudaError_t validate(const void* kernel, const dim3& grid, const dim3& block, size_t smem) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64)
    return cudaErrorInvalidConfiguration;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535)
    return cudaErrorInvalidConfiguration;
  if (smem > kMaxSharedBytes) return cudaErrorInvalidValue;
  if (smem > kDefaultDynamicBytes) {
    auto it = max_dynamic_shared.find(kernel);
    if (it == max_dynamic_shared.end() || static_cast<size_t>(it->second) < smem) return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

inline void run(const void* kernel, const dim3& grid, const dim3& block, size_t smem,
                const std::function<void()>& body) {
  if (current != nullptr) fail("kernel launched from device code");
  const cudaError_t status = validate(kernel, grid, block, smem);
  if (status != cudaSuccess) {
    last_error = status;
    return;
  }
  Launch l;
  l.grid = grid;
  l.block = block;
  l.threads = block.x * block.y * block.z;
  l.dynamic_bytes = smem;
  l.arena_storage.resize(kStaticSharedBytes + smem + 128);
  l.arena = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(l.arena_storage.data()) + 127) / 128 * 128);
  const unsigned warps = (l.threads + 31) / 32;
  l.warp_barriers.resize(warps);
  l.slots.resize(warps);
  l.copies.resize(l.threads);
  l.body = &body;
  grid_dim = grid;
  block_dim = block;
  current = &l;
  const std::vector<uint3> order = block_order(grid);
  for (const uint3& b : order) {
    std::memset(l.arena, kPoison, kStaticSharedBytes + smem);
    l.block_barrier.reset(l.threads, "__syncthreads");
    for (unsigned w = 0; w < warps; ++w)
      l.warp_barriers[w].reset(std::min(32u, l.threads - 32 * w), "a warp collective (shuffle/mma/ldmatrix)");
    bid3 = b;
    run_fibers(l.threads, [] {
      Launch& launch = *current;
      (*launch.body)();
      const unsigned t = linear_tid;
      if (!launch.copies[t].groups.empty() || !launch.copies[t].open.empty())
        fail("a thread finished with cp.async copies never waited for");
      launch.block_barrier.leave();
      launch.warp_barriers[t / 32].leave();
    });
  }
  current = nullptr;
}

// `k<<<grid, block, smem, stream>>>(args...)` is rewritten to
// `emu::launch(grid, block, smem, stream)(k, args...)`.
struct Launcher {
  dim3 grid, block;
  size_t smem;
  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), Args&&... args) const {
    // Arguments are converted to the parameter types once, on the host, as a launch does;
    // every thread gets its own copy of them.
    const std::tuple<std::decay_t<Params>...> params(static_cast<std::decay_t<Params>>(args)...);
    run(reinterpret_cast<const void*>(kernel), grid, block, smem, [&] {
      std::tuple<std::decay_t<Params>...> copy = params;
      std::apply(kernel, copy);
    });
  }
};
inline Launcher launch(dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr) {
  return Launcher{grid, block, smem};
}

template <typename F>
cudaError_t func_set_attribute(F* kernel, cudaFuncAttribute attribute, int value) {
  if (attribute == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || static_cast<size_t>(value) > kMaxSharedBytes) return cudaErrorInvalidValue;
    max_dynamic_shared[reinterpret_cast<const void*>(kernel)] = value;
  }
  return cudaSuccess;
}
inline cudaError_t get_last_error() {
  const cudaError_t e = last_error;
  last_error = cudaSuccess;
  return e;
}
inline cudaError_t peek_at_last_error() { return last_error; }

// ---------------------------------------------------------------- warp exchange

template <typename T>
T exchange(T value, unsigned source_lane) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type wider than 8 bytes");
  WarpSlots& s = slots();
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  s.value[lane()] = bits;
  warp_sync();
  const uint64_t other = source_lane < warp_lanes() ? s.value[source_lane] : bits;
  warp_sync();
  T out;
  std::memcpy(&out, &other, sizeof(T));
  return out;
}

inline float half_bits_to_float(uint16_t h, bool bf16) {
  if (bf16) {
    const uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  __half x;
  std::memcpy(&x, &h, 2);
  return __half2float(x);
}

}  // namespace emu

#define threadIdx emu::tid3
#define blockIdx emu::bid3
#define gridDim emu::grid_dim
#define blockDim emu::block_dim
#define warpSize 32
#define cudaFuncSetAttribute emu::func_set_attribute
#define cudaGetLastError emu::get_last_error
#define cudaPeekAtLastError emu::peek_at_last_error

// ---------------------------------------------------------------- synchronisation

inline void __syncthreads() { emu::launch_state().block_barrier.arrive_and_wait(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  emu::check_mask(mask, "__syncwarp");
  emu::warp_sync();
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
[[noreturn]] inline void __trap() { emu::fail("__trap() executed"); }

// ---------------------------------------------------------------- warp collectives

template <typename T>
T __shfl_sync(unsigned mask, T value, int source, int width = 32) {
  emu::check_mask(mask, "__shfl_sync");
  const unsigned lane = emu::lane(), base = lane / width * width;
  return emu::exchange(value, base + static_cast<unsigned>(source) % width);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  emu::check_mask(mask, "__shfl_xor_sync");
  const unsigned lane = emu::lane(), source = lane ^ static_cast<unsigned>(lane_mask);
  return emu::exchange(value, source / width == lane / width ? source : lane);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  emu::check_mask(mask, "__shfl_up_sync");
  const unsigned lane = emu::lane(), base = lane / width * width;
  return emu::exchange(value, lane >= base + delta ? lane - delta : lane);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  emu::check_mask(mask, "__shfl_down_sync");
  const unsigned lane = emu::lane(), end = lane / width * width + width;
  return emu::exchange(value, lane + delta < end ? lane + delta : lane);
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  emu::check_mask(mask, "__ballot_sync");
  emu::WarpSlots& s = emu::slots();
  s.value[emu::lane()] = predicate != 0;
  emu::warp_sync();
  unsigned out = 0;
  for (unsigned l = 0; l < emu::warp_lanes(); ++l) out |= static_cast<unsigned>(s.value[l]) << l;
  emu::warp_sync();
  return out;
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) == emu::warp_mask(); }
inline unsigned __activemask() { return emu::warp_mask(); }

// ---------------------------------------------------------------- atomics

template <typename T>
T atomicAdd(T* address, T value) {
  if constexpr (std::is_integral_v<T>) {
    return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST);
  } else {
    static_assert(std::is_floating_point_v<T>, "atomicAdd on an unsupported type");
    T old, desired;
    __atomic_load(address, &old, __ATOMIC_SEQ_CST);
    do {
      desired = old + value;
    } while (!__atomic_compare_exchange(address, &old, &desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
    return old;
  }
}
template <typename T>
T atomicMax(T* address, T value) {
  T old = __atomic_load_n(address, __ATOMIC_SEQ_CST);
  while (old < value && !__atomic_compare_exchange_n(address, &old, value, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}
template <typename T>
T atomicMin(T* address, T value) {
  T old = __atomic_load_n(address, __ATOMIC_SEQ_CST);
  while (value < old && !__atomic_compare_exchange_n(address, &old, value, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}
template <typename T>
T atomicExch(T* address, T value) {
  return __atomic_exchange_n(address, value, __ATOMIC_SEQ_CST);
}
template <typename T>
T atomicCAS(T* address, T compare, T value) {
  __atomic_compare_exchange_n(address, &compare, value, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return compare;
}

// ---------------------------------------------------------------- loads and stores with cache hints
// A GPU faults on a load or store not aligned to its size; so does the emulator.

template <typename T>
const T& emu_checked(const T* p, const char* op) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0)
    emu::fail("%s of a %zu-byte type at a misaligned address %p", op, sizeof(T), static_cast<const void*>(p));
  return *p;
}
template <typename T> T __ldg(const T* p) { return emu_checked(p, "__ldg"); }
template <typename T> T __ldcg(const T* p) { return emu_checked(p, "__ldcg"); }
template <typename T> T __ldca(const T* p) { return emu_checked(p, "__ldca"); }
template <typename T> T __ldcs(const T* p) { return emu_checked(p, "__ldcs"); }
template <typename T> T __ldlu(const T* p) { return emu_checked(p, "__ldlu"); }
template <typename T> T __ldcv(const T* p) { return emu_checked(p, "__ldcv"); }
template <typename T> void __stcg(T* p, T v) { emu_checked(p, "__stcg"); *p = v; }
template <typename T> void __stcs(T* p, T v) { emu_checked(p, "__stcs"); *p = v; }
template <typename T> void __stwt(T* p, T v) { emu_checked(p, "__stwt"); *p = v; }
template <typename T> void __stwb(T* p, T v) { emu_checked(p, "__stwb"); *p = v; }

inline size_t __cvta_generic_to_shared(const void* p) {
  if (!emu::in_shared(p)) emu::fail("__cvta_generic_to_shared of an address outside shared memory");
  return static_cast<size_t>(static_cast<const unsigned char*>(p) - emu::launch_state().arena);
}

// ---------------------------------------------------------------- math intrinsics

template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
  return b < a ? b : a;
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}
inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return powf(10.0f, x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __saturatef(float x) { return x != x ? 0.0f : std::min(1.0f, std::max(0.0f, x)); }
inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((uint64_t(a) * b) >> 32); }
inline int __mulhi(int a, int b) { return static_cast<int>((int64_t(a) * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
template <typename To, typename From>
inline To emu_bits(From x) {
  static_assert(sizeof(To) == sizeof(From));
  To out;
  std::memcpy(&out, &x, sizeof(To));
  return out;
}
inline unsigned __float_as_uint(float x) { return emu_bits<unsigned>(x); }
inline int __float_as_int(float x) { return emu_bits<int>(x); }
inline float __uint_as_float(unsigned x) { return emu_bits<float>(x); }
inline float __int_as_float(int x) { return emu_bits<float>(x); }
inline long long __double_as_longlong(double x) { return emu_bits<long long>(x); }
inline double __longlong_as_double(long long x) { return emu_bits<double>(x); }

// ---------------------------------------------------------------- PTX primitives
// Substitutes for the region between the BEGIN/END PTX PRIMITIVES markers of the kernel
// sources (build.py removes that region), written from the PTX ISA.
namespace gptfast {
namespace attention {

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, with g = lane / 4, t = lane % 4:
// A a0 = A[g][2t..], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..];
// B b0 = B[2t..][g], b1 = B[2t+8..][g]; C c0,c1 = C[g][2t..], c2,c3 = C[g+8][2t..].
template <bool kBf16>
inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu::WarpSlots& s = emu::slots();
  if (emu::warp_lanes() != 32) emu::fail("mma.sync by a partial warp");
  const int l = emu::lane();
  for (int i = 0; i < 4; ++i) {
    s.a[l][i] = a[i];
    s.c[l][i] = c[i];
  }
  s.b[l][0] = b0;
  s.b[l][1] = b1;
  emu::warp_sync();
  float A[16][16], B[16][8];
  auto hx = [&](uint32_t w, int e) { return emu::half_bits_to_float(uint16_t(w >> (16 * e)), kBf16); };
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

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8i..8i+7 give the row addresses
// of matrix i (16-byte aligned, in shared memory); register i of lane l receives matrix i's
// [l/4][2(l%4)..+1] (.trans: [2(l%4)..+1][l/4]).
inline void ldmatrix_impl(uint32_t (&r)[4], const void* row, bool trans) {
  emu::WarpSlots& s = emu::slots();
  if (emu::warp_lanes() != 32) emu::fail("ldmatrix by a partial warp");
  const int l = emu::lane();
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0) emu::fail("ldmatrix row address not 16-byte aligned");
  if (!emu::in_shared(row, 16)) emu::fail("ldmatrix row address outside shared memory");
  s.ptr[l] = row;
  emu::warp_sync();
  const int g = l / 4, t = l % 4;
  for (int i = 0; i < 4; ++i) {
    uint16_t lo, hi;
    if (!trans) {
      const uint16_t* rp = static_cast<const uint16_t*>(s.ptr[8 * i + g]);
      lo = rp[2 * t];
      hi = rp[2 * t + 1];
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

// cp.async.cg.shared.global 16 bytes (src-size 0 when !valid: zeros, nothing read).  The
// copy is only queued: it lands at the cp.async.wait_group that retires its group, so a
// read of the destination before that sees the poisoned or stale bytes.
inline void cp_async_16(void* smem, const void* gmem, bool valid) {
  if (reinterpret_cast<uintptr_t>(smem) % 16 || (valid && reinterpret_cast<uintptr_t>(gmem) % 16))
    emu::fail("cp.async with a misaligned address");
  if (!emu::in_shared(smem, 16)) emu::fail("cp.async destination outside shared memory");
  if (valid && emu::in_shared(gmem)) emu::fail("cp.async source in shared memory");
  emu::async_copies().open.push_back({smem, gmem, valid});
}
inline void cp_async_commit() {
  emu::AsyncCopies& copies = emu::async_copies();
  copies.groups.push_back(std::move(copies.open));
  copies.open.clear();
}
template <int kPending>
inline void cp_async_wait() {
  emu::AsyncCopies& copies = emu::async_copies();
  while (static_cast<int>(copies.groups.size()) > kPending) {
    for (const emu::Copy& c : copies.groups.front()) {
      if (c.valid)
        std::memcpy(c.dst, c.src, 16);
      else
        std::memset(c.dst, 0, 16);
    }
    copies.groups.pop_front();
  }
}

}  // namespace attention
}  // namespace gptfast
