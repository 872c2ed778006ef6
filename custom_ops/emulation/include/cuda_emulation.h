// A CPU emulation of the small part of CUDA the kernels use, so that the kernel sources
// run (slowly) where there is no GPU and tests compare them with the numpy reference.
// Each CUDA thread of a block is a fiber (ucontext) with its own stack; the fibers of a block
// take turns on the calling thread and switch only at barriers, so __syncthreads/__syncwarp
// and the warp collectives (shuffles, ballots, WMMA, exchanged through memory) really wait
// for every thread. A divergent barrier is caught as a deadlock and aborts the launch.
// What it cannot check: timing, the hardware's memory model, tensor-core rounding (WMMA
// products are computed in float), and shared memory beyond the opt-in limit.
#pragma once

#include <math.h>
#include <ucontext.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#define TFSA_CUDA_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
struct uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

namespace tfsa_emu {

constexpr int kWarp = 32;
constexpr size_t kStackBytes = 256 * 1024;

struct Barrier {
  unsigned expected = 0, arrived = 0, generation = 0;
};

// A thread's asynchronous copies: issued into the open group, done when a wait reaches them.
struct Pipeline {
  struct Copy {
    void* dst;
    const void* src;
    size_t bytes, zero_fill;
  };
  std::vector<Copy> open;
  std::deque<std::vector<Copy>> committed;
};

// One thread block: its fibers, barriers and shared memory.
struct Block {
  std::vector<Pipeline> pipelines;  // one per thread
  unsigned threads = 0, index = 0, current = 0;
  ucontext_t scheduler;
  std::vector<ucontext_t> fibers;
  std::vector<bool> finished;
  std::vector<std::vector<char>>* stacks = nullptr;
  Barrier all;
  std::vector<Barrier> warps;
  std::vector<uint64_t> lanes;  // one exchange slot per thread
  unsigned char* shared = nullptr;
  const std::function<void()>* body = nullptr;
  uint64_t progress = 0;  // barrier arrivals so far, to tell a deadlock from waiting
};

inline thread_local Block* block = nullptr;

inline unsigned ThreadIndex() { return block->current; }
inline unsigned Lane() { return ThreadIndex() % kWarp; }
inline uint64_t* WarpSlots() { return block->lanes.data() + ThreadIndex() / kWarp * kWarp; }

inline void Yield() { swapcontext(&block->fibers[block->current], &block->scheduler); }

inline void Wait(Barrier& barrier) {
  ++block->progress;
  const unsigned generation = barrier.generation;
  if (++barrier.arrived == barrier.expected) {
    barrier.arrived = 0;
    ++barrier.generation;
    return;
  }
  while (barrier.generation == generation) Yield();
}

inline void WarpWait() { Wait(block->warps[ThreadIndex() / kWarp]); }

// Every lane publishes `value`; returns what lane `source(lane)` published.
template <class T, class Source>
T Exchange(T value, Source source) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  uint64_t* slots = WarpSlots();
  std::memcpy(&slots[Lane()], &value, sizeof(T));
  WarpWait();
  T out;
  std::memcpy(&out, &slots[source(Lane()) % kWarp], sizeof(T));
  WarpWait();
  return out;
}

inline unsigned char* DynamicShared() { return block->shared; }

inline void FiberMain() {
  (*block->body)();
  block->finished[block->current] = true;
  // returning resumes uc_link: the scheduler
}

// Runs one block: fibers in turn until all finish; false on a deadlock.
inline bool RunBlock(Block& blk) {
  block = &blk;
  blk.fibers.assign(blk.threads, ucontext_t{});
  blk.finished.assign(blk.threads, false);
  for (unsigned t = 0; t < blk.threads; ++t) {
    getcontext(&blk.fibers[t]);
    blk.fibers[t].uc_stack.ss_sp = (*blk.stacks)[t].data();
    blk.fibers[t].uc_stack.ss_size = kStackBytes;
    blk.fibers[t].uc_link = &blk.scheduler;
    makecontext(&blk.fibers[t], FiberMain, 0);
  }
  unsigned done = 0;
  while (done < blk.threads) {
    const uint64_t before = blk.progress;
    bool any_finished = false;
    for (unsigned t = 0; t < blk.threads; ++t) {
      if (blk.finished[t]) continue;
      blk.current = t;
      swapcontext(&blk.scheduler, &blk.fibers[t]);
      if (blk.finished[t]) ++done, any_finished = true;
    }
    // A full round in which nobody arrived at a barrier or finished: some barrier is
    // waited on by threads that others never reach.
    if (done < blk.threads && blk.progress == before && !any_finished) return false;
  }
  return true;
}

