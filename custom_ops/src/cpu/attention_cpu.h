// CPU SparseAttention: packs keys/values once, then per (batch, head, query block) selects the
// key blocks (selection.h) and walks them in tiles (tile_walk.h), in parallel.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "problem.h"

namespace tfsa::cpu {

struct Tensors {
  const void* query = nullptr;  // [B, Hq, Sq, D]
  const void* key = nullptr;    // [B, Hkv, kv_rows, D], rows past Sk unread
  const void* value = nullptr;  // [B, Hkv, kv_rows, Dv]
  int64_t kv_rows = 0;          // rows per (batch, kv head) of key/value: a cache longer than Sk; 0: Sk
  void* output = nullptr;       // [B, Hq, Sq, Dv]
  float* density = nullptr;     // [B, Hq] or null
  enum class Type { kFloat, kHalf, kBFloat16 } type = Type::kFloat;  // of query/key/value/output
};

// Runs fn(0) .. fn(n-1), possibly concurrently (ONNX Runtime's intra-op pool).
using ParallelFor = std::function<void(size_t n, const std::function<void(size_t)>& fn)>;

// Packed keys/values of one call. Kept between calls so that large inputs do not pay for
// fresh, page-faulting allocations every run; every byte read is written by the call.
struct Workspace {
  std::vector<float> kt, v, k_means, sampled;
  std::vector<uint8_t> v_nonfinite;  // per (batch, kv head, key block): a value is NaN or inf
  std::vector<uint32_t> kt2, v2;     // compute_precision = bf16: keys and values as bf16 pairs
  std::vector<uint32_t> sampled2;    // the antidiagonal estimate's sampled keys for AMX (packed.h)
};

// Workspaces of finished runs, reused; concurrent runs each take their own.
class WorkspacePool {
 public:
  std::unique_ptr<Workspace> Take();
  void Return(std::unique_ptr<Workspace> workspace);

 private:
  std::mutex mutex_;
  std::vector<std::unique_ptr<Workspace>> pool_;
};

// Runs one call with a workspace from `workspaces`.
void RunSparseAttention(const Problem& problem, const Tensors& tensors, WorkspacePool& workspaces,
                        const ParallelFor& parallel_for);

}  // namespace tfsa::cpu
