// CPU SparseAttention: packs keys/values once, then per (batch, head, query block) picks the
// key blocks (selection.h) and computes them (block_math.h), in parallel.
#pragma once

#include <cstddef>
#include <functional>

#include "problem.h"

namespace tfsa::cpu {

struct Tensors {
  const void* query = nullptr;  // [B, Hq, Sq, D]
  const void* key = nullptr;    // [B, Hkv, Sk, D]
  const void* value = nullptr;  // [B, Hkv, Sk, Dv]
  void* output = nullptr;       // [B, Hq, Sq, Dv]
  float* density = nullptr;     // [B, Hq] or null
  bool half = false;            // float16 tensors (else float32)
};

// Runs fn(0) .. fn(n-1), possibly concurrently (ONNX Runtime's intra-op pool).
using ParallelFor = std::function<void(size_t n, const std::function<void(size_t)>& fn)>;

void RunSparseAttention(const Problem& problem, const Tensors& tensors, const ParallelFor& parallel_for);

}  // namespace tfsa::cpu