// Runs kernel(args...) on grid x threads CUDA threads, the blocks one after another.
template <class Kernel>
struct Launcher {
  Kernel kernel;
  int64_t grid, threads;
  size_t shared_bytes;

  template <class... Args>
  void operator()(Args... args) const {
    if (threads % kWarp != 0) std::abort();  // the kernels use whole warps only
    std::vector<std::vector<char>> stacks(threads, std::vector<char>(kStackBytes));
    // Exactly the bytes asked for, so that a sanitizer build catches reads past the end.
    const auto free_shared = [](unsigned char* p) { ::operator delete(p, std::align_val_t(128)); };
    std::unique_ptr<unsigned char, decltype(free_shared)> memory(
        static_cast<unsigned char*>(::operator new(shared_bytes + 1, std::align_val_t(128))), free_shared);
    const std::function<void()> body = [&] { kernel(args...); };
    Block* const outer = block;
    for (int64_t b = 0; b < grid; ++b) {
      Block blk;
      blk.threads = static_cast<unsigned>(threads), blk.index = static_cast<unsigned>(b);
      blk.stacks = &stacks;
      blk.body = &body;
      blk.all.expected = blk.threads;
      blk.warps.assign(threads / kWarp, Barrier{kWarp, 0, 0});
      blk.lanes.assign(threads, 0);
      blk.pipelines.assign(threads, Pipeline{});
      std::memset(memory.get(), 0xcd, shared_bytes);  // stale shared memory is not zero on a GPU either
      blk.shared = memory.get();
      if (!RunBlock(blk)) {
        std::fprintf(stderr, "CUDA emulation: deadlock at a barrier in block %lld\n", static_cast<long long>(b));
        std::abort();
      }
    }
    block = outer;
  }
};

template <class Kernel>
Launcher<Kernel> Launch(Kernel kernel, int64_t grid, int64_t threads, size_t shared) {
  return Launcher<Kernel>{kernel, grid, threads, shared};
}

}  // namespace tfsa_emu

#define TFSA_LAUNCH(kernel, grid, threads, shared, stream) \
  ((void)(stream), ::tfsa_emu::Launch(kernel, (grid), (threads), (shared)))
#define TFSA_DYNAMIC_SHARED(name) unsigned char* name = ::tfsa_emu::DynamicShared()

#define threadIdx (dim3{::tfsa_emu::ThreadIndex(), 0, 0})
#define blockIdx (dim3{::tfsa_emu::block->index, 0, 0})
#define blockDim (dim3{::tfsa_emu::block->threads, 1, 1})

inline void __syncthreads() { tfsa_emu::Wait(tfsa_emu::block->all); }
inline void __syncwarp(unsigned = 0xffffffffu) { tfsa_emu::WarpWait(); }

template <class T>
T __shfl_xor_sync(unsigned, T value, int mask) {
  return tfsa_emu::Exchange(value, [mask](unsigned lane) { return lane ^ static_cast<unsigned>(mask); });
}
template <class T>
T __shfl_sync(unsigned, T value, int source) {
  return tfsa_emu::Exchange(value, [source](unsigned) { return static_cast<unsigned>(source); });
}
inline unsigned __ballot_sync(unsigned, bool predicate) {
  uint64_t* slots = tfsa_emu::WarpSlots();
  slots[tfsa_emu::Lane()] = predicate;
  tfsa_emu::WarpWait();
  unsigned ballot = 0;
  for (int lane = 0; lane < tfsa_emu::kWarp; ++lane) ballot |= (slots[lane] ? 1u : 0u) << lane;
  tfsa_emu::WarpWait();
  return ballot;
}
inline bool __any_sync(unsigned mask, bool predicate) { return __ballot_sync(mask, predicate) != 0; }
inline bool __all_sync(unsigned mask, bool predicate) { return __ballot_sync(mask, predicate) == 0xffffffffu; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline float __expf(float x) { return expf(x); }
inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
  const unsigned long long old = *address;  // fibers of one block never run at once
  *address = old + value;
  return old;
}
template <class T>
T min(T a, T b) { return a < b ? a : b; }
template <class T>
T max(T a, T b) { return a > b ? a : b; }
