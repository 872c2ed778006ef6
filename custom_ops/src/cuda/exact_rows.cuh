// The exact-rows path: one warp per row, one key per lane, straight from global memory. What
// the tensor-core tiles hand over to when a chosen value block holds NaN or inf, where their
// block product would let 0 * NaN reach rows that do not attend that key. Rare, so simple.
#pragma once

#include "softmax.cuh"
#include "tile_scheduler.cuh"

namespace tfsa::cuda {

template <class T>
__device__ void ExactRows(const AttentionArgs& a, const Place& at, const int32_t* blocks, int n_blocks) {
  const Geometry& g = a.g;
  const T *query = static_cast<const T*>(a.query), *key = static_cast<const T*>(a.key);
  const T* value = static_cast<const T*>(a.value);
  const int64_t d = g.dims.head_dim, dv = g.dims.v_head_dim, kv_base = at.KeyBase(g);
  const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (int64_t i = at.q_begin + threadIdx.x / 32; i < at.q_end; i += warps) {
    WarpRow row;
    const T* q_row = query + (at.QueryBase(g) + i) * d;
    for (int64_t pos = 0; pos < int64_t{n_blocks} * g.grid.block; pos += 32) {
      const int64_t j = KeyAt(g, blocks, n_blocks, pos + lane);
      float score = kNegInf;
      if (j >= 0) {
        float dot = 0.0f;
        for (int64_t x = 0; x < d; ++x) dot += ToFloat(q_row[x]) * ToFloat(key[(kv_base + j) * d + x]);
        score = Score(g, at.b, at.h, i, j, dot);
      }
      row.Add(score, lane, dv, [&](int k) { return value + (kv_base + KeyAt(g, blocks, n_blocks, pos + k)) * dv; });
    }
    row.Store(static_cast<T*>(a.output) + (at.QueryBase(g) + i) * dv, lane, dv);
  }
}

// Whether any of the chosen key blocks holds a NaN or inf value (the same answer for all threads).
__device__ inline bool ReadsNonFiniteValues(const AttentionArgs& a, const Place& at, const int32_t* blocks, int n_blocks) {
  __shared__ int found;
  if (threadIdx.x == 0) found = 0;
  __syncthreads();
  const uint8_t* flags = a.value_flags + (at.b * a.g.dims.kv_heads + a.g.KvHead(at.h)) * a.g.grid.k_blocks;
  for (int c = threadIdx.x; c < n_blocks; c += blockDim.x)
    if (flags[blocks[c]]) found = 1;
  __syncthreads();
  return found != 0;
}

}  // namespace tfsa::cuda
